"""Next-token choice without a model: penalties, top-p, greedy, seeded sampling, temperature."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pad_core.sampling import apply_penalties, choose_tokens, draw, draw_rows, top_logprobs, top_p_filter

NEG_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- penalties ------------------------------------------------------------------


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[0, 2, 1, 0], [3, 0, 0, 1]])
    out = apply_penalties(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([0.25, -1.0]))
    # logit - presence * (count > 0) - frequency * count, per row.
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0], [3.0, 0.0, 0.0, 1.0]]
    assert logits.tolist()[0] == [1.0, 1.0, 1.0, 1.0]  # input untouched


def test_zero_penalties_leave_logits_unchanged():
    logits = torch.randn(3, 11, generator=_gen(0))
    counts = torch.randint(0, 4, (3, 11), generator=_gen(1))
    out = apply_penalties(logits, counts, torch.zeros(3), torch.zeros(3))
    assert torch.equal(out, logits)


# ---- top-p ----------------------------------------------------------------------


def top_p_one(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p_filter of one distribution."""
    return top_p_filter(probs[None], torch.tensor([top_p]))[0]


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose
    assert top_p_one(probs, 0.8).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3])
    assert top_p_one(probs, 0.81).tolist() == pytest.approx([0.15, 0.5, 0.0, 0.3])
    assert top_p_one(probs, 1.0).tolist() == probs.tolist()


def test_top_p_always_keeps_the_most_likely_token():
    probs = torch.tensor([0.1, 0.6, 0.3])
    assert top_p_one(probs, 1e-6).tolist() == pytest.approx([0.0, 0.6, 0.0])


def test_top_p_filters_each_row_by_its_own_mass():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.15, 0.5, 0.05, 0.3], [0.1, 0.6, 0.3, 0.0]])
    kept = top_p_filter(probs, torch.tensor([0.8, 1.0, 1e-6]))
    assert kept.tolist() == [pytest.approx([0.0, 0.5, 0.0, 0.3]), probs[1].tolist(), pytest.approx([0.0, 0.6, 0.0, 0.0])]


@settings(max_examples=80, deadline=None)
@given(
    weights=st.lists(st.floats(0.0625, 10.0, width=32), min_size=1, max_size=12),
    top_p=st.floats(0.01, 1.0, exclude_min=False),
)
def test_top_p_property(weights, top_p):
    probs = torch.tensor(weights)
    probs = probs / probs.sum()
    kept = top_p_one(probs, top_p)
    mask = kept > 0
    assert mask.any()
    assert torch.equal(kept[mask], probs[mask])  # survivors untouched (not renormalised)
    # Every kept token is at least as likely as every dropped one.
    if (~mask).any():
        assert probs[mask].min() >= probs[~mask].max()
        # The kept set reaches top_p, and dropping its least likely member would fall short: minimal.
        assert kept.sum().item() >= top_p - 1e-6
        assert kept.sum().item() - probs[mask].min().item() < top_p + 1e-6


# ---- greedy ---------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_ignores_generators():
    scores = torch.tensor([[0.1, 2.5, NEG_INF, 2.4], [NEG_INF, NEG_INF, -3.0, NEG_INF], [5.0, 1.0, 0.0, 4.9]])
    chosen = choose_tokens(scores, [0.0, 0.0, 0.0], [0.1, 1.0, 0.5], [None, _gen(1), None])
    assert chosen.tolist() == [1, 2, 0]


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=9, unique=True), min_size=1, max_size=4))
def test_greedy_property_equals_argmax(rows):
    width = min(len(r) for r in rows)
    scores = torch.tensor([r[:width] for r in rows])
    chosen = choose_tokens(scores, [0.0] * len(rows), [1.0] * len(rows), [None] * len(rows))
    assert chosen.tolist() == [max(range(width), key=lambda j: r[j]) for r in rows]


# ---- seeded sampling ------------------------------------------------------------


def _draws(scores_row: torch.Tensor, seed: int, steps: int, temperature: float = 1.0, top_p: float = 1.0):
    generator = _gen(seed)
    return [choose_tokens(scores_row[None], [temperature], [top_p], [generator]).item() for _ in range(steps)]


def test_seeded_sampling_is_reproducible():
    scores = torch.randn(50, generator=_gen(3))
    first = _draws(scores, seed=1234, steps=40)
    assert first == _draws(scores, seed=1234, steps=40)
    assert first != _draws(scores, seed=4321, steps=40)  # a different seed is a different stream
    assert len(set(first)) > 5  # it really samples


def test_a_rows_samples_do_not_depend_on_the_other_rows_of_the_batch():
    scores = torch.randn(30, generator=_gen(7))
    alone = _draws(scores, seed=99, steps=25)

    batched = []
    mine = _gen(99)
    other_a, other_b = _gen(5), _gen(6)
    for step in range(25):
        noise = torch.randn(2, 30, generator=_gen(100 + step))
        # Our row sits in the middle; neighbours sample (with their own generators)
        # or decode greedily, with other temperatures and top_p.
        batch = torch.stack([noise[0], scores, noise[1], noise[0] * 3])
        chosen = choose_tokens(batch, [0.7, 1.0, 0.0, 1.3], [0.9, 1.0, 1.0, 0.5], [other_a, mine, None, other_b])
        batched.append(chosen[1].item())
    assert batched == alone


def test_sampling_never_picks_excluded_or_top_p_filtered_columns():
    scores = torch.tensor([2.0, NEG_INF, 1.9, 1.8, -5.0, NEG_INF])
    draws = _draws(scores, seed=0, steps=300, temperature=1.0, top_p=1.0)
    assert {1, 5}.isdisjoint(draws)
    # softmax([2, 1.9, 1.8, -5]) ~ [.37, .33, .30, .0003]: top_p 0.6 keeps only columns 0 and 2.
    draws = _draws(scores, seed=0, steps=300, temperature=1.0, top_p=0.6)
    assert set(draws) == {0, 2}


def test_temperature_shapes_the_distribution():
    scores = torch.tensor([2.0, 1.0, 0.0])
    steps = 3000
    at_one = _draws(scores, seed=11, steps=steps, temperature=1.0)
    expected = torch.softmax(scores, dim=0).tolist()
    for token in range(3):
        assert at_one.count(token) / steps == pytest.approx(expected[token], abs=0.03)

    cold = _draws(scores, seed=11, steps=500, temperature=0.05)
    assert cold.count(0) == 500  # exp(-20): the runner-up never shows up

    hot = _draws(scores, seed=11, steps=steps, temperature=50.0)
    for token in range(3):
        assert hot.count(token) / steps == pytest.approx(1 / 3, abs=0.04)


# ---- logprobs -------------------------------------------------------------------


def test_top_logprobs_shapes_and_values():
    log_probs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]]), dim=-1)
    chosen, values, ids = top_logprobs(log_probs, torch.tensor([2, 3]), 2)
    assert chosen.tolist() == pytest.approx([log_probs[0, 2].item(), log_probs[1, 3].item()])
    assert ids.tolist() == [[1, 2], [2, 3]]
    assert values.shape == (2, 2) and torch.equal(values, log_probs.gather(1, ids))
    chosen, values, ids = top_logprobs(log_probs, torch.tensor([0, 0]), 0)
    assert values.shape == (2, 0) and ids.shape == (2, 0)


def test_a_draw_is_multinomials_draw_without_its_device_reads():
    """draw() takes multinomial's exponential race: the same index and the
    same generator state after it, for any distribution (zeros included)."""
    for seed in range(100):
        probs = torch.softmax(torch.randn(40, generator=torch.Generator().manual_seed(500 + seed)) * 3, dim=-1)
        probs[torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(seed))] = 0.0
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            index = draw(probs, ours)
            assert index.shape == (1,) and probs[index] > 0
            assert index.item() == torch.multinomial(probs, 1, generator=theirs).item()
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_rows_drawn_together_are_each_rows_own_draw():
    """draw_rows races every row into one buffer: each row's index and its
    generator's state after are those of draw() on that row alone, so a
    request's samples do not depend on its batch."""
    probs = torch.softmax(torch.randn(7, 50, generator=torch.Generator().manual_seed(3)) * 2, dim=-1)
    probs[2, :45] = 0.0
    probs[2] /= probs[2].sum()
    together = [torch.Generator().manual_seed(seed) for seed in range(7)]
    alone = [torch.Generator().manual_seed(seed) for seed in range(7)]
    for _ in range(5):
        drawn = draw_rows(probs, together)
        assert drawn.shape == (7,) and drawn.dtype == torch.long and int(drawn[2]) >= 45
        assert drawn.tolist() == [int(draw(probs[row], alone[row])) for row in range(7)]
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(together, alone))
