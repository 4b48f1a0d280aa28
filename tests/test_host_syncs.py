"""A decode step reads one thing back from the device: the chosen tokens
(issue 15: "the PAD rule ... with one device -> host copy of the chosen
tokens per step"), and sends its small inputs without a blocking copy.
Audited on the CPU with tests/sync_audit.py; on CUDA, tests/test_gpu.py
runs the same loads under torch.cuda.set_sync_debug_mode."""

from __future__ import annotations

import pytest
from sync_audit import audit_steps
from test_engine import PREF, PREF2, chat

from pad_core.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)

LOADS = {
    "plain greedy": [chat("a", "short", sampling=GREEDY), chat("b", "long", sampling=GREEDY)],
    "PAD greedy": [chat("a", "short", [PREF], sampling=GREEDY), chat("b", "long", [PREF, PREF2], sampling=GREEDY)],
    "mixed, sampled": [chat("a", "short", [PREF], sampling=SAMPLED), chat("b", "mid", sampling=GREEDY),
                       chat("c", "long", sampling=SAMPLED), chat("d", "xlong", [PREF2], weight=2.0, top_k=5,
                                                                 min_p=0.0, sampling=GREEDY)],
}


@pytest.mark.parametrize("backend", ["transformers", "slots"])
@pytest.mark.parametrize("load", list(LOADS))
def test_a_decode_step_reads_back_only_the_chosen_tokens(make_engine, backend, load):
    engine = make_engine(backend=backend, kv_pool_gib=0.03)
    for request in LOADS[load]:
        engine.add_chat(request)
    engine.step()  # the prefill (its first tokens are read back too; not audited)
    steps = 4
    audit = audit_steps(engine, steps)
    assert audit.blocking_copies == []
    assert len(audit.reads) == steps, audit.reads
    assert all("engine.py" in read and "tokens.tolist()" in read for read in audit.reads), audit.reads
    assert all(state.generated and len(state.generated) == 1 + steps for state in engine.running)


def test_the_audit_sees_a_read_and_a_blocking_copy(make_engine, monkeypatch):
    """The audit is not blind: a device read and a blocking copy put back
    into the step are both reported."""
    import torch

    import pad_core.decoding as decoding

    original = decoding.prescreen

    def syncing_prescreen(base, top_k, min_p=None, k_max=None):
        torch.tensor([1, 2], device=base.device)  # a blocking host -> device copy
        return original(base, top_k, min_p)  # no k_max: read from the device

    monkeypatch.setattr(decoding, "prescreen", syncing_prescreen)
    engine = make_engine()
    engine.add_chat(chat("a", "short", [PREF], sampling=GREEDY))
    engine.step()
    audit = audit_steps(engine, 1)
    assert any("guidance.py" in read and "top_k.max()" in read for read in audit.reads), audit.reads
    assert len(audit.blocking_copies) == 1, audit.blocking_copies
