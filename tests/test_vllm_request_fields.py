"""vLLM's remaining request fields: cache_salt (prefix-cache entries shared
only within a salt, on both runners), add_special_tokens and documents
(what the prompt is made of), request_id (the x-request-id of the answer),
and the fields honoured by refusing them by name (beam search, custom
logits processors, a request's own chat template, prompt embeddings) or
accepted with no effect (include_reasoning, ...)."""

from __future__ import annotations

import copy

import httpx
import pytest
from server_helpers import tiny_gateway
from tokenizers import processors

from pad_core.prompting import PromptBuilder
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams, TemplateOptions

MODEL = "smollm2-135m-instruct"
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers questions at length and in detail."}
MESSAGES = [SYSTEM, {"role": "user", "content": "How do I sleep better at night? Tell me everything you know."}]


# ---- cache_salt ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["transformers", "slots"])
@pytest.mark.parametrize("preferences", [[], [Preference("I like short answers")]], ids=["plain", "pad"])
def test_a_salted_prompt_reuses_only_its_own_salts_cache(make_engine, backend, preferences):
    engine = make_engine(backend=backend)

    def hits(rid: str, salt: str | None) -> int:
        request = ChatRequest(rid, MESSAGES, preferences, SamplingParams(temperature=0.0, max_tokens=3,
                                                                           cache_salt=salt), GuidanceParams())
        before = engine.stats()["prefix_cache_hit_tokens"]
        outputs = list(engine.generate([request]))
        assert outputs[-1].finish_reason == "length"
        return engine.stats()["prefix_cache_hit_tokens"] - before

    assert hits("first", "tenant-a") == 0
    assert hits("other tenant", "tenant-b") == 0  # the same prompt, another salt: a miss
    assert hits("unsalted", None) == 0
    assert hits("same tenant", "tenant-a") > 0
    assert hits("unsalted again", None) > 0


def test_rows_of_different_salts_never_share_a_prefill(tiny_model):
    """Identical prompts run once (the n choices of a request), but only
    within a salt; each row files its KV under its own salt."""
    from pad_core.runner import NO_ADAPTER, NewRow, TransformersRunner, prefix_key

    runner = TransformersRunner(tiny_model)
    widths = []
    forward = runner._forward
    runner._forward = lambda ids, *args: widths.append(ids.shape[0]) or forward(ids, *args)
    prompt = list(range(5, 45))
    runner.prefill([NewRow("a", prompt, cache_salt="x"), NewRow("b", prompt, cache_salt="y"),
                    NewRow("c", prompt, cache_salt="x"), NewRow("d", prompt)])
    assert widths == [3]
    assert runner.prefix_keys == [prefix_key(NO_ADAPTER, "x"), prefix_key(NO_ADAPTER, "y"),
                                  prefix_key(NO_ADAPTER, "x"), NO_ADAPTER]


def test_a_bad_salt_is_a_400(server):
    for salt in ("", "x" * 257, 5):
        response = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES[1:],
                                                                     "max_tokens": 1, "cache_salt": salt}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt", salt


# ---- what the prompt is made of ----------------------------------------------
@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer with a post-processor that adds a BOS, as
    Llama's does (SmolLM2's adds nothing, so add_special_tokens could not show)."""
    adding = copy.deepcopy(tokenizer)
    bos = adding.convert_tokens_to_ids("<|im_start|>")
    adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    assert adding("hi", add_special_tokens=True)["input_ids"][0] == bos
    return adding


def test_add_special_tokens_on_chat_and_text(bos_tokenizer):
    builder = PromptBuilder(bos_tokenizer, "{preference}")
    bos = bos_tokenizer.convert_tokens_to_ids("<|im_start|>")
    plain = builder.encode(MESSAGES)  # chat's default: the template writes its own
    added = builder.encode(MESSAGES, template=TemplateOptions(add_special_tokens=True))
    assert added == [bos, *plain]
    text, _ = builder.encode_text("Once upon a time", [], False)  # text's default: added
    bare, rewards = builder.encode_text("Once upon a time", [Preference("short")], False, add_special_tokens=False)
    assert text == [bos, *bare] and rewards[0][0] != bos


def test_documents_reach_a_template_that_renders_them(tokenizer):
    rag = copy.deepcopy(tokenizer)
    rag.chat_template = ("{% for d in documents or [] %}<doc>{{ d.title }}: {{ d.text }}</doc>{% endfor %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    builder = PromptBuilder(rag, "{preference}")
    documents = [{"title": "Sleep", "text": "Keep a regular bedtime."}]
    ids = builder.encode(MESSAGES[1:], template=TemplateOptions(add_generation_prompt=False, documents=documents))
    assert rag.decode(ids).startswith("<doc>Sleep: Keep a regular bedtime.</doc>user:")
    assert not rag.decode(builder.encode(MESSAGES[1:], template=TemplateOptions(add_generation_prompt=False)))\
        .startswith("<doc>")


# ---- over HTTP ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("fields")) as url:
        yield url


def chat(server: str, headers: dict | None = None, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES[1:], "max_tokens": 2, **extra}
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)


def test_request_id_names_the_request_unless_a_header_does(server):
    response = chat(server, request_id="trace-42")
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"].startswith("chatcmpl-") and "trace-42" not in response.json()["id"]
    assert chat(server, {"X-Request-Id": "from-header"}, request_id="trace-42").headers["x-request-id"] == "from-header"
    completion = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                             "request_id": "c-1"}, timeout=60)
    assert completion.headers["x-request-id"] == "c-1"
    bad = chat(server, request_id="two words")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"


def test_documents_and_add_special_tokens_are_taken_over_http(server):
    documents = [{"title": "Sleep", "text": "Keep a regular bedtime."}]
    plain = chat(server, return_token_ids=True).json()
    with_both = chat(server, return_token_ids=True, documents=documents, add_special_tokens=True).json()
    # SmolLM2's template renders no documents and its tokenizer adds no special tokens: the same prompt
    assert with_both["prompt_token_ids"] == plain["prompt_token_ids"]
    bad = chat(server, documents=[{"title": 5}])
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("documents")


@pytest.mark.parametrize("extra", [{"include_reasoning": True}, {"length_penalty": 1.5},
                                   {"spaces_between_special_tokens": False}, {"use_beam_search": False},
                                   {"logits_processors": []}, {"vllm_xargs": {}}, {"mm_processor_kwargs": {}},
                                   {"media_io_kwargs": {"image": {}}}, {"cache_salt": "s"}])
def test_accepted_fields(server, extra):
    response = chat(server, **extra)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("extra, param", [
    ({"use_beam_search": True}, "use_beam_search"),
    ({"logits_processors": ["my.Processor"]}, "logits_processors"),
    ({"vllm_xargs": {"k": 1}}, "vllm_xargs"),
    ({"kv_transfer_params": {}}, "kv_transfer_params"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
])
def test_fields_this_server_cannot_honour_are_refused_by_name(server, extra, param):
    response = chat(server, **extra)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


def test_prompt_embeds_are_refused_by_name(server):
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "prompt_embeds": "AAAA"},
                          timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_embeds"
