"""Prefix caching (pad_core/prefix_cache.py): the store as pure data, then
the transformers runner and the engine on the tiny model, where a row that
starts from a cached prefix must compute what a full prefill computes."""

from __future__ import annotations

import copy

import pytest
import torch

from pad_core.lora import NO_ADAPTER
from pad_core.prefix_cache import PrefixCache
from pad_core.runner import NewRow, TransformersRunner
from pad_core.slot_runner import SlotRunner
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams

BLOCK = 4


def kv_of(tokens, layers=2, heads=1, dim=2) -> torch.Tensor:
    """A recognisable KV: every value is its token id ([layers, 2, heads, len, dim])."""
    values = torch.tensor(tokens, dtype=torch.float32)[None, None, None, :, None]
    return values.expand(layers, 2, heads, len(tokens), dim).clone()


# ---- the store ---------------------------------------------------------------
def test_the_longest_whole_block_prefix_leaving_a_token_to_prefill():
    cache = PrefixCache(budget_bytes=1 << 20, block=BLOCK)
    stored = list(range(100, 111))  # 11 tokens: two whole blocks kept
    cache.store("base", stored, kv_of(stored))
    length, kv = cache.longest("base", stored[:8] + [1, 2, 3])
    assert length == 8 and kv[0, 0, 0, :, 0].tolist() == stored[:8]
    assert cache.longest("base", stored[:8])[0] == 4  # one token must be left to prefill
    assert cache.longest("base", stored[:6] + [9, 9, 9])[0] == 4  # shares one whole block
    assert cache.longest("base", [7, *stored])[0] == 0  # a prefix, not any substring
    assert cache.longest("lora", stored[:8] + [1])[0] == 0  # another adapter's KV is another
    assert cache.hit_tokens == 16 and cache.queried_tokens == 11 + 8 + 9 + 12 + 9


def test_a_hash_collision_is_a_miss():
    cache = PrefixCache(budget_bytes=1 << 20, block=BLOCK)
    cache.store("base", [1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    (entry,) = cache._entries.values()
    entry.tokens = (1, 2, 3, 5)  # as if other tokens had hashed the same
    assert cache.longest("base", [1, 2, 3, 4, 9]) == (0, None)


def test_least_recently_used_entries_leave_first_within_the_budget():
    one = kv_of(range(8)).numel() * 4  # bytes of an 8-token entry
    cache = PrefixCache(budget_bytes=2 * one, block=BLOCK)
    a, b, c = ([n] * 8 for n in (1, 2, 3))
    cache.store("base", a, kv_of(a))
    cache.store("base", b, kv_of(b))
    assert cache.longest("base", a + [0])[0] == 8  # a is now the most recently used
    cache.store("base", c, kv_of(c))
    assert cache.longest("base", b + [0])[0] == 0 and cache.longest("base", a + [0])[0] == 8
    assert len(cache) == 2 and cache.bytes == 2 * one
    cache.store("base", list(range(40)), kv_of(range(40)))  # larger than the whole budget: not kept
    assert len(cache) == 2
    cache.store("base", a, kv_of(a))  # held already: no second copy
    assert len(cache) == 2 and cache.bytes == 2 * one


def test_a_shared_prefix_stays_found_when_the_entry_indexing_it_leaves():
    one = kv_of(range(8)).numel() * 4
    cache = PrefixCache(budget_bytes=3 * one, block=BLOCK)
    system = [5, 5, 5, 5]
    first, second = system + [1, 1, 1, 1], system + [2, 2, 2, 2]
    cache.store("base", first, kv_of(first))
    cache.store("base", second, kv_of(second))  # now answers for the shared block
    cache.longest("base", first + [0])  # first is the most recently used: second leaves next
    cache.store("base", [7] * 8, kv_of([7] * 8))
    cache.store("base", [8] * 8, kv_of([8] * 8))
    length, kv = cache.longest("base", system + [3, 3])
    assert length == 4 and kv[0, 0, 0, :, 0].tolist() == system  # from the first conversation's entry


def test_a_chats_earlier_turn_leaves_when_the_next_one_is_stored():
    cache = PrefixCache(budget_bytes=1 << 20, block=BLOCK)
    turn1 = list(range(8))
    turn2 = [*turn1, *range(50, 58)]
    cache.store("base", turn1, kv_of(turn1))
    cache.store("base", turn2, kv_of(turn2))  # contains turn 1: one entry answers for both
    assert len(cache) == 1 and cache.bytes == kv_of(turn2).numel() * 4
    assert cache.longest("base", [*turn1, 9])[0] == 8 and cache.longest("base", [*turn2, 9])[0] == 16
    other = [*range(4), 99, 99, 99, 99]  # shares a block only: both stay
    cache.store("base", other, kv_of(other))
    assert len(cache) == 2


def test_nothing_is_copied_for_what_the_cache_would_not_keep():
    cache = PrefixCache(budget_bytes=1 << 20, block=BLOCK)
    per_token = kv_of([0]).numel() * 4
    assert cache.kept_length("base", list(range(10)), per_token) == 8  # whole blocks
    cache.store("base", list(range(10)), kv_of(range(10)))
    assert cache.kept_length("base", list(range(8)), per_token) == 0  # held already
    assert cache.kept_length("base", list(range(3)), per_token) == 0  # no whole block
    assert PrefixCache(budget_bytes=per_token * 4, block=BLOCK).kept_length("base", list(range(8)), per_token) == 0


# ---- the transformers runner -------------------------------------------------
def test_a_row_from_a_cached_prefix_computes_what_a_full_prefill_computes(tiny_model):
    cached = TransformersRunner(tiny_model, prefix_cache=PrefixCache(1 << 30, block=BLOCK))
    plain = TransformersRunner(tiny_model)
    first = list(range(300, 323))
    for runner in (cached, plain):
        runner.prefill([NewRow("a", first), NewRow("other", [7, 8, 9])])
        for token in (11, 12, 13):
            runner.decode(torch.tensor([token, token]))
    cached.retain({"a": [*first, 11, 12, 13, 14]})  # 14 was chosen last, never fed: not held
    cached.remove(["a"])
    plain.remove(["a"])
    assert cached.prefix_cache.bytes and cached.prefix_cache.longest(NO_ADAPTER, [*first, 11, 12, 13, 14])[0] == 24
    cached.prefix_cache.clear()
    cached.prefill([NewRow("warm", [*first[:8], 99])])  # a row whose first 8 tokens are kept as it leaves
    cached.retain({"warm": [*first[:8], 99], "gone": [1, 2, 3, 4, 5]})  # a key not live is ignored
    cached.remove(["warm"])
    kept = cached.prefix_cache.hit_tokens
    # In one forward: two hits of different lengths (8 and 4 tokens cached; different rests, so a
    # gap of padding between prefix and rest in one row) beside a miss, order kept.
    rows = [NewRow("b", [*first[:8], 40, 41, 42, 43, 44, 45]), NewRow("c", [1, 2, 3, 4, 5]),
            NewRow("d", [*first[:4], 50, 51])]
    hidden = cached.prefill(rows)
    assert torch.allclose(hidden, plain.prefill(rows), atol=1e-5)
    assert cached.prefix_cache.hit_tokens - kept == 8 + 4
    assert set(cached.row_index()) == set(plain.row_index()) == {"other", "b", "c", "d"}
    for token in (20, 21, 22):  # and the rows decode on as if they had been prefilled whole
        step = torch.tensor([token] * cached.batch_size)
        ours, theirs = cached.decode(step), plain.decode(step)
        for key in ("other", "b", "c", "d"):  # the rows may sit in another order
            assert torch.allclose(ours[cached.row_index()[key]], theirs[plain.row_index()[key]], atol=1e-5), key
    # "d" holds a gap between its cached prefix and the rest: what it keeps is its own tokens' KV.
    cached.retain({"d": [*first[:4], 50, 51, 20, 21, 22, 23]})  # 9 held: 8 kept
    hidden = cached.prefill([NewRow("e", [*first[:4], 50, 51, 20, 21, 60])])
    assert cached.prefix_cache.longest(NO_ADAPTER, [*first[:4], 50, 51, 20, 21, 60])[0] == 8
    assert torch.allclose(hidden, plain.prefill([NewRow("e", [*first[:4], 50, 51, 20, 21, 60])]), atol=1e-5)


# ---- the engine ----------------------------------------------------------------
@pytest.mark.parametrize("budget", [4096, 24])
@pytest.mark.parametrize("backend", ["transformers", "slots"])
@pytest.mark.parametrize("preference", [None, "I like short answers with a bit of humour"])
def test_a_chats_next_turns_prefill_only_their_new_tokens_and_answer_the_same(make_engine, preference, backend,
                                                                              budget):
    """Each turn sends the conversation so far with the model's own answers,
    as a chat client does: every row finds at least the whole earlier
    prompt cached (in whole 32-token blocks), and greedy answers are the
    tokens of an engine without a cache. With small prefill pieces too
    (24 tokens a step): a first piece reaches past the cached part. Each
    output says how many of the base prompt's tokens were cached (usage's
    cached_tokens)."""
    prefs = [Preference(preference)] if preference else []
    rows = 2 if preference else 1
    off = make_engine(prefix_cache_gib=0, backend=backend, max_prefill_tokens=budget)
    on = make_engine(backend=backend, max_prefill_tokens=budget)
    messages = [{"role": "system", "content": "You are a helpful assistant who answers at length."}]
    earlier_prompt = 0
    for turn in range(3):
        messages = [*messages, {"role": "user", "content": f"Tell me about topic {turn} in detail."}]
        request = ChatRequest(f"t{turn}", list(messages), prefs, SamplingParams(temperature=0.0, max_tokens=12),
                              GuidanceParams())
        expected = [t for o in off.generate([copy.deepcopy(request)]) for t in o.token_ids]
        before = on.stats()["prefix_cache_hit_tokens"]
        outputs = list(on.generate([request]))
        assert [t for o in outputs for t in o.token_ids] == expected, turn
        hits = on.stats()["prefix_cache_hit_tokens"] - before
        assert hits >= earlier_prompt // 32 * 32 * rows, (turn, hits, earlier_prompt)
        # usage's cached_tokens: the base prompt's whole blocks found cached, on every output
        cached = {o.cached_tokens for o in outputs}
        assert len(cached) == 1 and earlier_prompt // 32 * 32 <= cached.pop() <= min(hits, earlier_prompt + 12)
        assert outputs[-1].cached_tokens % 32 == 0 and outputs[-1].cached_tokens < outputs[-1].prompt_tokens
        earlier_prompt = outputs[-1].prompt_tokens
        messages = [*messages, {"role": "assistant", "content": "".join(o.text for o in outputs)}]
    assert off.stats()["prefix_cache_hit_tokens"] == 0 and on.stats()["prefix_cache_bytes"] > 0
    assert all(o.cached_tokens == 0 for o in off.generate([copy.deepcopy(request)]))


@pytest.mark.parametrize("backend", ["transformers", "slots"])
@pytest.mark.parametrize("budget", [16, 4096])
def test_cached_tokens_are_what_the_base_row_reused(make_engine, backend, budget):
    """usage's cached_tokens is the runner's own hit for the base row, also
    where its first piece is cut short (small prefill pieces; the longer
    reward prompt of a new preference, which finds nothing cached, sets the
    pace): every hit here is the base row's, so the two must agree."""
    engine = make_engine(backend=backend, max_prefill_tokens=budget)
    messages = [{"role": "user", "content": "Tell me about the rivers and the boats on them, in some detail."},
                {"role": "assistant", "content": "Rivers carry boats of every size, from canoes to barges."},
                {"role": "user", "content": "And the bridges?"}]
    sampling = SamplingParams(temperature=0.0, max_tokens=4)
    list(engine.generate([ChatRequest("warm", messages, [], sampling, GuidanceParams())]))
    for preferences in ([], [Preference("I like answers that mention the weather, " * 6)]):
        before = engine.stats()["prefix_cache_hit_tokens"]
        outputs = list(engine.generate([ChatRequest(f"again-{len(preferences)}", messages, preferences, sampling,
                                                    GuidanceParams())]))
        hits = engine.stats()["prefix_cache_hit_tokens"] - before
        assert outputs[-1].cached_tokens == hits, (preferences, budget)
        assert outputs[0].prompt_tokens > 64 and (budget == 16 and preferences or hits >= 64)


def test_prefix_cache_settings(make_engine):
    assert make_engine(prefix_cache_gib=0).runners["base"].prefix_cache is None
    assert make_engine(prefix_cache_gib=0.5).runners["base"].prefix_cache.budget_bytes == 2**29
    assert make_engine(backend="slots").runners["base"].prefix_cache is not None  # the pool, on CPU
    with pytest.raises(ValueError):
        EngineSettings(prefix_cache_gib=-1)


def test_the_gateways_counters_add_what_is_new_across_worker_restarts():
    from server.metrics import Metrics

    metrics = Metrics()

    def hits() -> float:
        return metrics.registry.get_sample_value("pad_prefix_cache_hits_total")

    metrics.update_worker_stats({"prefix_cache_hit_tokens": 64, "prefix_cache_queried_tokens": 100,
                                 "prefix_cache_bytes": 4096}, "w1")
    metrics.update_worker_stats({"prefix_cache_hit_tokens": 96, "prefix_cache_queried_tokens": 150}, "w1")
    assert hits() == 96 and metrics.registry.get_sample_value("pad_prefix_cache_queries_total") == 150
    metrics.update_worker_stats({})  # the worker went quiet (a long step, say): gauges zeroed...
    assert metrics.registry.get_sample_value("pad_prefix_cache_bytes") == 0
    metrics.update_worker_stats({"prefix_cache_hit_tokens": 110}, "w1")  # ...and back: only what is new counts
    assert hits() == 110
    metrics.update_worker_stats({"prefix_cache_hit_tokens": 32}, "w2")  # a new worker's first hits: all new
    assert hits() == 142


def test_rows_with_the_same_prompt_run_once_and_each_gets_its_own_copy(tiny_model):
    """The n choices of one request join with the same prompts: one forward
    row each, copies for the rest, and every copy decodes on its own."""
    shared = TransformersRunner(tiny_model)
    plain = TransformersRunner(tiny_model)
    widths = []
    forward = shared._forward
    shared._forward = lambda ids, *args: widths.append(ids.shape[0]) or forward(ids, *args)
    prompt = list(range(200, 230))
    rows = [NewRow("a", prompt), NewRow("b", prompt), NewRow("c", [5, 6, 7]), NewRow("d", prompt)]
    hidden = shared.prefill(rows)
    expected = torch.cat([plain.prefill([row]) for row in rows])
    assert widths == [2] and torch.allclose(hidden, expected, atol=1e-5)
    assert dict(shared.row_index()) == dict(plain.row_index()) == {"a": 0, "b": 1, "c": 2, "d": 3}
    for step in ([1, 2, 3, 4], [9, 8, 7, 6]):  # different tokens per copy: their caches are their own
        assert torch.allclose(shared.decode(torch.tensor(step)), plain.decode(torch.tensor(step)), atol=1e-5)


def test_the_pool_runner_copies_a_cached_prefix_into_the_slot(tiny_model):
    cached = SlotRunner(tiny_model, slots=4, slot_tokens=96, prefix_cache=PrefixCache(1 << 30, block=BLOCK))
    plain = SlotRunner(tiny_model, slots=4, slot_tokens=96)
    first = list(range(300, 323))
    for runner in (cached, plain):
        runner.prefill([NewRow("a", first), NewRow("other", [7, 8, 9])])
        for token in (11, 12, 13):
            runner.decode(torch.tensor([token] * runner.batch_size))
    cached.retain({"a": [*first, 11, 12, 13, 14], "other": [7, 8, 9, 11, 12, 13, 14]})  # 26 and 6 held
    assert cached.prefix_cache.longest(NO_ADAPTER, [*first, 11, 12, 13, 14])[0] == 24
    for runner in (cached, plain):
        runner.remove(["a"])
    rows = [NewRow("b", [*first, 11, 12, 13, 14, 15, 16]), NewRow("c", [1, 2, 3, 4, 5]),
            NewRow("d", [7, 8, 9, 11, 50])]  # a 24-token hit, a miss, a 4-token hit, in one call
    hits = cached.prefix_cache.hit_tokens
    assert torch.allclose(cached.prefill(rows), plain.prefill(rows), atol=1e-5)
    assert cached.prefix_cache.hit_tokens - hits == 24 + 4
    for token in (20, 21):
        step = torch.tensor([token] * cached.batch_size)
        ours, theirs = cached.decode(step), plain.decode(step)
        for key in ("other", "b", "c", "d"):
            assert torch.allclose(ours[cached.row_index()[key]], theirs[plain.row_index()[key]], atol=1e-5), key


def test_on_cuda_the_prefix_caches_come_out_of_the_pools_share(monkeypatch):
    """PAD_GPU_MEMORY_UTILIZATION covers the weights, the pools and the
    prefix caches: a pool is sized with every runner's cache so far set aside
    (they are empty at start-up and fill up later)."""
    from pad_core import model_loading

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))  # 10 GiB in use
    settings = EngineSettings(gpu_memory_utilization=0.5, prefix_cache_gib=2)
    cuda = torch.device("cuda")
    assert model_loading.prefix_cache_bytes(settings) == 2 * gib
    assert model_loading.kv_pool_budget(settings, cuda, reserved_bytes=2 * gib) == (40 - 10 - 2) * gib
    assert model_loading.kv_pool_budget(settings.model_copy(update={"kv_pool_gib": 3.0}), cuda, 2 * gib) == 3 * gib
    assert model_loading.kv_pool_budget(settings, torch.device("cpu"), 2 * gib) == 2 * gib  # CPU: 2 GiB, no carve-out
    # A separate reward model: both models loaded, the two pools split what
    # is left after the weights and both caches (regression: the first pool
    # took it all and the reward model's could not start).
    first = model_loading.kv_pool_budget(settings, cuda, reserved_bytes=4 * gib, share=2)
    assert first == (40 - 10 - 4) * gib // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib - first, 80 * gib))
    assert model_loading.kv_pool_budget(settings, cuda, reserved_bytes=4 * gib, share=1) == first
