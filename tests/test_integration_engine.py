"""A few end-to-end checks on the real embedded SmolLM2-135M-Instruct (float32).

Greedy parity with transformers: identical tokens up to the first step whose
two best logits are within 1e-4 (the engine's cached, batched forward and
generate()'s differ in float reduction order); the test asserts that at least
12 steps were compared before any such near-tie.
"""

from __future__ import annotations

import math

import pytest
import torch

from pad_core.model_loading import load_engine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams

pytestmark = pytest.mark.integration

TIE = 1e-4
QUESTION = [{"role": "user", "content": "How do I sleep better?"}]
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
PIRATE = Preference("Answer like a pirate, with lots of humour")


@pytest.fixture(scope="module")
def engine():
    return load_engine(EngineSettings(dtype="float32"))


def collect(engine, *requests):
    results = {}
    for output in engine.generate(requests):
        entry = results.setdefault(output.request_id, {"tokens": [], "text": "", "finish": None})
        entry["tokens"] += output.token_ids
        entry["text"] += output.text
        assert entry["finish"] is None  # nothing after the finishing output
        entry["finish"] = output.finish_reason
    return results


def test_greedy_equals_transformers_generate(engine):
    max_tokens = 24
    result = collect(engine, ChatRequest("r", QUESTION, sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens)))["r"]
    model = engine.runners["base"].model
    prompt_ids = engine.prompts.encode(QUESTION)
    with torch.inference_mode():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = generated.sequences[0, len(prompt_ids) :].tolist()
    gaps = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in generated.logits]
    horizon = next((i for i, gap in enumerate(gaps) if gap < TIE), len(expected))
    assert horizon >= 12
    assert result["tokens"][:horizon] == expected[:horizon]
    if horizon == len(expected):
        assert result["tokens"] == expected


def test_preference_changes_the_answer_and_finish_reasons(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    results = collect(
        engine,
        ChatRequest("plain", HELLO, sampling=greedy),
        # min_p 0 (no prescreen floor): with the default floor (0.1) this answer runs past 32 tokens.
        ChatRequest("pirate", HELLO, [PIRATE], sampling=greedy, guidance=GuidanceParams(weight=2.0, min_p=0.0)),
        ChatRequest("short", QUESTION, sampling=SamplingParams(temperature=0.0, max_tokens=4)),
    )
    plain, pirate = results["plain"], results["pirate"]
    assert plain["text"].strip() and pirate["text"].strip()
    assert pirate["tokens"] != plain["tokens"] and pirate["text"] != plain["text"]
    # The instruct model ends its turn by itself: <|im_end|>, finish "stop", no marker in the text.
    eos = engine.tokenizer.eos_token_id
    for result in (plain, pirate):
        assert result["finish"] == "stop" and result["tokens"][-1] == eos
        assert "<|im_end|>" not in result["text"]
    assert results["short"]["finish"] == "length" and len(results["short"]["tokens"]) == 4

    # A stop string taken from the plain answer ends it right before that string.
    words = plain["text"].split()
    assert len(words) >= 3
    stop = " " + words[2]
    stopped = collect(engine, ChatRequest("stopped", HELLO, sampling=SamplingParams(temperature=0.0, max_tokens=32, stop=(stop,))))
    assert stopped["stopped"]["finish"] == "stop"
    assert stopped["stopped"]["text"] == plain["text"][: plain["text"].index(stop)]



@torch.inference_mode()
def pad_reference(model, base_ids, reward_ids, tokens, weight=1.0, top_k=10, min_p=0.0) -> tuple[list[int], list[float]]:
    """Per step of `tokens` (teacher forced): the PAD greedy choice, and the smaller of the gap between the two best PAD
    scores, the gap between the k-th and (k+1)-th base logits and the distance
    to the prescreen's floor p(a) >= min_p * max p (DESIGN steps 1-4, one
    preference), from one uncached forward over each whole context."""
    steps = len(tokens)
    base_all = model(torch.tensor([list(base_ids) + tokens])).logits[0, len(base_ids) - 1 : len(base_ids) - 1 + steps]
    reward_all = model(torch.tensor([list(reward_ids) + tokens])).logits[0, len(reward_ids) - 1 : len(reward_ids) - 1 + steps]
    choices, gaps = [], []
    for base, reward in zip(base_all.double(), reward_all.double(), strict=True):
        ranked = base.topk(top_k + 1)
        cand = ranked.indices[:top_k]
        floor_gap = float("inf")
        if min_p > 0:
            log_ratio = ranked.values[:top_k] - ranked.values[0]
            floor_gap = float((log_ratio - math.log(min_p)).abs().min())
            cand = cand[log_ratio >= math.log(min_p)]
        scores = base[cand] + weight * (reward[cand].log_softmax(0) - base[cand].log_softmax(0))
        best = scores.topk(min(2, len(cand)))
        choices.append(int(cand[best.indices[0]]))
        score_gap = float(best.values[0] - best.values[1]) if len(cand) > 1 else float("inf")
        gaps.append(min(score_gap, floor_gap, float(ranked.values[top_k - 1] - ranked.values[top_k])))
    return choices, gaps


def test_guided_greedy_is_the_same_alone_and_batched(engine):
    """PAD greedy on the real model follows the rule (checked against a
    from-scratch reference) and gives identical tokens alone and in a batch with
    requests of other prompt lengths (one sampling, one finishing early), up to
    the first step whose PAD decision is a near-tie (gap < 1e-4, recomputed from
    scratch); at least 8 steps must be compared."""
    sampling = SamplingParams(temperature=0.0, max_tokens=16)
    target = ChatRequest("target", QUESTION, [PIRATE], sampling=sampling)
    alone = collect(engine, target)["target"]
    others = [
        ChatRequest("other-1", HELLO, sampling=SamplingParams(temperature=0.0, max_tokens=6)),
        ChatRequest("other-2", [{"role": "user", "content": "Tell me about the history of tea in England, please."}],
                    [Preference("formal tone")], sampling=SamplingParams(temperature=0.8, seed=1, max_tokens=20)),
    ]
    batched = collect(engine, others[0], target, others[1])["target"]
    base_ids, (reward_ids,) = engine.prompts.encode_request(QUESTION, [PIRATE], False)
    choices, gaps = pad_reference(
        engine.runners["base"].model, base_ids, reward_ids, alone["tokens"],
        weight=engine.settings.default_weight, top_k=engine.settings.default_top_k, min_p=engine.settings.default_min_p,
    )
    horizon = next((i for i, gap in enumerate(gaps) if gap < TIE), len(gaps))
    assert horizon >= 8
    assert alone["tokens"][:horizon] == choices[:horizon]  # the engine follows the PAD rule on the real model
    assert batched["tokens"][:horizon] == alone["tokens"][:horizon]
    if horizon == len(gaps):
        assert batched["tokens"] == alone["tokens"]


def test_shipped_persrm_adapter_loads_at_run_time_and_steers(engine):
    """results/persrm/adapter (trained by scripts/persrm-experiment.sh)
    fits the embedded model (fingerprint and shapes), serves next to `self`,
    and its rewards change the greedy answer; base-only rows are untouched."""
    from pathlib import Path

    adapter = Path(__file__).resolve().parents[1] / "results" / "persrm" / "adapter"
    if "persrm" not in engine.reward_sources:
        engine.add_reward_adapter("persrm", str(adapter))
    sampling = SamplingParams(temperature=0.0, max_tokens=24)
    brevity = [Preference("Keep your answers brief, under 50 words.")]
    plain_before = collect(engine, ChatRequest("p0", QUESTION, sampling=sampling))["p0"]
    results = collect(
        engine,
        ChatRequest("self", QUESTION, brevity, sampling, GuidanceParams(reward_model="self")),
        ChatRequest("persrm", QUESTION, brevity, sampling, GuidanceParams(reward_model="persrm")),
        ChatRequest("plain", QUESTION, sampling=sampling),
    )
    assert results["persrm"]["tokens"] != results["self"]["tokens"]
    assert results["plain"]["tokens"] == plain_before["tokens"]
