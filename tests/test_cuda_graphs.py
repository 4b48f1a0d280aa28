"""The decode step CUDA graphs record (pad_core/cuda_graphs.py and the slots
runner's `_decode_step`), checked on the CPU for what a graph needs:

- no host synchronisation and no Python branching on tensor values inside
  the step: dynamo traces it as one graph (`fullgraph=True` fails on a
  graph break: .item(), .tolist(), nonzero, `if tensor`);
- inputs at fixed addresses: no buffer the step reads is ever replaced, as
  rows join, decode and leave (a graph would keep reading the old one);
- idempotence: running the step again on the same inputs changes nothing
  (it runs for warm-up, is recorded, then replayed);
- a capture that fails falls back to eager decoding, with the same tokens.

Recording and replaying real graphs, and their tokens against the
transformers runner, are tests/test_gpu.py's (CUDA only).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_engine import PREF, PREF2, chat
from test_lora import save_random_adapter
from test_runner import ids
from test_slot_runner import check, decode_step, tokens_by_request

from pad_core.cuda_graphs import EagerSteps, GraphedSteps, graph_batch_buckets, read_length_bucket
from pad_core.errors import ModelLoadError
from pad_core.runner import BASE_RUNNER, NewRow
from pad_core.settings import EngineSettings
from pad_core.slot_runner import SlotRunner
from pad_core.testing import tiny_model as new_tiny_model
from pad_core.types import Preference, SamplingParams

# ---- pure pieces -------------------------------------------------------------------


def test_read_lengths_are_powers_of_two_within_the_slot():
    assert [read_length_bucket(n, 1024) for n in (1, 64, 65, 128, 129, 700, 1024)] == [64, 64, 128, 128, 256, 1024, 1024]
    assert read_length_bucket(90, 100) == 100  # capped by the slot
    assert read_length_bucket(3, 512, smallest=1) == 4
    with pytest.raises(ValueError, match="do not fit"):
        read_length_bucket(101, 100)


def test_batch_buckets_follow_nano_vllm():
    assert graph_batch_buckets(96) == (1, 2, 4, 8, 16, 32, 48, 64, 80, 96)
    assert graph_batch_buckets(100) == (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100)
    assert graph_batch_buckets(9) == (1, 2, 4, 8, 9)
    assert graph_batch_buckets(1) == (1,)


# ---- the step ------------------------------------------------------------------------


@pytest.fixture
def lora_model(tokenizer, tmp_path):
    """A tiny model with two reward adapters installed."""
    runner = SlotRunner(new_tiny_model(tokenizer), slots=8, slot_tokens=128, pad_token_id=tokenizer.pad_token_id,
                        batch_buckets=graph_batch_buckets(8))
    for seed, name in enumerate(("one", "two")):
        folder = tmp_path / name
        save_random_adapter(folder, tokenizer, seed)
        runner.add_adapter(name, folder)
    return runner


def join_mixed_rows(runner: SlotRunner) -> None:
    """Rows of every adapter and none, then a hole (a free slot inside the batch)."""
    runner.prefill([NewRow("a", ids(5, 1)), NewRow("b", ids(9, 2), "one"), NewRow("c", ids(3, 3), "two"),
                    NewRow("d", ids(7, 4), "one")])
    runner.remove({"c"})


def test_the_decode_step_traces_as_one_graph_with_adapters_and_free_slots(lora_model):
    runner = lora_model
    join_mixed_rows(runner)
    batch = runner.batch_size
    read = read_length_bucket(runner._longest + 1, runner.slot_tokens)
    runner._tokens[:batch] = torch.tensor(ids(batch, 9))
    runner._graphed_adapters = tuple(sorted(runner.lora.names))
    with torch.inference_mode():
        eager = runner._decode_step(batch, read).clone()
        torch._dynamo.reset()
        traced = torch.compile(lambda: runner._decode_step(batch, read), backend="eager", fullgraph=True)
        torch.testing.assert_close(traced(), eager, atol=1e-5, rtol=0)  # traced ops may round otherwise
    torch._dynamo.reset()


def test_the_step_reads_buffers_that_never_move(lora_model):
    runner = lora_model
    runner.prefill([NewRow("x", ids(4, 7), "two")])  # masks exist for every adapter from here on
    runner.decode(torch.zeros(runner.batch_size, dtype=torch.long))

    def addresses():
        tensors = [runner._tokens, runner.lengths, runner.live, runner._slot_ids, runner._columns,
                   *runner._adapter_masks.values()]
        tensors += [t for layer in runner.cache.layers for t in (layer.key_pool, layer.value_pool)]
        return [t.data_ptr() for t in tensors]

    before = addresses()
    assert sorted(runner._adapter_masks) == ["one", "two"]
    join_mixed_rows(runner)
    for step in range(3):
        runner.decode(torch.tensor(ids(runner.batch_size, 20 + step)))
    runner.remove({"a", "x"})
    runner.prefill([NewRow("e", ids(70, 5), "two")])  # a longer row: a wider read bucket
    runner.decode(torch.tensor(ids(runner.batch_size, 30)))
    assert addresses() == before
    masks = runner._adapter_masks
    for slot, adapter in enumerate(runner._adapters):  # the masks follow the rows in place
        assert [masks["one"][slot].item(), masks["two"][slot].item()] == [adapter == "one", adapter == "two"]


def test_running_the_step_again_changes_nothing(lora_model):
    runner = lora_model
    join_mixed_rows(runner)
    batch, read = runner.batch_size, read_length_bucket(runner._longest + 1, runner.slot_tokens)
    runner._tokens[:batch] = torch.tensor(ids(batch, 11))
    runner._graphed_adapters = tuple(sorted(runner.lora.names))
    with torch.inference_mode():
        first = runner._decode_step(batch, read).clone()
        pools = [layer.key_pool.clone() for layer in runner.cache.layers]
        second = runner._decode_step(batch, read)
    assert torch.equal(first, second)
    assert all(torch.equal(layer.key_pool, pool) for layer, pool in zip(runner.cache.layers, pools, strict=True))


class CountingSteps(EagerSteps):
    """Eager steps that note the keys asked for (what GraphedSteps would record)."""

    def __init__(self):
        self.keys = []
        self.cleared = 0

    def run(self, key, step):
        self.keys.append(key)
        return step()

    def clear(self):
        self.cleared += 1


def test_keys_are_batch_bucket_read_bucket_and_adapters(tiny_model, tokenizer, tmp_path):
    steps = CountingSteps()
    runner = SlotRunner(tiny_model, slots=20, slot_tokens=256, batch_buckets=graph_batch_buckets(20), steps=steps)
    runner.prefill([NewRow(i, ids(60 + i, i)) for i in range(3)])
    for step in range(4):  # the longest row crosses 64 columns: the read bucket doubles
        runner.decode(torch.tensor(ids(runner.batch_size, step)))
    assert steps.keys == [(4, 64, ()), (4, 64, ()), (4, 128, ()), (4, 128, ())]
    runner.prefill([NewRow(9, ids(5, 9))])
    runner.decode(torch.tensor(ids(runner.batch_size, 9)))
    assert steps.keys[-1] == (4, 128, ())
    adapted = SlotRunner(new_tiny_model(tokenizer), slots=20, slot_tokens=256, steps=steps)
    save_random_adapter(tmp_path / "one", tokenizer, 0)
    adapted.prefill([NewRow(0, ids(5, 0))])
    adapted.decode(torch.tensor([1]))
    cleared = steps.cleared
    adapted.add_adapter("one", tmp_path / "one")
    adapted.decode(torch.tensor([1]))
    assert steps.keys[-1] == (1, 64, ("one",)) and steps.cleared == cleared + 1  # older graphs are dropped


def test_unloading_an_adapter_drops_the_graphs_recorded_with_it(tokenizer, tmp_path):
    """Before any decode: an adapter loaded again under its name gives the
    same key, and must not replay graphs that read the old weights and mask."""
    steps = CountingSteps()
    runner = SlotRunner(new_tiny_model(tokenizer), slots=4, slot_tokens=64, steps=steps)
    save_random_adapter(tmp_path / "one", tokenizer, 0)
    runner.add_adapter("one", tmp_path / "one")
    runner.prefill([NewRow(0, ids(5, 0), "one")])
    runner.decode(torch.tensor([1]))
    runner.remove([0])
    cleared = steps.cleared
    runner.remove_adapter("one")
    assert steps.cleared == cleared + 1 and "one" not in runner._adapter_masks
    runner.add_adapter("one", tmp_path / "one")
    runner.prefill([NewRow(1, ids(5, 1), "one")])
    runner.decode(torch.tensor([1]))
    assert steps.keys[-1] == (1, 64, ("one",)) and steps.cleared == cleared + 2  # recorded again, on its own


def test_a_failed_capture_decodes_eagerly_with_the_same_hidden_states(tiny_model, caplog):
    """On this CPU, recording fails for real (no CUDA stream can be made):
    the runner warns once and decodes eagerly."""
    rows = [NewRow(i, ids(3 + 5 * i, i)) for i in range(3)]
    eager = SlotRunner(tiny_model, slots=4, slot_tokens=64)
    graphed = SlotRunner(tiny_model, slots=4, slot_tokens=64, steps=GraphedSteps(torch.device("cpu")))
    for runner in (eager, graphed):
        runner.prefill(rows)
    with caplog.at_level(logging.WARNING, logger="pad_core.cuda_graphs"):
        for step in range(3):
            tokens = torch.tensor(ids(3, 40 + step))
            torch.testing.assert_close(graphed.decode(tokens), eager.decode(tokens), atol=0, rtol=0)
    assert graphed.steps.graphs == 0
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "decoding without graphs" in caplog.records[0].message


# ---- the backend setting -----------------------------------------------------------------


def test_auto_is_cuda_on_a_gpu_and_transformers_on_the_cpu(make_engine):
    settings = EngineSettings()
    assert settings.backend == "auto"
    assert settings.resolved_backend("cuda") == "cuda" and settings.resolved_backend("cpu") == "transformers"
    assert EngineSettings(backend="slots").resolved_backend("cuda") == "slots"
    with pytest.raises(ModelLoadError, match="cuda backend needs a CUDA device"):
        make_engine(backend="cuda")


def test_the_engine_over_graph_buckets_and_mixed_adapters_chooses_the_reference_tokens(make_engine, tokenizer,
                                                                                     tmp_path):
    """What the cuda backend runs, less the recording: graph batch buckets
    (dummy rows past the live ones), bucketed reads, LoRA rows beside self
    rows and plain rows, requests joining and leaving."""
    save_random_adapter(tmp_path / "one", tokenizer, 0)
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = [
        chat("lora", "mid", [Preference("short")], sampling, reward_model="one"),
        chat("self", "short", [PREF, PREF2], sampling),
        chat("plain", "long", sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
        chat("seeded", "xlong", [PREF], SamplingParams(temperature=1.0, seed=5, max_tokens=7), reward_model="one"),
    ]
    reference = make_engine(model=new_tiny_model(tokenizer))
    pooled = make_engine(model=new_tiny_model(tokenizer), backend="slots", kv_pool_gib=0.03, max_running_requests=3)
    runner = pooled.runners[BASE_RUNNER]
    runner.buckets = graph_batch_buckets(runner.shape.slots)
    for engine in (reference, pooled):
        engine.add_reward_adapter("one", str(tmp_path / "one"))
    assert tokens_by_request(pooled, *copy.deepcopy(requests)) == tokens_by_request(reference, *requests)
    assert runner.num_rows == 0 and not any(mask.any() for mask in runner._adapter_masks.values())


def test_graphs_are_recorded_ahead_for_every_bucket_and_serving_then_records_none(tiny_model):
    class Recording(CountingSteps):
        records = True

        @property
        def graphs(self):
            return len(set(self.keys))

    steps = Recording()
    runner = SlotRunner(tiny_model, slots=10, slot_tokens=200, batch_buckets=graph_batch_buckets(10), steps=steps)
    assert runner.record_graphs() == 5 * 3  # batch 10, 8, 4, 2, 1 x read 64, 128, 200
    assert steps.keys[0] == (10, 64, ()) and steps.keys[-1] == (1, 200, ())
    assert not runner.lengths.any() and not runner.live.any()
    recorded = set(steps.keys)
    contexts = {"a": ids(70, 1), "b": ids(5, 2), "c": ids(33, 3)}
    runner.prefill([NewRow(key, context) for key, context in contexts.items()])
    for step in range(3):  # the recording's dummy steps left nothing behind
        check(runner, decode_step(runner, contexts, step), contexts, tiny_model)
    assert set(steps.keys) == recorded  # every step served from a recorded key
    with pytest.raises(RuntimeError, match="before rows join"):
        runner.record_graphs()
    assert SlotRunner(tiny_model, slots=2, slot_tokens=64).record_graphs() == 0  # eager: nothing to record
