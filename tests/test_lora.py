"""Batched multi-LoRA (pad_core/lora.py): rows of different adapters and
rows without one share a forward and each gets what peft computes for it
alone; unsupported or mismatched adapters are refused clearly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from pad_core.errors import InvalidRequestError, ModelLoadError, UnknownRewardModelError
from pad_core.lora import NO_ADAPTER
from pad_core.model_loading import attach_adapters
from pad_core.runner import BASE_RUNNER, NewRow, TransformersRunner
from pad_core.testing import tiny_model
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9], [7, 7, 1000], [12, 800, 64, 3, 2, 99, 4]]


def save_random_adapter(folder, tokenizer, seed: int, **config) -> None:
    """A LoRA adapter with random (non-zero) A and B, so it changes outputs."""
    lora = LoraConfig(
        r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8),
        target_modules=config.pop("target_modules", ["q_proj", "v_proj", "o_proj"]), **config,
    )
    model = get_peft_model(tiny_model(tokenizer), lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer):
    folders = {}
    for seed, name in enumerate(["one", "two"]):
        folder = tmp_path_factory.mktemp(name)
        save_random_adapter(folder, tokenizer, seed, use_rslora=(name == "two"), r=4 + 4 * seed)
        folders[name] = folder
    return folders


def peft_logits(tokenizer, folder, prompt) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_model(tokenizer), folder).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0, -1]


def base_logits(tokenizer, prompt) -> torch.Tensor:
    with torch.inference_mode():
        return tiny_model(tokenizer)(torch.tensor([prompt])).logits[0, -1]


def test_mixed_batch_rows_match_peft_for_their_own_adapter(tokenizer, adapters):
    runner = TransformersRunner(tiny_model(tokenizer))
    attach_adapters(runner, adapters)
    row_adapters = ["one", "__base__", "two"]
    hidden = runner.prefill([NewRow(i, p, a) for i, (p, a) in enumerate(zip(PROMPTS, row_adapters))])
    logits = runner.head.full(hidden)
    torch.testing.assert_close(logits[0], peft_logits(tokenizer, adapters["one"], PROMPTS[0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], base_logits(tokenizer, PROMPTS[1]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[2], peft_logits(tokenizer, adapters["two"], PROMPTS[2]), rtol=1e-4, atol=1e-4)


def test_decode_steps_of_a_mixed_batch_match_each_row_alone(tokenizer, adapters):
    """Rows joining and leaving change the masks; each row's outputs stay the
    ones it gets in a batch of its own."""
    def run(rows, steps=4):
        runner = TransformersRunner(tiny_model(tokenizer))
        attach_adapters(runner, adapters)
        runner.prefill(rows)
        out = []
        for step in range(steps):
            out.append(runner.head.full(runner.decode(torch.tensor([11 + step] * runner.num_rows))))
        return torch.stack(out, dim=1)  # [rows, steps, vocab]

    rows = [NewRow(i, p, a) for i, (p, a) in enumerate(zip(PROMPTS, ["two", "one", "__base__"]))]
    together = run(rows)
    for index, row in enumerate(rows):
        torch.testing.assert_close(together[index], run([row])[0], rtol=1e-4, atol=1e-4)


def test_runtime_adapter_serves_requests_next_to_self(tokenizer, adapters, make_engine):
    engine = make_engine(model=tiny_model(tokenizer))
    engine.add_reward_adapter("one", str(adapters["one"]))
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = [
        ChatRequest(f"r{i}", [{"role": "user", "content": "Hi?"}], [Preference("short")], sampling, GuidanceParams(reward_model=rm))
        for i, rm in enumerate(["one", "self", "one"])
    ]
    outputs = {}
    for output in engine.generate(requests):
        outputs.setdefault(output.request_id, []).extend(output.token_ids)
    assert all(len(tokens) == 6 for tokens in outputs.values())
    assert outputs["r0"] == outputs["r2"]


def test_dora_adapters_are_refused(tmp_path, tokenizer, make_engine):
    save_random_adapter(tmp_path, tokenizer, 0, use_dora=True)
    with pytest.raises(ModelLoadError, match="DoRA"):
        make_engine(model=tiny_model(tokenizer), reward_adapters={"d": tmp_path})


def test_adapter_for_layers_the_model_lacks_is_refused(tmp_path, tokenizer, make_engine):
    save_random_adapter(tmp_path, tokenizer, 0)
    assert not (tmp_path / "pad_training.json").exists()  # no fingerprint: the layer check must catch it
    with pytest.raises(ModelLoadError, match="does not fit the base model: no linear layer"):
        make_engine(model=tiny_model(tokenizer, num_layers=1), reward_adapters={"x": tmp_path})


def test_adapter_of_another_width_is_refused(tmp_path, tokenizer, make_engine):
    save_random_adapter(tmp_path, tokenizer, 0)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights = {k: (v[:, :32].contiguous() if "lora_A" in k else v) for k, v in weights.items()}
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="64->64, the adapter has 32->64"):
        make_engine(model=tiny_model(tokenizer), reward_adapters={"x": tmp_path})


def test_unknown_weights_in_an_adapter_are_refused(tmp_path, tokenizer, make_engine):
    save_random_adapter(tmp_path, tokenizer, 0, modules_to_save=["lm_head"])
    with pytest.raises(ModelLoadError, match="modules_to_save"):
        make_engine(model=tiny_model(tokenizer), reward_adapters={"m": tmp_path})


def test_an_adapter_named_self_is_refused(tokenizer, adapters, make_engine):
    with pytest.raises(ModelLoadError, match="'self' is taken"):
        make_engine(model=tiny_model(tokenizer), reward_adapters={"self": adapters["one"]})


# ---- unloading an adapter (PadEngine.remove_reward_adapter) -------------------------------------------

BACKENDS = [{}, {"backend": "slots", "kv_pool_gib": 0.03}]
LONG_QUESTION = "Tell me how to plan a week of cheap healthy dinners for a family of four, with a shopping list."


def adapter_chat(request_id: str, reward_model: str, max_tokens: int = 8) -> ChatRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return ChatRequest(request_id, [{"role": "user", "content": LONG_QUESTION}], [Preference("short answers")],
                       sampling, GuidanceParams(reward_model=reward_model))


def answer_tokens(engine, *requests) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for output in engine.generate(requests):
        tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return tokens


@pytest.mark.parametrize("backend", BACKENDS, ids=["transformers", "slots"])
def test_an_unloaded_adapter_finishes_its_running_requests_then_is_freed(tokenizer, adapters, make_engine, backend):
    expected = make_engine(model=tiny_model(tokenizer), **backend)
    expected.add_reward_adapter("one", str(adapters["one"]))
    reference = answer_tokens(expected, adapter_chat("r0", "one"))["r0"]

    engine = make_engine(model=tiny_model(tokenizer), **backend)
    engine.add_reward_adapter("one", str(adapters["one"]))
    engine.add_chat(adapter_chat("r0", "one"))
    engine.add_chat(adapter_chat("queued", "one"))  # taken, not yet admitted: it runs with the adapter too
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    assert engine.remove_reward_adapter("one") == 2
    assert "one" not in engine.model_info()["reward_models"]
    with pytest.raises(UnknownRewardModelError):
        engine.add_chat(adapter_chat("late", "one"))
    with pytest.raises(InvalidRequestError, match="still unloading") as refused:
        engine.add_reward_adapter("one", str(adapters["two"]))
    assert refused.value.code == "unloading"
    runner = engine.runners[BASE_RUNNER]
    assert runner.lora.names == {"one"}  # still in use
    while engine.has_unfinished():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    assert tokens["r0"] == reference and tokens["queued"] == reference
    assert runner.lora.names == set()
    engine.add_reward_adapter("one", str(adapters["two"]))  # the name is free again
    assert "one" in engine.model_info()["reward_models"]


@pytest.mark.parametrize("backend", BACKENDS, ids=["transformers", "slots"])
def test_a_new_adapter_under_an_unloaded_name_never_reads_the_old_ones_cached_kv(tokenizer, adapters, make_engine,
                                                                                 backend):
    """The prefix cache files a reward row's KV under its adapter's name;
    unloading forgets it, or an adapter loaded later under that name would
    start from KV the old weights computed."""
    fresh = make_engine(model=tiny_model(tokenizer), **backend)
    fresh.add_reward_adapter("one", str(adapters["two"]))
    expected = answer_tokens(fresh, adapter_chat("a", "one"))["a"]

    engine = make_engine(model=tiny_model(tokenizer), **backend)
    engine.add_reward_adapter("one", str(adapters["one"]))
    first = answer_tokens(engine, adapter_chat("a", "one"))["a"]
    cache = engine.runners[BASE_RUNNER].prefix_cache
    assert any(entry.adapter == "one" for entry in cache._entries.values())  # the reward row's prompt was kept
    assert engine.remove_reward_adapter("one") == 0  # idle: freed at once
    assert not any(entry.adapter == "one" for entry in cache._entries.values())
    assert any(entry.adapter == NO_ADAPTER for entry in cache._entries.values())  # the base rows' entries stay
    engine.add_reward_adapter("one", str(adapters["two"]))
    second = answer_tokens(engine, adapter_chat("a", "one"))["a"]
    assert second == expected and first != expected


def test_self_and_unknown_reward_models_are_not_unloaded(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="only adapters are unloaded") as refused:
        engine.remove_reward_adapter("self")
    assert refused.value.code == "cannot_unload"
    with pytest.raises(UnknownRewardModelError):
        engine.remove_reward_adapter("nope")
    assert engine.model_info()["reward_models"] == ["self"]
    assert engine.model_info()["reward_model_types"] == {"self": "self"}
