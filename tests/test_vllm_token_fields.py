"""vLLM's token-level request fields: bad_words, allowed_token_ids,
truncate_prompt_tokens (with truncation_side) and prompt_logprobs. The pure
pieces (pad_core/sampling.py, pad_core/token_controls.py), the engine on the
tiny model (plain and PAD rows), then over HTTP with the openai SDK."""

from __future__ import annotations

import dataclasses
import json
import math

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from server_helpers import tiny_gateway

from pad_core.errors import ContextLengthExceededError
from pad_core.sampling import allowed_mask, banned_by_bad_words, keep_only, token_ranks
from pad_core.token_controls import bad_words_ids, longest, shared_tail, truncate_contexts, truncate_request, truncation_length
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams, TextRequest
from pad_core.worker import prepare_text

MESSAGES = [{"role": "user", "content": "How do I sleep better at night?"}]
PREF = [Preference("I like short answers with a bit of humour")]
MODEL = "smollm2-135m-instruct"


# ---- pure pieces -------------------------------------------------------
def test_a_bad_word_bans_its_last_token_only_after_the_rest():
    words = [(7,), (1, 2, 3)]
    assert banned_by_bad_words(words, []) == [7]
    assert banned_by_bad_words(words, [5, 1]) == [7]
    assert banned_by_bad_words(words, [5, 1, 2]) == [7, 3]
    assert banned_by_bad_words(words, [2]) == [7]


def test_ranks_count_the_strictly_more_likely_tokens():
    log_probs = torch.tensor([[-1.0, -0.5, -2.0, -0.5], [-3.0, -1.0, -1.0, -0.1]])
    chosen = log_probs.gather(1, torch.tensor([[1], [0]])).squeeze(1)
    assert token_ranks(log_probs, chosen).tolist() == [1, 4]


def test_keep_only_leaves_the_allowed_tokens_and_ignores_ids_outside_the_vocabulary():
    logits = torch.zeros(2, 5)
    keep_only(logits, 1, allowed_mask([0, 3, 99, 3], 5, logits.device))
    assert logits[0].tolist() == [0.0] * 5
    assert [math.isfinite(v) for v in logits[1].tolist()] == [True, False, False, True, False]


def test_bad_words_are_tokenized_alone_and_after_a_space(tokenizer):
    ids = bad_words_ids(tokenizer, ["sleep", "  sleep", "good night"])
    bare = tuple(tokenizer.encode("sleep", add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" sleep", add_special_tokens=False))
    assert ids[:2] == (bare, spaced)  # the second word repeats the first once stripped: no duplicates
    assert tuple(tokenizer.encode(" good night", add_special_tokens=False)) in ids
    assert len(set(ids)) == len(ids)


def test_truncation_keeps_the_reward_prompts_preference():
    head_base, head_reward, conversation = [1, 2], [1, 9, 9, 9, 3], list(range(10, 20))
    base, reward = head_base + conversation, head_reward + conversation
    kept_base, (kept_reward,) = truncate_contexts(base, [reward], 6, "left")
    assert kept_base == conversation[-6:]
    assert kept_reward == head_reward + conversation[-6:]  # the preference's head stays
    kept_base, (kept_reward,) = truncate_contexts(base, [reward], 11, "left")  # a cut into the base's head only
    assert kept_base == base[1:] and kept_reward == reward
    kept_base, (kept_reward,) = truncate_contexts(base, [reward], 5, "right")
    assert kept_base == base[:5] and kept_reward == reward[:len(reward) - 7]
    assert truncate_contexts(base, [reward], 50, "left") == (base, [reward])


@settings(deadline=None)  # pure and fast: a pause of a busy machine must not fail it
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.lists(st.integers(0, 5), max_size=10),
       st.integers(1, 40), st.sampled_from(["left", "right"]))
def test_truncation_properties(base, reward_head, keep, side):
    reward = reward_head + base
    kept_base, (kept_reward,) = truncate_contexts(base, [reward], keep, side)
    assert len(kept_base) == min(keep, len(base)) and kept_reward
    expected = base[-keep:] if side == "left" else base[:keep]
    assert kept_base == (expected if keep < len(base) else base)
    if side == "left":  # the reward prompt ends as the base does, and keeps everything before what they share
        assert kept_reward[len(kept_reward) - min(len(kept_base), shared_tail(base, reward)):] == \
            kept_base[len(kept_base) - min(len(kept_base), shared_tail(base, reward)):]
        assert kept_reward[:len(reward) - shared_tail(base, reward)] == reward[:len(reward) - shared_tail(base, reward)]


@settings(deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.lists(st.integers(6, 9), max_size=12),
       st.integers(1, 30), st.integers(20, 60), st.sampled_from(["left", "right"]))
def test_as_many_as_fit_fits_every_context_and_keeps_the_most(base, reward_head, max_tokens, context, side):
    """-1: the longest context (a reward prompt, with its preference) leaves
    room for max_tokens, and the base keeps as much as allows that."""
    reward = reward_head + base
    try:
        kept = truncate_request(base, [reward], -1, context, max_tokens, side)
    except ContextLengthExceededError:  # not even one base token fits beside the reward prompt's head
        assert longest(truncate_contexts(base, [reward], 1, side)) > context - max_tokens
        return
    assert longest(kept) <= context - max_tokens and kept[0]
    if len(kept[0]) < len(base):
        assert longest(truncate_contexts(base, [reward], len(kept[0]) + 1, side)) > context - max_tokens


def test_truncation_length():
    assert truncation_length(5, 100, None) == 5
    assert truncation_length(-1, 100, None) == 99
    assert truncation_length(-1, 100, 30) == 70
    with pytest.raises(ContextLengthExceededError):
        truncation_length(101, 100, None)
    with pytest.raises(ContextLengthExceededError):
        truncation_length(-1, 100, 100)


# ---- the engine --------------------------------------------------------
def run(engine, *requests):
    tokens: dict[str, list[int]] = {}
    outputs = {}
    for output in engine.generate(list(requests)):
        assert output.finish_reason != "error", output.error
        tokens.setdefault(output.request_id, []).extend(output.token_ids)
        outputs.setdefault(output.request_id, []).append(output)
    return tokens, outputs


def chat(rid: str, preferences=(), **sampling) -> ChatRequest:
    params = {"max_tokens": 12, "temperature": 0.0, **sampling}
    return ChatRequest(rid, MESSAGES, list(preferences), SamplingParams(**params), GuidanceParams(weight=4.0))


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_bad_words_never_appear_and_change_only_what_they_must(make_engine, tokenizer, preferences):
    engine = make_engine()
    tokens, _ = run(engine, chat("free", preferences))
    free = tokens["free"]
    # A two-token stretch of the free answer that is how the tokenizer writes
    # its text (bad words are token sequences, as in vLLM): its last token is
    # banned right after its first.
    start = next(i for i in range(len(free) - 1)
                 if tuple(free[i:i + 2]) in bad_words_ids(tokenizer, [tokenizer.decode(free[i:i + 2])]))
    word = tokenizer.decode(free[start:start + 2])
    tokens, _ = run(make_engine(), chat("banned", preferences, bad_words=(word,)))
    banned = tokens["banned"]
    assert banned[:start + 1] == free[:start + 1] and banned[start + 1] != free[start + 1]
    for ids in bad_words_ids(tokenizer, [word]):
        assert all(tuple(banned[i:i + len(ids)]) != ids for i in range(len(banned)))


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_allowed_token_ids_are_the_only_ones_chosen(make_engine, tokenizer, preferences):
    allowed = tuple(tokenizer.encode(" yes no maybe sleep", add_special_tokens=False))
    tokens, _ = run(make_engine(), chat("a", preferences, allowed_token_ids=allowed, temperature=1.0, seed=5,
                                        ignore_eos=True))
    assert len(tokens["a"]) == 12 and set(tokens["a"]) <= set(allowed)


def test_truncate_prompt_tokens_on_chat_and_text(make_engine, tokenizer):
    engine = make_engine()
    full = engine.prepare_chat(chat("full", PREF))
    cut = engine.prepare_chat(chat("cut", PREF, truncate_prompt_tokens=5))
    assert cut.prompt_ids == full.prompt_ids[-5:]
    reward = list(cut.reward_prompts[0].prompt_ids)
    assert "short answers" in tokenizer.decode(reward) and reward[-5:] == cut.prompt_ids
    right = engine.prepare_chat(chat("right", truncate_prompt_tokens=4, truncation_side="right"))
    assert right.prompt_ids == full.prompt_ids[:4]
    text = prepare_text(engine, TextRequest("t", "Once upon a time there was", [],
                                            SamplingParams(max_tokens=2, truncate_prompt_tokens=3)))
    assert text.prompt_ids == tokenizer("Once upon a time there was")["input_ids"][-3:]
    _, outputs = run(engine, chat("ran", truncate_prompt_tokens=5, max_tokens=2))
    assert outputs["ran"][-1].prompt_tokens == 5


def test_a_truncated_prompt_fits_where_the_whole_one_does_not(make_engine):
    engine = make_engine()
    long = [{"role": "user", "content": "sleep " * (engine.context_length + 10)}]
    request = ChatRequest("long", long, [], SamplingParams(max_tokens=4, temperature=0.0, truncate_prompt_tokens=-1))
    generation = engine.prepare_chat(request)
    assert len(generation.prompt_ids) == engine.context_length - 4
    engine.add_request(generation)  # it fits
    engine.abort("long")
    with pytest.raises(ContextLengthExceededError):
        engine.add_request(engine.prepare_chat(ChatRequest("whole", long, [], SamplingParams(max_tokens=4))))


def test_as_many_as_fit_with_a_preference_fits_the_reward_prompt_too(make_engine, tokenizer):
    engine = make_engine()
    long = [{"role": "user", "content": "sleep " * (engine.context_length + 10)}]
    request = ChatRequest("long", long, PREF, SamplingParams(max_tokens=4, temperature=0.0, truncate_prompt_tokens=-1),
                          GuidanceParams(weight=2.0))
    generation = engine.prepare_chat(request)
    (reward,) = [prompt.prompt_ids for prompt in generation.reward_prompts]
    assert len(reward) == engine.context_length - 4 > len(generation.prompt_ids)
    assert "short answers" in tokenizer.decode(reward)
    tokens, outputs = run(engine, request)
    assert outputs["long"][-1].finish_reason == "length" and len(tokens["long"]) == 4


@pytest.mark.parametrize("weight, max_tokens", [(0.0, 4), (2.0, 0)], ids=["weight-0", "scores-only"])
def test_as_many_as_fit_makes_no_room_for_reward_prompts_that_never_run(make_engine, weight, max_tokens):
    """With weight 0 (plain decoding) or max_tokens 0 (the prompt's logprobs
    only) the reward prompts never reach the model: -1 keeps the base prompt
    as long as the context allows, as without a preference."""
    engine = make_engine()
    long = [{"role": "user", "content": "sleep " * (engine.context_length + 10)}]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, truncate_prompt_tokens=-1,
                              prompt_logprobs=0 if max_tokens == 0 else None)
    request = ChatRequest("long", long, PREF, sampling, GuidanceParams(weight=weight))
    generation = engine.prepare_chat(request)
    assert len(generation.prompt_ids) == engine.context_length - (max_tokens or 1)
    _, outputs = run(engine, request)
    assert outputs["long"][-1].prompt_tokens == len(generation.prompt_ids)


def test_the_character_precheck_counts_a_preference_only_where_it_runs(make_engine):
    """The pre-tokenizing length check adds the longest preference only when
    its reward prompt will run: with weight 0 a chat whose messages alone
    fit is not refused for a preference it never reads."""
    engine = make_engine()
    preference = Preference("p" * 2000)
    # The messages alone: fewer than context_length tokens' worth of characters; with the preference, more.
    chars = engine.context_length * engine.max_token_chars - len(preference.text) + engine.max_token_chars // 2
    long = [{"role": "user", "content": "sleep " * (chars // 6 + 1)}]
    at_least = -(-sum(map(len, long[0].values())) // engine.max_token_chars)
    assert at_least < engine.context_length <= -(-(sum(map(len, long[0].values())) + 2000) // engine.max_token_chars)
    plain = ChatRequest("plain", long, [preference], SamplingParams(max_tokens=None), GuidanceParams(weight=0.0))
    assert engine.prepare_chat(plain).prompt_ids  # tokenized, not refused by the character count
    with pytest.raises(ContextLengthExceededError):
        engine.prepare_chat(dataclasses.replace(plain, guidance=GuidanceParams(weight=2.0)))


def test_prompt_logprobs_carry_ids_and_ranks(make_engine):
    engine = make_engine()
    _, outputs = run(engine, chat("scored", prompt_logprobs=3, max_tokens=1))
    entries = outputs["scored"][0].prompt_logprobs
    prompt = engine.prepare_chat(chat("x")).prompt_ids
    assert [e.token_id for e in entries] == prompt
    assert entries[0].logprob is None
    for entry in entries[1:]:
        assert len(entry.top_ids) == 3 and entry.rank >= 1
        assert (entry.rank == 1) == (entry.token_id == entry.top_ids[0]) or entry.logprob == entry.top_logprobs[0][1]
        if entry.token_id in entry.top_ids:
            assert entry.rank <= entry.top_ids.index(entry.token_id) + 1


# ---- over HTTP ---------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("vllm")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_chat_prompt_logprobs_in_vllm_shape(client):
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=2, temperature=0,
                                                extra_body={"prompt_logprobs": 2})
    prompt_logprobs = completion.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == completion.usage.prompt_tokens and prompt_logprobs[0] is None
    for position in prompt_logprobs[1:]:
        assert 2 <= len(position) <= 3  # the token itself and the two most likely
        ranks = sorted(entry["rank"] for entry in position.values())
        assert ranks[:2] == [1, 2] or ranks[0] == 1
        for token_id, entry in position.items():
            assert token_id.isdigit() and entry["logprob"] <= 0 and isinstance(entry["decoded_token"], str)


def test_completions_prompt_logprobs_alone_and_beside_echo(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    alone = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert alone["logprobs"] is None and len(alone["prompt_logprobs"]) == 4 and alone["prompt_logprobs"][0] is None
    echoed = httpx.post(f"{server}/v1/completions", json={**body, "echo": True, "logprobs": 1},
                        timeout=60).json()["choices"][0]
    # echo's legacy logprobs keep their own count (1) though the worker read 3
    assert all(top is None or len(top) <= 2 for top in echoed["logprobs"]["top_logprobs"])  # 1, and the token
    assert echoed["prompt_logprobs"] == alone["prompt_logprobs"]
    scored = httpx.post(f"{server}/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()["choices"][0]
    assert scored["text"] == "" and scored["prompt_logprobs"] == alone["prompt_logprobs"]


def test_an_echoed_truncated_prompt_is_the_text_the_model_read(server, tokenizer):
    prompt = "Once upon a time there was a"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True,
            "truncate_prompt_tokens": 3}
    kept = tokenizer.decode(tokenizer(prompt)["input_ids"][-3:])
    for logprobs in (None, 0):
        choice = httpx.post(f"{server}/v1/completions", json={**body, "logprobs": logprobs},
                            timeout=60).json()["choices"][0]
        assert choice["text"].startswith(kept) and not choice["text"].startswith(prompt)
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert all(choice["text"][at:at + len(token)] == token for at, token in zip(offsets, tokens, strict=True))
    untouched = httpx.post(f"{server}/v1/completions", json={**body, "truncate_prompt_tokens": 100},
                           timeout=60).json()["choices"][0]
    assert untouched["text"].startswith(prompt)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_offsets_skip_special_tokens_left_out_of_the_text(server, tokenizer, stream):
    """An answer whose special tokens skip_special_tokens leaves out of the
    text (ignore_eos, only the end token and " hello" allowed): each token's
    text_offset is where its text is in the answer; the special ones add
    nothing. Offsets come from the tokens' bytes, streamed or not."""
    hello = tokenizer.encode(" hello", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = {"model": MODEL, "prompt": "Say hello", "max_tokens": 8, "temperature": 1, "seed": 3, "logprobs": 0, "logit_bias": {str(eos): 1},
            "ignore_eos": True, "allowed_token_ids": [*hello, eos], "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        parts = [c["choices"][0] for c in chunks if c["choices"]]
        text = "".join(p["text"] for p in parts)
        tokens = [t for p in parts if p["logprobs"] for t in p["logprobs"]["tokens"]]
        offsets = [o for p in parts if p["logprobs"] for o in p["logprobs"]["text_offset"]]
    else:
        choice = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert "<|im_end|>" in tokens and " hello" in tokens and "<|im_end|>" not in text, tokens
    position = 0
    for token, offset in zip(tokens, offsets, strict=True):
        assert offset == position, (tokens, offsets)
        if token != "<|im_end|>":
            assert text[offset:offset + len(token)] == token
            position += len(token)
    assert position == len(text)


def test_token_fields_over_http(client, server, tokenizer):
    allowed = tokenizer.encode(" yes no", add_special_tokens=False)
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1,
                                                seed=1, extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                                                                    "bad_words": ["no"]})
    assert completion.choices[0].message.content.split() == ["yes"] * 5
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                         extra_body={"truncate_prompt_tokens": 3})
    assert cut.usage.prompt_tokens == 3


@pytest.mark.parametrize("extra, param", [
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncation_side": "middle"}, "truncation_side"),
    ({"truncate_prompt_tokens": 10**9}, "truncate_prompt_tokens"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"structured_outputs": {"choice": ["yes"]}, "bad_words": ["yes"]}, "bad_words"),
    ({"structured_outputs": {"choice": ["yes"]}, "bad_words": ["yes"], "stream": True}, "bad_words"),
])
def test_bad_token_fields_are_clear_400s(server, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
@pytest.mark.parametrize("rule, param", [({"bad_words": ("yes",)}, "bad_words"),
                                         ({"bad_words": ("yes",), "allowed_token_ids": ("yes",)}, "allowed_token_ids")])
def test_rules_that_rule_out_a_grammars_every_token_are_the_clients_400(make_engine, tokenizer, preferences, rule,
                                                                         param):
    """A choice of "yes" alone with "yes" a bad word: no token is legal. The
    request ends naming the field (allowed_token_ids first when both are
    given), its neighbour untouched."""
    from pad_core.types import StructuredOutput

    engine = make_engine()
    if "allowed_token_ids" in rule:
        rule = {**rule, "allowed_token_ids": tuple(tokenizer.encode("yes", add_special_tokens=False))}
    choice = StructuredOutput("choice", choices=("yes",), source="structured_outputs.choice")
    stuck = dataclasses.replace(chat("stuck", preferences, **rule), structured=choice)
    outputs: dict[str, list] = {}
    for output in engine.generate([stuck, chat("fine", preferences, max_tokens=4)]):
        outputs.setdefault(output.request_id, []).append(output)
    last = outputs["stuck"][-1]
    assert last.finish_reason == "error" and last.error_param == param, last
    assert outputs["fine"][-1].finish_reason == "length"


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_allowed_tokens_that_leave_nothing_to_choose_end_the_request_alone(make_engine, tokenizer, preferences):
    """allowed_token_ids outside a grammar's tokens, or only the end token
    while min_tokens forbids it: no token can be chosen. The request ends
    with an error naming the cause; the one beside it is untouched."""
    from pad_core.types import StructuredOutput

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine = make_engine()
    letter = tuple(tokenizer.encode("a", add_special_tokens=False))
    grammar = dataclasses.replace(chat("grammar", preferences, allowed_token_ids=letter),
                                  structured=StructuredOutput("json_object"))
    stuck = chat("stuck", preferences, allowed_token_ids=(eos,), min_tokens=2)
    outputs: dict[str, list] = {}
    for output in engine.generate([grammar, stuck, chat("fine", preferences, max_tokens=4)]):
        outputs.setdefault(output.request_id, []).append(output)
    for rid in ("grammar", "stuck"):
        last = outputs[rid][-1]
        assert last.finish_reason == "error" and last.error_param == "allowed_token_ids", last
    assert outputs["fine"][-1].finish_reason == "length"


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_a_token_the_model_itself_rules_out_is_still_the_clients_400(make_engine, tokenizer, preferences):
    """The model's own -inf on a token (a sound score: it rules the token
    out) does not make allowed_token_ids naming only that token an engine
    error: the request's rule left nothing, so it is the client's 400."""
    from pad_core.testing import biased

    engine = make_engine()
    (only,) = tokenizer.encode("yes", add_special_tokens=False)
    bias = torch.zeros(engine.runners["base"].vocab_size)
    bias[only] = float("-inf")
    outputs: dict[str, list] = {}
    with biased(engine, bias):
        for output in engine.generate([chat("stuck", preferences, allowed_token_ids=(only,)),
                                       chat("fine", preferences, max_tokens=4)]):
            outputs.setdefault(output.request_id, []).append(output)
    last = outputs["stuck"][-1]
    assert last.finish_reason == "error" and last.error_param == "allowed_token_ids", last
    assert outputs["fine"][-1].finish_reason == "length"


@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_a_model_that_rules_out_every_token_is_the_engines_error(make_engine, tokenizer, preferences):
    """Every logit -inf is the model's fault, whatever rules the request
    has: an engine error ("not finite", a 500), never blamed on a field."""
    from pad_core.testing import biased

    engine = make_engine()
    bias = torch.full((engine.runners["base"].vocab_size,), float("-inf"))
    with biased(engine, bias):
        for rules in ({"bad_words": ("zebra",)}, {}):
            (last, *_) = reversed(list(engine.generate([chat("broken", preferences, **rules)])))
            assert last.finish_reason == "error" and last.error_param is None and "not finite" in last.error, last
