"""No request can hurt another (issue 14): the next-token choice over the
whole legal range of every parameter (hypothesis), a hostile row batched
beside healthy ones, numeric and injected failures ending one request alone
in the engine, and the worker tokenizing off its decode loop.

The legal range is pad_core.validation's: temperature [0, 2] (below 1e-5
greedy), top_p [0, 1] (0 and 5e-324 included), |w| and |preference weight| <= 100,
top_k [1, max_top_k], min_p [0, 1], penalties [-2, 2]."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pad_core.decoding import StepInputs, next_tokens
from pad_core.errors import InvalidRequestError
from pad_core.sampling import INVALID_TOKEN, choose_tokens
from pad_core.types import ChatRequest, GuidanceParams, Preference, RequestLimits, SamplingParams
from pad_core.validation import MAX_WEIGHT, TEMPERATURE_FLOOR

V = 24  # vocabulary of the pure tests
temperatures = st.one_of(st.sampled_from([0.0, 5e-324, 1e-40, 1e-6, TEMPERATURE_FLOOR, 1e-3, 2.0]),
                         st.floats(0.0, 2.0))
top_ps = st.one_of(st.sampled_from([0.0, 5e-324, 1e-50, 1e-6, 1.0]), st.floats(0.0, 1.0))
weights = st.one_of(st.sampled_from([-MAX_WEIGHT, MAX_WEIGHT, 0.0]), st.floats(-MAX_WEIGHT, MAX_WEIGHT))
logits = st.floats(-1e4, 1e4, width=32)


# ---- the pure choice ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    row=st.lists(st.one_of(logits, st.just(float("-inf"))), min_size=1, max_size=V).filter(
        lambda r: any(x != float("-inf") for x in r)
    ),
    temperature=temperatures,
    top_p=top_ps,
    seed=st.integers(0, 2**63 - 1),
)
def test_choose_tokens_picks_an_allowed_column_for_every_legal_setting(row, temperature, top_p, seed):
    scores = torch.tensor([row])
    chosen = choose_tokens(scores, [temperature], [top_p], [torch.Generator().manual_seed(seed)])
    column = int(chosen[0])
    assert 0 <= column < len(row) and row[column] != float("-inf")
    if temperature < TEMPERATURE_FLOOR:  # greedy
        assert row[column] == max(row)
    elif top_p < 1e-30:  # a nucleus of the most likely token alone (one of them, if float32 cannot tell)
        probs = torch.softmax(scores[0] / temperature, dim=-1)
        assert probs[column] == probs.max()


def test_choose_tokens_marks_only_the_unusable_rows():
    scores = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0], [float("-inf")] * 2, [3.0, 1.0]])
    chosen = choose_tokens(scores, [1.0] * 5, [1.0] * 5, [torch.Generator().manual_seed(1) for _ in range(5)])
    assert chosen[1:4].tolist() == [INVALID_TOKEN] * 3
    assert chosen[0] in (0, 1) and chosen[4] in (0, 1)


def distinct_logits():
    """A row without ties (a permutation of 0..V-1, scaled): which token a
    row chooses is then the same for any batch shape, up to float noise."""
    return st.builds(lambda order, scale, shift: [x * scale + shift for x in order],
                     st.permutations(range(V)), st.floats(0.5, 50.0), st.floats(-100.0, 100.0))


@st.composite
def guided_batches(draw, distinct: bool = False):
    """N requests over a V-token vocabulary, M reward rows, every setting
    legal; `distinct`: rows without ties."""
    n = draw(st.integers(1, 4))
    m = draw(st.integers(0, 6))
    row = distinct_logits() if distinct else st.lists(logits, min_size=V, max_size=V)
    return {
        "base": draw(st.lists(row, min_size=n, max_size=n)),
        "reward": draw(st.lists(row, min_size=m, max_size=m)),
        "owner": draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m)),
        "pref_weight": draw(st.lists(weights, min_size=m, max_size=m)),
        "weight": draw(st.lists(weights, min_size=n, max_size=n)),
        "top_k": draw(st.lists(st.integers(1, V), min_size=n, max_size=n)),
        "min_p": draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)),
        "temperature": draw(st.lists(temperatures, min_size=n, max_size=n)),
        "top_p": draw(st.lists(top_ps, min_size=n, max_size=n)),
        "seeds": draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n)),
    }


def step_inputs(batch, rows=None) -> StepInputs:
    """The StepInputs of `batch`, or of its requests `rows` alone (their reward rows with them)."""
    rows = list(range(len(batch["base"]))) if rows is None else rows
    keep = [j for j, owner in enumerate(batch["owner"]) if owner in rows]
    reward = torch.tensor([batch["reward"][j] for j in keep], dtype=torch.float32).reshape(len(keep), V)
    return StepInputs(
        base_logits=torch.tensor([batch["base"][i] for i in rows], dtype=torch.float32),
        reward_logits_at=lambda candidates: reward.gather(1, candidates),
        reward_owner=torch.tensor([rows.index(batch["owner"][j]) for j in keep], dtype=torch.long),
        preference_weight=torch.tensor([batch["pref_weight"][j] for j in keep], dtype=torch.float32),
        guidance_weight=torch.tensor([batch["weight"][i] for i in rows], dtype=torch.float32),
        top_k=torch.tensor([batch["top_k"][i] for i in rows], dtype=torch.long),
        min_p=torch.tensor([batch["min_p"][i] for i in rows], dtype=torch.float32),
        temperature=[batch["temperature"][i] for i in rows],
        top_p=[batch["top_p"][i] for i in rows],
        generators=[torch.Generator().manual_seed(batch["seeds"][i]) for i in rows],
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(batch=guided_batches())
def test_next_tokens_is_a_valid_candidate_over_the_legal_range(batch):
    """Any finite logits (ties, +-1e4) and any legal settings: a token among
    the row's top-k candidates, never INVALID_TOKEN."""
    tokens = next_tokens(step_inputs(batch)).tolist()
    for i, token in enumerate(tokens):
        assert 0 <= token < V, (i, token)
        ranked = sorted(range(V), key=lambda t: -batch["base"][i][t])
        kth = batch["base"][i][ranked[batch["top_k"][i] - 1]]
        assert batch["base"][i][token] >= kth


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(batch=guided_batches(distinct=True))
def test_each_request_chooses_the_same_token_batched_and_alone(batch):
    """Whatever the other rows' settings (extremes included), a request's
    token is the one it gets alone (its own generator, the same seed)."""
    tokens = next_tokens(step_inputs(batch)).tolist()
    for i, token in enumerate(tokens):
        assert next_tokens(step_inputs(batch, [i])).tolist() == [token]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(batch=guided_batches(distinct=True), poison=st.sampled_from([float("nan"), float("inf")]), where=st.sampled_from(["base", "reward"]))
def test_a_row_with_broken_logits_fails_alone(batch, poison, where):
    """NaN or inf logits in one request's base row or reward rows: that
    request gets INVALID_TOKEN, every other request the token it gets alone."""
    victim = 0
    if where == "reward":
        if victim not in batch["owner"] or batch["weight"][victim] == 0:
            return
        batch["reward"][batch["owner"].index(victim)][:] = [poison] * V
    else:
        batch["base"][victim][:] = [poison] * V
    tokens = next_tokens(step_inputs(batch)).tolist()
    assert tokens[victim] == INVALID_TOKEN or (where == "reward" and poison == float("inf"))
    for i in range(1, len(tokens)):
        assert tokens[i] == next_tokens(step_inputs(batch, [i])).tolist()[0]


# ---- validation on the types --------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (ChatRequest("r", [{"role": "user", "content": "\ud800"}]), "messages[0].content"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], [Preference("x", 1e308)]), "preference[0].weight"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], [Preference("x", 10**400)]), "preference[0].weight"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], [Preference("a"), Preference("a")]), "preference[1]"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], [Preference("\udfff")]), "preference[0]"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], sampling=SamplingParams(max_tokens=2**64)), "max_tokens"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], sampling=SamplingParams(seed=-(2**63) - 1)), "seed"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], sampling=SamplingParams(temperature=float("nan"))),
         "temperature"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], sampling=SamplingParams(top_p=-0.5)), "top_p"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], sampling=SamplingParams(stop=("\ud800",))), "stop"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], guidance=GuidanceParams(weight=1e308)), "pad.weight"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], guidance=GuidanceParams(top_k=10**30)), "pad.top_k"),
        (ChatRequest("r", [{"role": "user", "content": "x"}], guidance=GuidanceParams(min_p=float("nan"))),
         "pad.min_p"),
    ],
)
def test_the_types_refuse_out_of_range_values(request_, param):
    with pytest.raises(InvalidRequestError) as info:
        request_.verify(RequestLimits())
    assert info.value.param == param


# ---- the engine ---------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "How do I sleep better at night?"}]
HEALTHY = SamplingParams(temperature=0.0, max_tokens=6)


def outputs_of(outputs, request_id):
    mine = [o for o in outputs if o.request_id == request_id]
    return [t for o in mine for t in o.token_ids], mine[-1]


@pytest.fixture(scope="module")
def engine_alone(tiny_model, tokenizer):
    from pad_core.model_loading import engine_for_model
    from pad_core.settings import EngineSettings

    engine = engine_for_model(tiny_model, tokenizer, EngineSettings())
    healthy = ChatRequest("healthy", MESSAGES, [Preference("short answers")], HEALTHY)
    tokens, last = outputs_of(list(engine.generate([healthy])), "healthy")
    return tokens, last.finish_reason


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    temperature=temperatures, top_p=top_ps, weight=weights, pref_weight=weights,
    top_k=st.integers(1, 100), min_p=st.floats(0.0, 1.0), penalty=st.floats(-2.0, 2.0),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_a_hostile_but_legal_request_beside_a_healthy_one(make_engine, engine_alone, temperature, top_p, weight,
                                                          pref_weight, top_k, min_p, penalty, seed):
    engine = make_engine()
    hostile = ChatRequest(
        "hostile", MESSAGES, [Preference("be brief", pref_weight), Preference("be funny", -pref_weight)],
        SamplingParams(max_tokens=3, temperature=temperature, top_p=top_p, seed=seed, presence_penalty=penalty,
                       frequency_penalty=-penalty, logprobs=True, top_logprobs=20),
        GuidanceParams(weight=weight, top_k=top_k, min_p=min_p),
    )
    healthy = ChatRequest("healthy", MESSAGES, [Preference("short answers")], HEALTHY)
    outputs = list(engine.generate([hostile, healthy]))
    assert outputs_of(outputs, "healthy")[0] == engine_alone[0]
    tokens, last = outputs_of(outputs, "hostile")
    assert last.finish_reason in ("length", "stop") and last.error is None and tokens
    assert all(lp.logprob <= 0 for o in outputs if o.logprobs for lp in o.logprobs)


def test_a_request_whose_scores_turn_nan_ends_alone(make_engine, engine_alone, monkeypatch):
    engine = make_engine()
    penalised = engine._penalised

    def poisoned(states, base):
        base = penalised(states, base).clone()
        for row, state in enumerate(states):
            if state.request_id == "broken":
                base[row] = float("nan")
        return base

    monkeypatch.setattr(engine, "_penalised", poisoned)
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=6)
    reference = outputs_of(list(make_engine().generate([ChatRequest("sampled", MESSAGES, [], sampled)])), "sampled")
    requests = [ChatRequest("broken", MESSAGES, [Preference("x")], HEALTHY),
                ChatRequest("healthy", MESSAGES, [Preference("short answers")], HEALTHY),
                ChatRequest("sampled", MESSAGES, [], sampled)]
    outputs = list(engine.generate(requests))
    _, broken = outputs_of(outputs, "broken")
    assert broken.finish_reason == "error" and "not finite" in broken.error
    assert outputs_of(outputs, "healthy")[0] == engine_alone[0]
    assert outputs_of(outputs, "sampled")[0] == reference[0]
    assert engine.stats().items() >= {"running_requests": 0, "running_rows": 0, "waiting_requests": 0}.items()


def test_an_exception_while_choosing_ends_only_its_request(make_engine, engine_alone, monkeypatch):
    """A bug one request's input reaches (here injected) fails that request;
    the batch is retried request by request, with each generator rewound, so
    a seeded neighbour still draws exactly what it draws alone."""
    engine = make_engine()
    choose = engine._choose

    def failing(states, hidden):
        if any(state.request_id == "buggy" and len(state.generated) == 2 for state in states):
            raise RuntimeError("injected fault")
        return choose(states, hidden)

    monkeypatch.setattr(engine, "_choose", failing)
    sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=6)
    reference = outputs_of(list(make_engine().generate([ChatRequest("sampled", MESSAGES, [], sampled)])), "sampled")
    requests = [ChatRequest("sampled", MESSAGES, [], sampled),
                ChatRequest("buggy", MESSAGES, [], SamplingParams(temperature=1.0, max_tokens=6)),
                ChatRequest("healthy", MESSAGES, [Preference("short answers")], HEALTHY)]
    outputs = list(engine.generate(requests))
    tokens, buggy = outputs_of(outputs, "buggy")
    assert buggy.finish_reason == "error" and "injected fault" in buggy.error and len(tokens) == 2
    assert outputs_of(outputs, "sampled")[0] == reference[0]
    assert outputs_of(outputs, "healthy")[0] == engine_alone[0]


# ---- the worker: tokenization off the decode loop -----------------------------------


def test_a_prompt_being_tokenized_does_not_hold_up_the_running_requests(tiny_model, tokenizer):
    """A chat whose tokenization takes long (held here until released) is
    prepared in the worker's tokenizer thread: the request already running
    decodes to its end meanwhile, and the slow one is served afterwards."""
    import zmq
    from server_helpers import worker_thread

    from pad_core.model_loading import engine_for_model
    from pad_core.ipc import pack, unpack
    from pad_core.settings import EngineSettings

    engine = engine_for_model(tiny_model, tokenizer, EngineSettings())
    release = threading.Event()
    prepare = engine.prepare_chat

    def slow_prepare(chat):
        if chat.request_id == "huge":
            release.wait(30)
        return prepare(chat)

    engine.prepare_chat = slow_prepare
    with worker_thread(engine=engine) as (address, worker):
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.connect(address)

        def add(request_id, max_tokens):
            chat = ChatRequest(request_id, MESSAGES, [], SamplingParams(temperature=0.0, max_tokens=max_tokens))
            sock.send(pack({"type": "add", "request": chat.to_dict()}))

        add("running", 40)
        add("huge", 3)
        add("aborted", 3)
        sock.send(pack({"type": "abort", "request_id": "aborted"}))
        finished: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while "running" not in finished and time.monotonic() < deadline:
            if sock.poll(100):
                for output in unpack(sock.recv()).get("outputs", []):
                    if output["finish_reason"]:
                        finished[output["request_id"]] = time.monotonic()
        assert finished.keys() == {"running"}  # all 40 tokens, while "huge" was still being tokenized
        release.set()
        while "huge" not in finished and time.monotonic() < deadline:
            if sock.poll(100):
                for output in unpack(sock.recv()).get("outputs", []):
                    if output["finish_reason"]:
                        finished[output["request_id"]] = time.monotonic()
        assert "huge" in finished and "aborted" not in finished
        assert worker.engine.stats()["running_requests"] == 0 and not worker.preparing
        sock.close(linger=0)
        context.term()
