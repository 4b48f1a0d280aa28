"""The next-token chooser of one step (pad_core.decoding.next_tokens) on
hand-made logits: plain and guided rows mixed in one batch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pad_core.decoding import StepInputs, next_tokens


class RewardTable:
    """reward_logits_at over full-vocabulary reward logits [M, V]; records its calls."""

    def __init__(self, logits, vocab: int):
        self.logits = torch.as_tensor(logits, dtype=torch.float32).reshape(len(logits), vocab)
        self.calls: list[torch.Tensor] = []

    def __call__(self, candidates: torch.Tensor) -> torch.Tensor:
        self.calls.append(candidates.clone())
        return self.logits.gather(1, candidates)


def make_inputs(base, rewards=(), owner=(), pref_weight=None, weight=None, top_k=None, temperature=None,
                top_p=None, generators=None, min_p=None):
    base = torch.as_tensor(base, dtype=torch.float32)
    n = base.shape[0]
    table = RewardTable(list(rewards), base.shape[1])
    inputs = StepInputs(
        base_logits=base,
        reward_logits_at=table,
        reward_owner=torch.tensor(list(owner), dtype=torch.long),
        preference_weight=torch.tensor(pref_weight if pref_weight is not None else [1.0] * len(owner)),
        guidance_weight=torch.tensor(weight if weight is not None else [1.0] * n),
        top_k=torch.tensor(top_k if top_k is not None else [2] * n),
        temperature=temperature if temperature is not None else [0.0] * n,
        top_p=top_p if top_p is not None else [1.0] * n,
        generators=generators if generators is not None else [None] * n,
        min_p=None if min_p is None else torch.tensor(min_p),
    )
    return inputs, table


def reference_choice(base, rewards, pref_weights, weight, top_k) -> int:
    return reference_scores(base, rewards, pref_weights, weight, top_k)[0]


def reference_scores(base, rewards, pref_weights, weight, top_k) -> tuple[int, float]:
    """PAD greedy choice for one request, written out in plain Python (DESIGN
    steps 2-4), and the gap between its two best scores."""
    candidates = sorted(range(len(base)), key=lambda v: -base[v])[:top_k]

    def log_softmax_at(logits):
        top = max(logits[c] for c in candidates)
        lse = top + math.log(sum(math.exp(logits[c] - top) for c in candidates))
        return {c: logits[c] - lse for c in candidates}

    base_ls = log_softmax_at(base)
    score = {c: base[c] for c in candidates}
    for reward, w_j in zip(rewards, pref_weights, strict=True):
        rm_ls = log_softmax_at(reward)
        for c in candidates:
            score[c] += weight * w_j * (rm_ls[c] - base_ls[c])
    best = sorted(score.values(), reverse=True)
    return max(candidates, key=lambda c: score[c]), (best[0] - best[1] if len(best) > 1 else math.inf)


BASE = [5.0, 4.0, 0.0, -1.0, -2.0]
REWARD = [0.0, 3.0, 100.0, 0.0, 0.0]  # token 2 is not a candidate of top_k=2: its 100 must not matter


@pytest.mark.parametrize(("weight", "expected"), [(0.0, 0), (0.2, 0), (0.3, 1), (1.0, 1), (50.0, 1)])
def test_guidance_flips_the_choice_at_the_right_weight(weight, expected):
    # r = log_softmax([0, 3]) - log_softmax([5, 4]) = [-2.736, 1.264]; s = [5 - 2.736 w, 4 + 1.264 w]
    # crosses over at w = 0.25.
    inputs, _ = make_inputs([BASE], [REWARD], [0], weight=[weight], top_k=[2])
    assert next_tokens(inputs).tolist() == [expected]


def test_plain_and_guided_rows_mixed():
    base = [BASE, BASE, [0.0, 0.0, 0.0, 9.0, 1.0], BASE]
    # Request 0 plain; request 1 guided (flips to 1); request 2 guided with two
    # preferences; request 3 guided but with w = 0.
    rewards = [
        [0.0, 0.0, 0.0, 0.0, 6.0],  # owner 2
        REWARD,  # owner 1
        [0.0, 0.0, 0.0, 0.0, 1.0],  # owner 2
        REWARD,  # owner 3
    ]
    owner = [2, 1, 2, 3]
    pref_weight = [0.5, 1.0, 2.0, 1.0]
    inputs, table = make_inputs(base, rewards, owner, pref_weight, weight=[1.0, 1.0, 1.0, 0.0], top_k=[2, 2, 3, 2])
    tokens = next_tokens(inputs).tolist()
    assert tokens[0] == 0  # plain: argmax of the base, no reward
    assert tokens[1] == 1
    assert tokens[3] == 0  # w = 0: the base's own choice
    expected_2 = reference_choice(base[2], [rewards[0], rewards[2]], [0.5, 2.0], 1.0, 3)
    assert tokens[2] == expected_2 == 4
    # The reward rows were asked for their logits at their owner's candidates only.
    (candidates,) = table.calls
    assert candidates.shape == (4, 3)  # M reward rows x the largest top_k among guided requests
    assert candidates[0, :2].tolist() == [3, 4]  # then one of the tied zeros
    assert candidates[1, :2].tolist() == [0, 1]


def test_no_guided_rows_never_asks_for_reward_logits():
    inputs, table = make_inputs([BASE, [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert next_tokens(inputs).tolist() == [0, 4]
    assert table.calls == []


def test_guided_row_never_leaves_its_candidates_even_with_huge_weight():
    inputs, _ = make_inputs([BASE], [[0.0, 0.0, 1e4, 1e4, 1e4]], [0], weight=[1e3], top_k=[2])
    assert next_tokens(inputs).item() in (0, 1)


def test_min_p_keeps_a_huge_reward_from_promoting_an_implausible_token():
    # Token 1 has p_base / p_max = e^-1 = 0.37; token 2, e^-5 = 0.007. The
    # reward loves token 2; with min_p = 0.05 it is not a candidate, so the
    # reward can only choose among tokens 0 and 1.
    base = [[5.0, 4.0, 0.0, -1.0]]
    reward = [[0.0, 1.0, 40.0, 0.0]]
    unfloored, _ = make_inputs(base, reward, [0], weight=[8.0], top_k=[3])
    assert next_tokens(unfloored).item() == 2
    floored, table = make_inputs(base, reward, [0], weight=[8.0], top_k=[3], min_p=[0.05])
    assert next_tokens(floored).item() == 1
    # The reward is normalised over the surviving candidates only.
    floored_two, _ = make_inputs(base, reward, [0], weight=[8.0], top_k=[2])
    assert next_tokens(floored_two).item() == 1


def test_min_p_sampling_never_draws_a_dropped_candidate():
    base = [[5.0, 4.9, 4.8, 0.0, -1.0, -2.0]]
    reward = [[0.0, 0.0, 0.0, 30.0, 30.0, 30.0]]
    gen = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(200):
        inputs, _ = make_inputs(base, reward, [0], weight=[4.0], top_k=[6], temperature=[1.0],
                                generators=[gen], min_p=[0.1])
        drawn.add(next_tokens(inputs).item())
    assert drawn <= {0, 1, 2} and len(drawn) > 1


def test_top_k_one_is_plain_greedy_whatever_the_reward():
    inputs, _ = make_inputs([BASE], [[0.0, 50.0, 0.0, 0.0, 0.0]], [0], weight=[10.0], top_k=[1])
    assert next_tokens(inputs).item() == 0


def test_guided_sampling_stays_in_candidates_and_is_seeded():
    base = torch.randn(2, 40, generator=torch.Generator().manual_seed(0)).tolist()
    rewards = torch.randn(2, 40, generator=torch.Generator().manual_seed(1)).tolist()

    def draw(seed: int, steps: int = 60) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            inputs, _ = make_inputs(
                base, rewards, [0, 1], weight=[1.0, 1.0], top_k=[4, 7], temperature=[1.0, 0.0],
                generators=[gen, None],
            )
            out.append(next_tokens(inputs)[0].item())
        return out

    first = draw(3)
    allowed = set(torch.tensor(base[0]).topk(4).indices.tolist())
    assert set(first) <= allowed
    assert len(set(first)) > 1
    assert first == draw(3)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), vocab=st.integers(2, 10))
def test_property_batched_choice_equals_each_request_alone_and_reference(data, n, vocab):
    floats = st.floats(-10, 10, width=32)
    base = [data.draw(st.lists(floats, min_size=vocab, max_size=vocab, unique=True)) for _ in range(n)]
    top_k = [data.draw(st.integers(1, vocab)) for _ in range(n)]
    weight = [data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])) for _ in range(n)]
    prefs = [data.draw(st.integers(0, 2)) for _ in range(n)]  # 0 preferences: a plain row
    rewards, owner, pref_weight = [], [], []
    for i in range(n):
        for _ in range(prefs[i]):
            rewards.append(data.draw(st.lists(floats, min_size=vocab, max_size=vocab)))
            owner.append(i)
            pref_weight.append(data.draw(st.sampled_from([0.5, 1.0, 2.0])))
    order = data.draw(st.permutations(range(len(owner))))  # reward rows in any order
    rewards, owner, pref_weight = [rewards[j] for j in order], [owner[j] for j in order], [pref_weight[j] for j in order]

    inputs, _ = make_inputs(base, rewards, owner, pref_weight, weight=weight, top_k=top_k)
    batched = next_tokens(inputs).tolist()
    for i in range(n):
        mine = [j for j in range(len(owner)) if owner[j] == i]
        alone, _ = make_inputs(
            [base[i]], [rewards[j] for j in mine], [0] * len(mine), [pref_weight[j] for j in mine],
            weight=[weight[i]], top_k=[top_k[i]],
        )
        assert next_tokens(alone).item() == batched[i]
        if not mine:
            assert batched[i] == max(range(vocab), key=lambda v: base[i][v])
        else:
            expected, gap = reference_scores(
                base[i], [rewards[j] for j in mine], [pref_weight[j] for j in mine], weight[i], top_k[i]
            )
            # Only a near-tie between the two best scores (float32 vs float64) may resolve differently.
            assert batched[i] == expected or gap < 1e-3


def test_penalties_act_on_the_score_not_inside_the_reward():
    """At w = 1 with a reward model equal to the base, s = l_base' + r and r = 0
    must stay 0: a penalty on token 0 then makes token 1 win. (Penalising the
    logits inside the reward too would cancel the penalty: s = const + log p_rm.)"""
    raw = [[2.0, 1.9, 0.0, -5.0]]
    penalised = [[1.5, 1.9, 0.0, -5.0]]  # presence penalty 0.5 on token 0
    inputs, _ = make_inputs(penalised, [raw[0]], [0], weight=[1.0], top_k=[3])
    inputs.unpenalised_base_logits = torch.tensor(raw)
    assert next_tokens(inputs).tolist() == [1]
    # The same step without penalties keeps token 0.
    plain_inputs, _ = make_inputs(raw, [raw[0]], [0], weight=[1.0], top_k=[3])
    assert next_tokens(plain_inputs).tolist() == [0]
