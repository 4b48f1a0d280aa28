"""The PAD guidance rule (DESIGN.md, "The algorithm") on hand-made logits, no model.

r(a) = log_softmax_k(l_rm)[a] - log_softmax_k(l_base)[a] over the k candidates
only; s(a) = l_base[a] + w * sum_j w_j r_j(a); -inf outside the candidates.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pad_core.guidance import guided_scores, masked_log_softmax, personalized_reward, prescreen, prescreen_top_k

NEG_INF = float("-inf")
finite32 = st.floats(min_value=-30, max_value=30, allow_nan=False, allow_infinity=False, width=32)


def _log_softmax(values: list[float]) -> list[float]:
    """Independent reference (pure Python, float64)."""
    top = max(values)
    lse = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - lse for v in values]


# ---- top-k prescreen ------------------------------------------------------------


def test_prescreen_picks_top_k_sorted_by_base_logit():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0, 0.0]])
    ids, valid = prescreen_top_k(logits, torch.tensor([3]))
    assert ids.tolist() == [[4, 1, 2]]
    assert valid.tolist() == [[True, True, True]]


def test_prescreen_per_row_top_k_masks_extra_columns():
    logits = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0],
            [9.0, 7.0, 8.0, 1.0, 0.0],
            [1.0, 5.0, 2.0, 6.0, 0.0],
        ]
    )
    ids, valid = prescreen_top_k(logits, torch.tensor([1, 4, 2]))
    assert ids.shape == (3, 4)  # K is the largest top_k of the batch
    assert valid.tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [True, True, False, False],
    ]
    assert ids[0, 0].item() == 4
    assert ids[1].tolist() == [0, 2, 1, 3]
    assert ids[2, :2].tolist() == [3, 1]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), vocab=st.integers(1, 12))
def test_prescreen_property_valid_columns_are_exactly_each_rows_top_k(data, rows, vocab):
    logits = [data.draw(st.lists(finite32, min_size=vocab, max_size=vocab, unique=True)) for _ in range(rows)]
    top_k = [data.draw(st.integers(1, vocab)) for _ in range(rows)]
    ids, valid = prescreen_top_k(torch.tensor(logits), torch.tensor(top_k))
    for n in range(rows):
        expected = sorted(range(vocab), key=lambda v: -logits[n][v])[: top_k[n]]
        assert valid[n].sum().item() == top_k[n]
        assert ids[n, : top_k[n]].tolist() == expected
        assert not valid[n, top_k[n] :].any()


# ---- min_p plausibility floor (our extension) -------------------------------------


def test_min_p_drops_candidates_the_base_finds_implausible():
    # p ∝ exp(logit): relative to the top token, 1.0, e^-1 = 0.37, e^-3 = 0.05, e^-6 = 0.0025
    logits = torch.tensor([[5.0, 4.0, 2.0, -1.0, -9.0]])
    ids, valid = prescreen(logits, torch.tensor([4]), torch.tensor([0.1]))
    assert ids.tolist() == [[0, 1, 2, 3]]
    assert valid.tolist() == [[True, True, False, False]]


def test_min_p_zero_or_absent_is_plain_top_k():
    logits = torch.tensor([[5.0, 4.0, 2.0, -1.0, -9.0]])
    reference = prescreen_top_k(logits, torch.tensor([4]))
    for min_p in (None, torch.tensor([0.0])):
        ids, valid = prescreen(logits, torch.tensor([4]), min_p)
        assert torch.equal(ids, reference[0]) and torch.equal(valid, reference[1])


def test_min_p_one_keeps_only_the_top_token_and_ties():
    logits = torch.tensor([[3.0, 3.0, 1.0]])
    _, valid = prescreen(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert valid.tolist() == [[True, True, False]]


def test_min_p_is_per_row():
    logits = torch.tensor([[5.0, 4.0, 2.0], [5.0, 4.0, 2.0]])
    _, valid = prescreen(logits, torch.tensor([3, 2]), torch.tensor([0.0, 0.5]))
    assert valid.tolist() == [[True, True, True], [True, False, False]]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), vocab=st.integers(1, 12))
def test_min_p_property_matches_probability_rule_and_keeps_the_top(data, rows, vocab):
    logits = [data.draw(st.lists(finite32, min_size=vocab, max_size=vocab, unique=True)) for _ in range(rows)]
    top_k = [data.draw(st.integers(1, vocab)) for _ in range(rows)]
    min_p = [data.draw(st.floats(0.0, 1.0)) for _ in range(rows)]
    ids, valid = prescreen(torch.tensor(logits), torch.tensor(top_k), torch.tensor(min_p))
    for n in range(rows):
        probs = torch.tensor(logits[n], dtype=torch.float64).softmax(-1)
        kept = {int(ids[n, j]) for j in range(ids.shape[1]) if valid[n, j]}
        assert ids[n, 0].item() in kept  # never empty
        top = sorted(range(vocab), key=lambda v: -logits[n][v])[: top_k[n]]
        for token in top[1:]:
            ratio = float(probs[token] / probs.max())
            if abs(ratio - min_p[n]) > 1e-4:  # float32 vs float64 at the boundary
                assert (token in kept) == (ratio >= min_p[n])
        assert kept <= set(top)


# ---- reward formula -------------------------------------------------------------


def test_reward_is_difference_of_candidate_log_softmaxes_exact_values():
    # Both rows are permutations of each other, so their normalisers cancel: r = l_rm - l_base.
    reward = personalized_reward(
        torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)
    )
    torch.testing.assert_close(reward, torch.tensor([[-2.0, 0.0, 2.0]]))


def test_reward_normalises_over_valid_candidates_only():
    # Column 2 is not a candidate of this row: its (huge) logits must not enter either normaliser.
    reward_logits = torch.tensor([[0.0, 1.0, 50.0]])
    base_logits = torch.tensor([[5.0, 4.0, -50.0]])
    valid = torch.tensor([[True, True, False]])
    reward = personalized_reward(reward_logits, base_logits, valid)
    # log_softmax([0, 1]) - log_softmax([5, 4]) = [-1, 1] (same normaliser shift of 1).
    torch.testing.assert_close(reward, torch.tensor([[-1.0, 1.0, 0.0]]))
    assert reward[0, 2].item() == 0.0  # invalid columns: reward 0, never NaN


def test_identical_reward_and_base_logits_give_zero_reward():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.25]])
    reward = personalized_reward(logits, logits.clone(), torch.tensor([[True, True, True, False]]))
    assert torch.equal(reward, torch.zeros_like(reward))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), k=st.integers(1, 8))
def test_reward_property_matches_reference_and_is_shift_invariant(data, k):
    rm = data.draw(st.lists(finite32, min_size=k, max_size=k))
    base = data.draw(st.lists(finite32, min_size=k, max_size=k))
    kept = data.draw(st.integers(1, k))
    valid = torch.tensor([[j < kept for j in range(k)]])
    reward = personalized_reward(torch.tensor([rm]), torch.tensor([base]), valid)
    expected = [a - b for a, b in zip(_log_softmax(rm[:kept]), _log_softmax(base[:kept]), strict=True)]
    expected += [0.0] * (k - kept)
    torch.testing.assert_close(reward, torch.tensor([expected]), atol=1e-4, rtol=1e-4)
    # Shifting either model's logits by a constant changes nothing (softmax over the candidates).
    shifted = personalized_reward(torch.tensor([rm]) + 7.5, torch.tensor([base]) - 3.25, valid)
    torch.testing.assert_close(shifted, reward, atol=1e-4, rtol=1e-4)


def test_masked_log_softmax_sets_invalid_columns_to_minus_inf():
    out = masked_log_softmax(torch.tensor([[1.0, 1.0, 9.0]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out[0, :2], torch.tensor([math.log(0.5)] * 2))
    assert out[0, 2].item() == NEG_INF


# ---- combining scores -----------------------------------------------------------


def _scores(base, valid, rewards, owner, pref_weight, weight):
    return guided_scores(
        torch.tensor(base),
        torch.tensor(valid),
        torch.tensor(rewards, dtype=torch.float32).reshape(len(owner), -1),
        torch.tensor(owner, dtype=torch.long),
        torch.tensor(pref_weight, dtype=torch.float32),
        torch.tensor(weight, dtype=torch.float32),
    )


def test_zero_weight_gives_exactly_the_base_logits():
    base = [[3.1, 2.7, -0.4]]
    scores = _scores(base, [[True, True, True]], [[100.0, -100.0, 5.0]], [0], [1.0], [0.0])
    assert torch.equal(scores, torch.tensor(base))


def test_scores_are_minus_inf_outside_the_candidates():
    scores = _scores([[3.0, 2.0, 1.0]], [[True, True, False]], [[0.5, -0.5, 0.0]], [0], [1.0], [1.0])
    assert scores[0, :2].tolist() == [3.5, 1.5]
    assert scores[0, 2].item() == NEG_INF


def test_several_preferences_sum_with_their_weights():
    base = [[1.0, 0.0, -1.0], [4.0, 3.0, 2.0]]
    valid = [[True, True, True], [True, True, False]]
    # Two reward rows for request 0, one for request 1.
    rewards = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [2.0, -2.0, 0.0]]
    scores = _scores(base, valid, rewards, [0, 0, 1], [0.5, 2.0, 1.5], [2.0, 0.5])
    # Request 0: 1 + 2 * (0.5*1 + 2*-1) = -2, 0 + 2 * (1 + 1) = 4, -1 + 2 * (1.5 + 0) = 2.
    # Request 1: 4 + 0.5 * 1.5 * 2 = 5.5, 3 - 0.5 * 3 = 1.5, invalid.
    assert scores.tolist() == [[-2.0, 4.0, 2.0], [5.5, 1.5, NEG_INF]]


def test_request_without_reward_rows_keeps_base_scores_in_a_guided_batch():
    scores = _scores(
        [[1.0, 2.0], [5.0, 6.0]], [[True, True], [True, True]], [[10.0, -10.0]], [1], [1.0], [1.0, 1.0]
    )
    assert scores[0].tolist() == [1.0, 2.0]
    assert scores[1].tolist() == [15.0, -4.0]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), k=st.integers(1, 6), m=st.integers(0, 6))
def test_guided_scores_property_matches_reference(data, n, k, m):
    base = [data.draw(st.lists(finite32, min_size=k, max_size=k)) for _ in range(n)]
    kept = [data.draw(st.integers(1, k)) for _ in range(n)]
    valid = [[j < kept[i] for j in range(k)] for i in range(n)]
    rewards = [data.draw(st.lists(finite32, min_size=k, max_size=k)) for _ in range(m)]
    owner = [data.draw(st.integers(0, n - 1)) for _ in range(m)]
    pref_weight = [data.draw(st.floats(0, 3, width=32)) for _ in range(m)]
    weight = [data.draw(st.floats(0, 4, width=32)) for _ in range(n)]
    scores = guided_scores(
        torch.tensor(base),
        torch.tensor(valid),
        torch.tensor(rewards, dtype=torch.float32).reshape(m, k),
        torch.tensor(owner, dtype=torch.long),
        torch.tensor(pref_weight, dtype=torch.float32),
        torch.tensor(weight, dtype=torch.float32),
    )
    for i in range(n):
        for j in range(k):
            if not valid[i][j]:
                assert scores[i, j].item() == NEG_INF
                continue
            summed = sum(pref_weight[r] * rewards[r][j] for r in range(m) if owner[r] == i)
            assert scores[i, j].item() == pytest.approx(base[i][j] + weight[i] * summed, rel=1e-4, abs=1e-3)
        if weight[i] == 0:
            assert torch.equal(scores[i, : kept[i]], torch.tensor(base[i][: kept[i]]))
