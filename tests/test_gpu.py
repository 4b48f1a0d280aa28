"""CUDA checks (skipped without a GPU): the engine runs its rows on the
device, PAD and plain decoding agree with the CPU run of the same model."""

from __future__ import annotations

import pytest
import torch

from pad_core.engine import PadEngine
from pad_core.settings import EngineSettings
from pad_core.testing import tiny_model
from pad_core.types import ChatRequest, Preference, SamplingParams

pytestmark = pytest.mark.gpu

MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


def _tokens(engine: PadEngine, preferences) -> list[int]:
    request = ChatRequest("r", MESSAGES, preferences, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    return [t for output in engine.generate([request]) for t in output.token_ids]


@pytest.mark.parametrize("preferences", [[], [Preference("short answers")]])
def test_cuda_float32_matches_cpu(tokenizer, preferences):
    cpu = PadEngine.from_models(tiny_model(tokenizer), tokenizer, EngineSettings())
    cuda = PadEngine.from_models(tiny_model(tokenizer).to("cuda"), tokenizer, EngineSettings(device="cuda"))
    assert cuda.runners["base"].device.type == "cuda"
    assert _tokens(cuda, preferences) == _tokens(cpu, preferences)


def test_cuda_sampling_with_a_seed_is_reproducible(tokenizer):
    engine = PadEngine.from_models(tiny_model(tokenizer).to("cuda"), tokenizer, EngineSettings(device="cuda"))
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    runs = [
        [t for o in engine.generate([ChatRequest(f"r{i}", MESSAGES, [Preference("humour")], sampling)]) for t in o.token_ids]
        for i in range(2)
    ]
    assert runs[0] == runs[1]


def test_embedded_model_loads_in_bfloat16_on_cuda():
    engine = PadEngine.from_settings(EngineSettings(device="cuda"))
    assert next(engine.runners["base"].model.parameters()).dtype == torch.bfloat16
    assert len(_tokens(engine, [Preference("short answers")])) == 16
