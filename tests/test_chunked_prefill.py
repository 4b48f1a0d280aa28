"""Chunked prefill (issue 15: "prefill separate from decode, chunked, so a
long prompt does not stall running streams"): on either runner the
engine writes prompts in pieces of at most max_prefill_tokens per step,
between decode steps. The tokens are the whole-prompt reference's, running
requests get a token every step while a long prompt is written, and aborts
and failures mid-prompt free its rows."""

from __future__ import annotations

import copy

import pytest
from test_engine import PREF, PREF2, chat, run
from test_slot_runner import tokens_by_request

from pad_core.engine import prompt_spans
from pad_core.runner import BASE_RUNNER
from pad_core.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_prompt_spans_right_align_the_rows_so_they_complete_together():
    assert prompt_spans([30, 60], 0, 60) == [(0, 30), (0, 60)]
    assert prompt_spans([30, 60], 0, 20) == [(0, 0), (0, 20)]  # the shorter prompt starts later
    assert prompt_spans([30, 60], 20, 20) == [(0, 10), (20, 40)]
    assert prompt_spans([30, 60], 40, 20) == [(10, 30), (40, 60)]  # both end in this piece
    assert prompt_spans([5], 3, 100) == [(3, 5)]
    for advance in (1, 7, 16):
        progress, written = 0, [0, 0, 0]
        while progress < 41:
            spans = prompt_spans([41, 12, 33], progress, advance)
            for row, (start, end) in enumerate(spans):
                assert start == written[row] <= end
                written[row] = end
            progress += advance
            assert all(end == n for (_, end), n in zip(spans, [41, 12, 33], strict=True)) == (progress >= 41)


@pytest.fixture(params=["slots", "transformers"])
def chunked(make_engine, request):
    """An engine on either runner: the pool writes a piece into the row's
    slot; the transformers runner keeps it outside its batch until complete."""
    return lambda **settings: make_engine(**{"backend": request.param, "kv_pool_gib": 0.03, **settings})


def mid_prompt(runner) -> dict:
    """The runner's rows whose prompt is not complete."""
    return runner._pending if hasattr(runner, "_pending") else runner._partial


def test_the_engine_chunks_unless_told_not_to(chunked):
    assert chunked().chunked_prefill
    assert not chunked(chunked_prefill=False).chunked_prefill


@pytest.mark.parametrize("budget", [7, 16, 64])
def test_tokens_equal_whole_prompt_prefill_at_any_piece_size(make_engine, chunked, budget):
    requests = [
        chat("xlong-pad", "xlong", [PREF, PREF2], GREEDY),
        chat("long", "long", sampling=GREEDY),
        chat("mid-pad", "mid", [PREF], SamplingParams(temperature=1.0, seed=4, max_tokens=6)),
        chat("short", "short", [PREF2], GREEDY),
    ]
    expected = tokens_by_request(make_engine(), *copy.deepcopy(requests))
    engine = chunked(max_prefill_tokens=budget)
    assert tokens_by_request(engine, *requests) == expected
    assert engine.stats().items() >= {"running_requests": 0, "running_rows": 0, "waiting_requests": 0}.items()


def test_a_long_prompt_does_not_stall_the_running_streams(chunked):
    """With 16 tokens a step, the xlong PAD prompt (hundreds of tokens in
    three rows) takes many steps to write; the running request gets one
    token in every one of them."""
    engine = chunked(max_prefill_tokens=16)
    engine.add_chat(chat("running", "short", sampling=SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)))
    while not engine.running:  # its own prompt (the chat template's ~30 tokens) takes two steps
        engine.step()
    engine.add_chat(chat("long", "xlong", [PREF, PREF2], GREEDY))
    steps_until_first_token = 0
    while True:
        outputs = engine.step()
        steps_until_first_token += 1
        assert [o.request_id for o in outputs].count("running") == 1  # never stalled
        if any(o.request_id == "long" for o in outputs):
            break
        assert engine.stats()["running_requests"] == 2 and len(engine.prefilling) == 1
    longest = engine.running[-1].prefill_length
    assert steps_until_first_token == -(-longest // (16 // 3))  # 3 rows share the 16 tokens


def test_requests_queue_behind_a_long_prompt_only_for_its_budget(chunked):
    """Without chunking a prompt above the budget waits until nothing else
    runs; with it, it is admitted at once and written piece by piece."""
    engine = chunked(max_prefill_tokens=32)
    engine.add_chat(chat("a", "short", sampling=GREEDY))
    engine.step()
    engine.add_chat(chat("big", "xlong", [PREF], GREEDY))
    engine.add_chat(chat("after", "short", sampling=GREEDY))
    engine.step()
    assert [s.request_id for s in engine.prefilling] == ["big", "after"] and not engine.waiting
    results = run(engine)
    assert {rid for rid, r in results.items() if r.finish_reason == "length"} == {"a", "big", "after"}


def test_an_abort_mid_prompt_frees_its_rows(chunked, make_engine):
    engine = chunked(max_prefill_tokens=48)
    engine.add_chat(chat("keep", "short", sampling=GREEDY))
    engine.add_chat(chat("gone", "xlong", [PREF, PREF2], GREEDY))
    outputs = engine.step() + engine.step()
    assert [s.request_id for s in engine.running] == ["keep"] and [s.request_id for s in engine.prefilling] == ["gone"]
    runner = engine.runners[BASE_RUNNER]
    assert mid_prompt(runner) and runner.num_rows + len(mid_prompt(runner)) >= 3  # "gone" holds part of its prompts
    engine.abort("gone")
    outputs += engine.step()
    assert [o.finish_reason for o in outputs if o.request_id == "gone"] == ["abort"]
    assert not engine.prefilling and runner.num_rows == 1 and not mid_prompt(runner)
    outputs += [o for o in engine.generate([])]
    keep = [t for o in outputs if o.request_id == "keep" for t in o.token_ids]
    assert keep == tokens_by_request(make_engine(), chat("keep", "short", sampling=GREEDY))["keep"]


def test_a_failing_piece_ends_only_its_request(chunked, make_engine, monkeypatch):
    """A prefill call that fails for one request's rows: the requests in it
    are retried alone from the start of their prompts; the culprit ends with
    "error", the others' tokens are the reference's."""
    engine = chunked(max_prefill_tokens=64)
    runner = engine.runners[BASE_RUNNER]
    prefill = runner.prefill

    def failing(rows):
        if any(row.key[0] == "bad" and row.start > 0 for row in rows):
            raise RuntimeError("injected")
        return prefill(rows)

    monkeypatch.setattr(runner, "prefill", failing)
    requests = [chat("bad", "xlong", [PREF], GREEDY), chat("good", "long", [PREF2], GREEDY),
                chat("small", "short", sampling=GREEDY)]
    results = run(engine, *copy.deepcopy(requests))
    assert results["bad"].finish_reason == "error" and "injected" in results["bad"].last.error
    expected = tokens_by_request(make_engine(), *requests[1:])
    assert {rid: results[rid].tokens for rid in ("good", "small")} == expected
    assert runner.num_rows == 0 and not mid_prompt(runner) and engine.stats()["running_requests"] == 0


def test_a_failed_decode_ends_the_requests_mid_prompt_once(chunked, monkeypatch):
    """A decode forward that fails ends every request with rows, those whose
    prompt is half written included: each ends once ("error"), and none is
    written on in the same step (regression: it joined the batch and sent a
    token after its error)."""
    engine = chunked(max_prefill_tokens=16)
    engine.add_chat(chat("running", "short", sampling=GREEDY))
    while not engine.running:
        engine.step()
    engine.add_chat(chat("half", "xlong", [PREF], GREEDY))
    engine.step()
    assert [s.request_id for s in engine.prefilling] == ["half"]
    runner = engine.runners[BASE_RUNNER]

    def broken(tokens):
        raise RuntimeError("injected")

    monkeypatch.setattr(runner, "decode", broken)
    outputs = engine.step()
    assert sorted((o.request_id, o.finish_reason) for o in outputs) == [("half", "error"), ("running", "error")]
    assert not engine.prefilling and not engine.running and runner.num_rows == 0 and not mid_prompt(runner)


def test_the_n_choices_of_a_prompt_written_in_pieces_run_once(make_engine):
    """The transformers runner runs rows that hold the same tokens and get
    the same piece once and copies the result (the n choices of a request,
    whose prompts are written in lockstep): each piece is one row of the
    forward, and the answers are whole-prompt prefill's."""
    requests = [chat(f"c{i}", "long", [PREF], GREEDY) for i in range(4)]
    expected = tokens_by_request(make_engine(), *copy.deepcopy(requests))
    engine = make_engine(backend="transformers", max_prefill_tokens=32)
    runner = engine.runners[BASE_RUNNER]
    widths = []
    forward = runner._forward

    def counting(input_ids, *args):
        if input_ids.shape[1] > 1:  # a prefill, not a decode step
            widths.append(input_ids.shape[0])
        return forward(input_ids, *args)

    runner._forward = counting
    assert tokens_by_request(engine, *requests) == expected
    assert len(widths) > 3 and max(widths) == 2  # each piece: the base row and the reward row, once
    assert not runner._partial and not runner._partial_tokens
