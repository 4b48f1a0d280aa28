"""The slots backend (pad_core/slot_runner.py): rows in a preallocated KV
pool give each row the hidden states of its context recomputed from
scratch, leave without touching other rows' caches, and the engine over it
chooses the same float32 greedy (and seeded sampled) tokens as over the
transformers runner, the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import PREF, PREF2, _scenario, chat, run, run_one
from test_lora import save_random_adapter
from test_runner import ids, recomputed

from pad_core.cuda_graphs import read_length_buckets
from pad_core.errors import ModelLoadError
from pad_core.lora import NO_ADAPTER
from pad_core.runner import BASE_RUNNER, NewRow, Runner, TransformersRunner
from pad_core.slot_runner import (
    SlotRunner,
    decode_batch_size,
    kv_bytes_per_token,
    slot_tokens_for_budget,
)
from pad_core.testing import tiny_model
from pad_core.types import GenerationRequest, Preference, SamplingParams

ATOL = 1e-4


@pytest.fixture
def runner(tiny_model, tokenizer):
    return SlotRunner(tiny_model, slots=6, slot_tokens=128, pad_token_id=tokenizer.pad_token_id)


# ---- pure pieces -------------------------------------------------------------------


def test_pool_sizing_and_batch_buckets():
    per_token = kv_bytes_per_token(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    assert per_token == 2 * 30 * 3 * 64 * 2
    assert slot_tokens_for_budget(96 * 1000 * per_token, 96, per_token, 8192) == 1000
    assert slot_tokens_for_budget(2**40, 96, per_token, 8192) == 8192  # capped by the context length
    with pytest.raises(ModelLoadError, match="only 10 tokens"):
        slot_tokens_for_budget(96 * 10 * per_token, 96, per_token, 8192)
    assert read_length_buckets(96, smallest=1) == (1, 2, 4, 8, 16, 32, 64, 96)
    assert read_length_buckets(1, smallest=1) == (1,)
    assert decode_batch_size(5, None) == 5
    assert decode_batch_size(5, (1, 2, 4, 8, 96)) == 8
    assert decode_batch_size(96, (1, 2, 4, 8, 96)) == 96


def test_both_runners_satisfy_the_protocol(runner, tiny_model):
    assert isinstance(runner, Runner)
    assert isinstance(TransformersRunner(tiny_model), Runner)


# ---- the runner ------------------------------------------------------------------------


def check(runner, hidden, contexts, model, pending=()):
    """The decoded rows' hidden states; `pending`: rows whose prompt is still being written."""
    index = runner.row_index()
    assert set(index) == set(contexts) | set(pending)
    for key, context in contexts.items():
        torch.testing.assert_close(hidden[index[key]], recomputed(model, context), atol=ATOL, rtol=0)


def decode_step(runner, contexts, step_seed):
    tokens = torch.zeros(runner.batch_size, dtype=torch.long)
    drawn = ids(len(contexts), step_seed)
    for (key, context), token in zip(sorted(contexts.items()), drawn, strict=True):
        context.append(token)
        tokens[runner.row_index()[key]] = token
    return runner.decode(tokens)


def test_rows_take_slots_decode_and_leave_matching_full_recompute(runner, tiny_model):
    contexts = {"a": ids(7, 1), "b": ids(20, 2), "c": ids(3, 3)}
    hidden = runner.prefill([NewRow(key, contexts[key]) for key in "abc"])
    assert dict(runner.row_index()) == {"a": 0, "b": 1, "c": 2} and runner.batch_size == 3
    for key, row in zip("abc", hidden, strict=True):
        torch.testing.assert_close(row, recomputed(tiny_model, contexts[key]), atol=ATOL, rtol=0)
    for step in range(3):
        check(runner, decode_step(runner, contexts, 100 + step), contexts, tiny_model)

    # A row in the middle leaves: the others keep their slots and buffers.
    layer = runner.cache.layers[0]
    pointers = (layer.key_pool.data_ptr(), layer.value_pool.data_ptr())
    kept = layer.key_pool[[0, 2]].clone()
    runner.remove({"b", "not-a-row"})
    del contexts["b"]
    assert dict(runner.row_index()) == {"a": 0, "c": 2} and runner.batch_size == 3  # slot 1 decodes as a dummy
    assert (layer.key_pool.data_ptr(), layer.value_pool.data_ptr()) == pointers
    assert torch.equal(layer.key_pool[[0, 2]], kept)
    for step in range(2):
        check(runner, decode_step(runner, contexts, 200 + step), contexts, tiny_model)

    # A longer row takes the freed slot; another one the next free slot.
    contexts["d"], contexts["e"] = ids(45, 4), ids(2, 5)
    hidden = runner.prefill([NewRow("d", contexts["d"]), NewRow("e", contexts["e"])])
    assert runner.row_index()["d"] == 1 and runner.row_index()["e"] == 3
    torch.testing.assert_close(hidden[0], recomputed(tiny_model, contexts["d"]), atol=ATOL, rtol=0)
    for step in range(3):
        check(runner, decode_step(runner, contexts, 300 + step), contexts, tiny_model)

    # The highest slot leaves: the decode batch shrinks to the live prefix.
    runner.remove({"e"})
    del contexts["e"]
    assert runner.batch_size == 3
    check(runner, decode_step(runner, contexts, 400), contexts, tiny_model)
    runner.remove(set(contexts))
    assert runner.num_rows == 0 and runner.batch_size == 0 and not runner.lengths.any()


def test_a_full_pool_and_a_failed_prefill_take_no_slot(runner, monkeypatch):
    runner.prefill([NewRow(i, ids(4, i)) for i in range(5)])
    with pytest.raises(RuntimeError, match="2 new rows but 1 free KV slots"):
        runner.prefill([NewRow("x", [5]), NewRow("y", [6])])
    with pytest.raises(RuntimeError, match="does not fit"):
        runner.prefill([NewRow("x", ids(129, 9))])

    def failing(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(runner, "_prefill_forward", failing)
    with pytest.raises(RuntimeError, match="injected"):
        runner.prefill([NewRow("x", [5])])
    monkeypatch.undo()
    assert runner.num_rows == 5
    runner.prefill([NewRow("x", [5])])
    assert runner.row_index()["x"] == 5


def test_bucketed_batches_decode_the_same_hidden_states(tiny_model, tokenizer):
    exact = SlotRunner(tiny_model, slots=8, slot_tokens=64)
    bucketed = SlotRunner(tiny_model, slots=8, slot_tokens=64, batch_buckets=(2, 4))
    assert bucketed.buckets == (2, 4, 8)
    rows = [NewRow(i, ids(3 + 4 * i, i)) for i in range(3)]
    for runner in (exact, bucketed):
        runner.prefill(rows)
    assert exact.batch_size == 3 and bucketed.batch_size == 4
    for step in range(3):
        tokens = ids(3, 50 + step)
        a = exact.decode(torch.tensor(tokens))
        b = bucketed.decode(torch.tensor([*tokens, 0]))
        # A batch of 4 and one of 3 run differently blocked float32 matmuls
        # (2.4e-6 apart with transformers 5.24); a padding row leaking into
        # the others would be off by far more than ATOL.
        torch.testing.assert_close(b[:3], a, atol=ATOL, rtol=0)


def test_a_prompt_written_in_pieces_while_others_decode_matches_full_recompute(runner, tiny_model):
    """Chunked prefill: row "long" is written in three pieces, next to rows
    that decode and a new row that joins in the same call as a piece; each
    piece's last hidden state is its prefix's, and once complete the row
    decodes like any other."""
    contexts = {"a": ids(6, 1)}
    runner.prefill([NewRow("a", contexts["a"])])
    prompt = ids(50, 2)
    hidden = runner.prefill([NewRow("long", prompt[:20], last=False)])
    torch.testing.assert_close(hidden[0], recomputed(tiny_model, prompt[:20]), atol=ATOL, rtol=0)
    assert runner.num_rows == 2 and set(runner.row_index()) == {"a", "long"}
    check(runner, decode_step(runner, contexts, 10), contexts, tiny_model, pending={"long"})  # a dummy token

    contexts["b"] = ids(9, 3)  # a new row and the next piece in one call
    hidden = runner.prefill([NewRow("b", contexts["b"]), NewRow("long", prompt[20:45], start=20, last=False)])
    torch.testing.assert_close(hidden[0], recomputed(tiny_model, contexts["b"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[1], recomputed(tiny_model, prompt[:45]), atol=ATOL, rtol=0)
    check(runner, decode_step(runner, contexts, 11), contexts, tiny_model, pending={"long"})

    with pytest.raises(ValueError, match="does not hold 40 tokens"):
        runner.prefill([NewRow("long", prompt[40:], start=40)])
    hidden = runner.prefill([NewRow("long", prompt[45:], start=45)])
    torch.testing.assert_close(hidden[0], recomputed(tiny_model, prompt), atol=ATOL, rtol=0)
    contexts["long"] = list(prompt)
    for step in range(3):
        check(runner, decode_step(runner, contexts, 20 + step), contexts, tiny_model)


def test_a_row_left_mid_prompt_frees_its_slot(runner, tiny_model):
    runner.prefill([NewRow("a", ids(4, 1)), NewRow("p", ids(30, 2)[:10], last=False)])
    assert runner._pending == {1: 10} and runner.batch_size == 2
    runner.remove({"p"})
    assert runner._pending == {} and runner.batch_size == 1 and runner.lengths[1] == 0
    with pytest.raises(ValueError, match="does not hold"):
        runner.prefill([NewRow("p", ids(30, 2)[10:], start=10)])
    contexts = {"a": ids(4, 1), "c": ids(12, 3)}
    runner.prefill([NewRow("c", contexts["c"])])
    assert runner.row_index()["c"] == 1
    check(runner, decode_step(runner, contexts, 5), contexts, tiny_model)


# ---- the engine over the pool ----------------------------------------------------------


def tokens_by_request(engine, *requests) -> dict[str, list[int]]:
    return {rid: result.tokens for rid, result in run(engine, *requests).items()}


@pytest.fixture
def slots_engine(make_engine):
    return lambda **settings: make_engine(**{"backend": "slots", "kv_pool_gib": 0.03, **settings})


def test_the_slots_backend_is_selected_by_the_setting(slots_engine, make_engine):
    engine = slots_engine()
    assert isinstance(engine.runners[BASE_RUNNER], SlotRunner)
    assert engine.runners[BASE_RUNNER].shape.slots == engine.settings.max_batch_rows
    assert engine.context_length == 512  # the tiny model's; the pool holds it
    assert isinstance(make_engine().runners[BASE_RUNNER], TransformersRunner)
    small = slots_engine(max_batch_rows=2, kv_pool_gib=0.001)
    assert small.runners[BASE_RUNNER].shape.slots == 9  # one request's rows (8 preferences + base) always fit
    assert small.context_length == small.runners[BASE_RUNNER].slot_tokens < 512


@pytest.mark.parametrize("preferences", [(), (PREF,), (PREF, PREF2)])
def test_greedy_and_seeded_tokens_equal_the_transformers_runner_in_a_changing_batch(
    make_engine, slots_engine, preferences
):
    """The batching scenario of test_engine (requests of other lengths join
    earlier and later, with and without preferences, greedy and seeded
    sampling, and finish at different steps): every request's tokens are the
    same on both backends."""
    target = chat("target", "mid", preferences, SamplingParams(temperature=0.0, max_tokens=16))
    reference = _scenario(make_engine(), copy.deepcopy(target))
    pooled = _scenario(slots_engine(), target)
    assert pooled.tokens == reference.tokens and pooled.text == reference.text
    everyone = [
        chat("plain", "long"),
        chat("pad", "mid", [PREF], weight=2.0, top_k=10),
        chat("two", "short", [PREF, PREF2]),
        chat("sampled", "xlong", [PREF2], SamplingParams(temperature=1.0, seed=3, max_tokens=12), weight=1.0),
        GenerationRequest("ids", [5, 6, 7, 8], sampling=SamplingParams(temperature=0.0, max_tokens=9)),
    ]
    assert tokens_by_request(slots_engine(), *copy.deepcopy(everyone)) == tokens_by_request(make_engine(), *everyone)


def test_budgets_and_slot_reuse_keep_the_tokens(make_engine, slots_engine):
    """Few slots, requests queued behind the budget: finished rows free their
    slots and later requests take them."""
    requests = [
        chat(f"r{i}", prompt, prefs, SamplingParams(temperature=0.0, max_tokens=3 + i))
        for i, (prompt, prefs) in enumerate(
            [("short", ()), ("mid", (PREF,)), ("long", ()), ("mid", (PREF, PREF2)), ("xlong", ()), ("short", (PREF2,))]
        )
    ]
    pooled = slots_engine(max_running_requests=2, max_batch_rows=3)
    assert tokens_by_request(pooled, *copy.deepcopy(requests)) == tokens_by_request(make_engine(), *requests)
    assert pooled.stats()["running_rows"] == 0 and pooled.runners[BASE_RUNNER].batch_size == 0


def test_abort_and_a_failing_request_free_their_slots(slots_engine, make_engine):
    engine = slots_engine()
    engine.add_chat(chat("keep", "short"))
    engine.add_chat(chat("victim", "long", [PREF, PREF2]))
    outputs = engine.step() + engine.step()
    engine.abort("victim")
    outputs += engine.step()
    assert engine.runners[BASE_RUNNER].num_rows == 1
    outputs += list(engine.generate([]))
    keep = [t for o in outputs if o.request_id == "keep" for t in o.token_ids]
    assert keep == run_one(make_engine(), chat("keep", "short")).tokens
    assert engine.runners[BASE_RUNNER].num_rows == 0


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("adapter")
    save_random_adapter(folder, tokenizer, 0)
    return folder


def test_lora_reward_rows_next_to_self_rows_equal_the_transformers_runner(make_engine, slots_engine, adapter, tokenizer):
    """Each engine gets its own model: adapters hook the model's modules."""
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    requests = [
        chat(f"r{i}", prompt, [Preference("short")], sampling, reward_model=rm)
        for i, (prompt, rm) in enumerate([("mid", "one"), ("short", "self"), ("long", "one")])
    ]
    reference = make_engine(model=tiny_model(tokenizer))
    reference.add_reward_adapter("one", str(adapter))
    pooled = slots_engine(model=tiny_model(tokenizer))
    pooled.add_reward_adapter("one", str(adapter))
    assert pooled.runners[BASE_RUNNER].lora.names == {"one"}
    expected = tokens_by_request(reference, *requests)
    assert tokens_by_request(pooled, *copy.deepcopy(requests)) == expected
    assert expected["r0"] != tokens_by_request(make_engine(), chat("r0", "mid", [Preference("short")], sampling))["r0"]
    assert pooled.runners[BASE_RUNNER]._adapters == [NO_ADAPTER] * pooled.runners[BASE_RUNNER].shape.slots


def test_the_prescreen_floor_and_penalties_give_the_same_tokens(make_engine, slots_engine):
    request = chat("g", "long", [PREF], weight=1.0, top_k=10, min_p=0.3)
    assert run_one(slots_engine(), copy.deepcopy(request)).tokens == run_one(make_engine(), request).tokens
    sampling = SamplingParams(temperature=0.0, max_tokens=24, presence_penalty=1.0, frequency_penalty=2.0)
    request = chat("p", "short", sampling=sampling)
    assert run_one(slots_engine(), copy.deepcopy(request)).tokens == run_one(make_engine(), request).tokens
