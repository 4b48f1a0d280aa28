"""Shared fixtures for the PAD test suite.

- `tokenizer`: the real SmolLM2 tokenizer (from the converted-weights cache).
- `tiny_model`: one tiny random float32 Llama for the whole session. Models
  are stateless at inference time (the KV caches live in the runners), so
  every engine built by `make_engine` shares it.
- `make_engine(**settings)`: a fresh PadEngine (fresh runners, no requests)
  over the shared tiny model; `engine` is one such engine per test.
- Tests marked `gpu` are skipped when CUDA is not available.
- Hypothesis (and schemathesis) draw the same examples on every run
  (`HYPOTHESIS_PROFILE=explore` for new ones).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings as hypothesis_settings

from pad_core.engine import PadEngine
from pad_core.model_loading import engine_for_model
from pad_core.settings import EngineSettings
from pad_core.testing import embedded_tokenizer
from pad_core.testing import tiny_model as build_tiny_model


# CI starts from a clean clone, with no example database: drawn inputs would
# differ on every run, and a rare draw could fail a run that changed nothing.
# Derandomized, every run draws the same examples (schemathesis's too);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for more.
hypothesis_settings.register_profile("derandomized", derandomize=True)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="session")
def make_engine(tiny_model, tokenizer):
    """Factory: make_engine(model=None, **settings_fields) -> a fresh PadEngine."""

    def factory(model=None, **settings) -> PadEngine:
        return engine_for_model(model if model is not None else tiny_model, tokenizer, EngineSettings(**settings))

    return factory


@pytest.fixture
def engine(make_engine) -> PadEngine:
    return make_engine()
