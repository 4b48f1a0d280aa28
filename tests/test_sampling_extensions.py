"""vLLM's sampling extensions (top_k, min_p, repetition_penalty, min_tokens)
and OpenAI's logit_bias: the pure functions (pad_core/sampling.py), then the
engine on the tiny model, for plain rows and for PAD's guided rows (where
they act on the base distribution, hence on the prescreen and the score)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pad_core.sampling import (
    allowed_mask,
    apply_logit_bias,
    apply_repetition_penalty,
    apply_sampling_controls,
    filter_top_k_min_p,
)
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams, TextRequest
from pad_core.errors import InvalidRequestError

NEG = float("-inf")
MESSAGES = [{"role": "user", "content": "How do I sleep better at night?"}]
PREF = [Preference("I like short answers with a bit of humour")]


def test_top_k_keeps_the_k_best_and_min_p_is_relative_to_the_best_at_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    out = filter_top_k_min_p(logits, torch.tensor([2, 0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert out[0].tolist() == [3.0, 2.0, NEG, NEG] and out[1].tolist() == logits[1].tolist()
    # p >= min_p * p_max  <=>  l - l_max >= T log(min_p): log 0.25 ~ -1.39 keeps gaps up to 1.39 at T = 1, 2.77 at T = 2
    min_p = torch.tensor([0.25, 0.25])
    out = filter_top_k_min_p(logits, torch.tensor([0, 0]), min_p, torch.tensor([1.0, 2.0]))
    assert out[0].tolist() == [3.0, 2.0, NEG, NEG]
    assert out[1].tolist() == [3.0, 2.0, 1.0, NEG]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, torch.tensor([2.0])).tolist() == [[1.0, -4.0, 2.0]]


def test_logit_bias_adds_and_ignores_ids_outside_the_vocabulary():
    logits = torch.zeros(2, 3)
    out = apply_logit_bias(logits, [0, 1, 1], [2, 0, 7], [5.0, -1.0, 3.0])
    assert out.tolist() == [[0.0, 0.0, 5.0], [-1.0, 0.0, 0.0]] and logits.abs().sum() == 0


@dataclasses.dataclass
class _Request:
    sampling: SamplingParams
    prompt_ids: list[int]
    bad_words_ids: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass
class _State:
    request: _Request
    generated: list[int]
    stop_token_ids: frozenset[int]

    def allowed_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        return allowed_mask(self.request.sampling.allowed_token_ids, vocab, device)


def test_controls_are_free_when_unused_and_min_tokens_masks_stop_tokens():
    logits = torch.zeros(1, 5)
    plain = _State(_Request(SamplingParams(), [1]), [], frozenset({4}))
    assert apply_sampling_controls(logits, [plain]) is logits
    early = _State(_Request(SamplingParams(min_tokens=2), [1]), [3], frozenset({4}))
    late = _State(_Request(SamplingParams(min_tokens=2), [1]), [3, 3], frozenset({4}))
    out = apply_sampling_controls(torch.zeros(2, 5), [early, late])
    assert out[0, 4] == NEG and out[1, 4] == 0 and bool(torch.isfinite(out[:, :4]).all())


def test_sampling_params_bounds():
    for bad in ({"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0.0}, {"repetition_penalty": 3.0},
                {"min_tokens": 5, "max_tokens": 2}, {"logit_bias": ((1, 200.0),)}, {"logit_bias": ((-1, 1.0),)}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad).verify()
    SamplingParams(top_k=5, min_p=0.5, repetition_penalty=1.3, min_tokens=2, max_tokens=4,
                   logit_bias=((3, -100.0),)).verify()


# ---- the engine --------------------------------------------------------
def run(engine, *requests) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for output in engine.generate(list(requests)):
        assert output.finish_reason != "error", output.error
        tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return tokens


def chat(rid: str, preferences=(), **sampling) -> ChatRequest:
    params = {"max_tokens": 8, "temperature": 1.0, "seed": 3, **sampling}
    return ChatRequest(rid, MESSAGES, list(preferences), SamplingParams(**params), GuidanceParams(weight=4.0))


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_top_k_1_or_min_p_1_sample_the_base_argmax(make_engine, preferences):
    """Sampling at temperature 1 restricted to one token is greedy decoding
    of the base distribution: for PAD too, since the prescreen then keeps
    only that token, whatever the reward says."""
    engine = make_engine()
    tokens = run(engine, chat("k", preferences, top_k=1), chat("p", preferences, min_p=1.0),
                 chat("greedy", (), temperature=0.0))
    assert tokens["k"] == tokens["p"] == tokens["greedy"]
    assert run(make_engine(), chat("free", preferences))["free"] != tokens["greedy"]  # it does sample otherwise


def test_logit_bias_and_min_tokens_in_the_engine(make_engine, tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = tokenizer(" sleep", add_special_tokens=False)["input_ids"][0]
    engine = make_engine()
    tokens = run(engine, chat("bias", logit_bias=((word, 100.0),)),
                 chat("eos", logit_bias=((eos, 100.0),)),
                 chat("late", logit_bias=((eos, 100.0),), min_tokens=3))
    assert tokens["bias"] == [word] * 8
    assert tokens["eos"] == [eos]  # ends at once
    assert len(tokens["late"]) == 4 and tokens["late"][-1] == eos and eos not in tokens["late"][:3]


def test_repetition_penalty_acts_on_the_first_token(make_engine, tiny_model, tokenizer):
    """" sleep" is in the prompt. Biased to beat the best other token by 1,
    it is the greedy first token; with repetition_penalty 2 its (positive)
    logit is halved and it loses. Plain and PAD rows alike."""
    engine = make_engine()
    word = tokenizer(" sleep", add_special_tokens=False)["input_ids"][0]
    prompt = engine.prompts.encode_request(MESSAGES, [], False)[0]
    assert word in prompt
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
    others = logits.clone()
    others[word] = NEG
    best_other = float(others.max())
    assert best_other > 2.0  # so that halving it loses
    bias = ((word, best_other - float(logits[word]) + 1.0),)
    tokens = run(engine, chat("biased", temperature=0.0, logit_bias=bias, max_tokens=1),
                 chat("penalised", temperature=0.0, logit_bias=bias, max_tokens=1, repetition_penalty=2.0),
                 chat("pad-penalised", PREF, temperature=0.0, logit_bias=bias, max_tokens=1, repetition_penalty=2.0))
    assert tokens["biased"] == [word]
    assert tokens["penalised"] != [word] and tokens["pad-penalised"] != [word]


def test_text_requests_render_no_chat_template(make_engine, tokenizer):
    from pad_core.worker import prepare_text

    engine = make_engine()
    request = TextRequest("t", "Once upon a time", PREF, SamplingParams(max_tokens=3, temperature=0.0),
                          GuidanceParams(weight=2.0))
    generation = prepare_text(engine, request)
    assert generation.prompt_ids == tokenizer("Once upon a time")["input_ids"]
    reward = tokenizer.decode(list(generation.reward_prompts[0].prompt_ids))
    assert reward.startswith("[Guidelines]") and "short answers" in reward and reward.endswith("\n\nOnce upon a time")
    ids = TextRequest("ids", [1, 2, 3], [], SamplingParams(max_tokens=2, temperature=0.0))
    assert prepare_text(engine, ids).prompt_ids == [1, 2, 3]
    engine.add_request(generation)
    outputs = [o for o in engine.generate([]) if o.request_id == "t"]
    assert sum(len(o.token_ids) for o in outputs) == 3 and outputs[-1].finish_reason == "length"


def test_top_k_with_a_grammar_keeps_the_best_legal_tokens(make_engine):
    """The grammar's mask comes before top_k: top_k = 1 is the best legal
    token (greedy under the grammar), never an empty row."""
    from pad_core.types import StructuredOutput

    engine = make_engine()
    schema = StructuredOutput("json_schema", json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                          "required": ["ok"], "additionalProperties": False})

    def structured(rid, **sampling):
        request = chat(rid, **{"max_tokens": 30, **sampling})
        return dataclasses.replace(request, structured=schema)

    tokens = run(engine, structured("k", top_k=1), structured("greedy", temperature=0.0),
                 structured("p", top_k=3, min_p=0.5, temperature=0.7))
    assert tokens["k"] == tokens["greedy"]
    assert engine.tokenizer.decode(tokens["k"]).startswith('{"ok": ')
