"""The model runner on the tiny model: rows joining (prefill + concat), decoding
together, leaving (select + trim), each row's hidden states matching the same
context run alone / recomputed from scratch (float32; padding and batching
change float reduction order, hence a tolerance rather than equality)."""

from __future__ import annotations

import pytest
import torch

from pad_core.runner import NewRow, TransformersRunner

ATOL = 1e-4


@pytest.fixture
def runner(tiny_model, tokenizer):
    return TransformersRunner(tiny_model, pad_token_id=tokenizer.pad_token_id)


def ids(count: int, seed: int) -> list[int]:
    return torch.randint(3, 40_000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def recomputed(model, context: list[int]) -> torch.Tensor:
    """Last hidden state of a context, computed from scratch without a cache."""
    return model.model(input_ids=torch.tensor([context])).last_hidden_state[0, -1]


def check(runner, hidden, contexts, model):
    index = runner.row_index()
    for key, context in contexts.items():
        torch.testing.assert_close(hidden[index[key]], recomputed(model, context), atol=ATOL, rtol=0)


def decode_step(runner, contexts, step_seed):
    tokens = ids(runner.num_rows, step_seed)
    for key, token in zip(runner.row_keys, tokens, strict=True):
        contexts[key].append(token)
    return runner.decode(torch.tensor(tokens))


def test_rows_join_decode_and_leave_matching_full_recompute(runner, tiny_model):
    contexts = {"a": ids(7, 1), "b": ids(20, 2)}
    hidden = runner.prefill([NewRow("a", contexts["a"]), NewRow("b", contexts["b"])])
    assert runner.row_keys == ["a", "b"] and hidden.shape == (2, 64)
    check(runner, hidden, contexts, tiny_model)

    for step in range(3):
        check(runner, decode_step(runner, contexts, 100 + step), contexts, tiny_model)

    # A longer row joins: the running rows get padded on the left.
    contexts["c"] = ids(35, 3)
    hidden_c = runner.prefill([NewRow("c", contexts["c"])])
    torch.testing.assert_close(hidden_c[0], recomputed(tiny_model, contexts["c"]), atol=ATOL, rtol=0)
    assert runner.cache_columns == 35
    for step in range(3):
        check(runner, decode_step(runner, contexts, 200 + step), contexts, tiny_model)

    # A row in the middle leaves.
    runner.remove({"b"})
    del contexts["b"]
    assert runner.row_keys == ["a", "c"]
    for step in range(2):
        check(runner, decode_step(runner, contexts, 300 + step), contexts, tiny_model)

    # The longest row leaves: columns that are padding in every row are dropped.
    runner.remove({"c"})
    del contexts["c"]
    assert runner.cache_columns == len(contexts["a"])
    contexts["d"] = ids(3, 4)
    runner.prefill([NewRow("d", contexts["d"])])
    for step in range(2):
        check(runner, decode_step(runner, contexts, 400 + step), contexts, tiny_model)

    runner.remove({"a", "d"})
    assert runner.num_rows == 0 and runner.cache_columns == 0


def test_a_row_alone_and_in_a_batch_of_other_lengths_give_the_same_hidden_states(tiny_model, tokenizer):
    prompt, steps = ids(12, 10), [ids(1, 20 + s)[0] for s in range(6)]

    alone = TransformersRunner(tiny_model, pad_token_id=tokenizer.pad_token_id)
    alone_hidden = [alone.prefill([NewRow("x", prompt)])[0]]
    for token in steps:
        alone_hidden.append(alone.decode(torch.tensor([token]))[0])

    batched = TransformersRunner(tiny_model, pad_token_id=tokenizer.pad_token_id)
    batched.prefill([NewRow("long", ids(30, 11)), NewRow("short", ids(2, 12))])
    batched.decode(torch.tensor(ids(2, 13)))
    batch_hidden = [batched.prefill([NewRow("x", prompt)])[0]]
    for step, token in enumerate(steps):
        if step == 3:
            batched.remove({"long"})
        if step == 2:
            batched.prefill([NewRow("late", ids(50, 14))])
        others = ids(batched.num_rows, 30 + step)
        tokens = [token if key == "x" else other for key, other in zip(batched.row_keys, others, strict=True)]
        batch_hidden.append(batched.decode(torch.tensor(tokens))[batched.row_index()["x"]])

    for step, (a, b) in enumerate(zip(alone_hidden, batch_hidden, strict=True)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"step {step}")


def test_output_head_at_candidates_equals_full_logits_gathered(runner, tiny_model):
    hidden = runner.prefill([NewRow("a", ids(5, 1)), NewRow("b", ids(9, 2))])
    full = runner.head.full(hidden)
    assert full.shape == (2, tiny_model.config.vocab_size) and full.dtype == torch.float32
    torch.testing.assert_close(full, tiny_model.lm_head(hidden), atol=1e-5, rtol=0)
    candidates = torch.tensor([[5, 17, 40_000], [1, 2, 3]])
    torch.testing.assert_close(runner.head.at(hidden, candidates), full.gather(1, candidates), atol=1e-5, rtol=0)


def test_rows_joining_beside_an_earlier_piece_are_packed_to_the_widest_row(runner, tiny_model):
    """A prompt finishing its second piece (60 tokens held, 14 more) joins
    beside a new 100-token prompt: written 60 + 100 columns wide, packed to
    100 (the widest row), each row's hidden states unchanged."""
    first, second = ids(74, 1), ids(100, 2)
    runner.prefill([NewRow("a", first[:60], last=False)])
    hidden = runner.prefill([NewRow("a", first[60:], start=60), NewRow("b", second)])
    assert runner.cache_columns == 100 and runner.attention_mask.shape == (2, 100)
    torch.testing.assert_close(hidden[0], recomputed(tiny_model, first), atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[1], recomputed(tiny_model, second), atol=ATOL, rtol=0)
    contexts = {"a": list(first), "b": list(second)}
    for step in range(3):
        check(runner, decode_step(runner, contexts, 10 + step), contexts, tiny_model)


def test_a_join_that_fails_leaves_the_running_rows_as_they_were(runner, tiny_model, monkeypatch):
    """Out of memory halfway through merging the caches: the joining row
    fails, the running rows decode on (the engine retries the joining
    requests on their own, so the cache must not be half let go)."""
    import pad_core.kv_cache as kv_cache

    contexts = {"a": ids(20, 3), "b": ids(35, 4)}
    runner.prefill([NewRow(key, context) for key, context in contexts.items()])
    stack, calls = kv_cache._stack_left_padded, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:  # the second layer: the first is merged already
            raise torch.OutOfMemoryError("no memory left")
        return stack(*args)

    monkeypatch.setattr(kv_cache, "_stack_left_padded", failing)
    with pytest.raises(torch.OutOfMemoryError):
        runner.prefill([NewRow("c", ids(50, 5))])
    monkeypatch.setattr(kv_cache, "_stack_left_padded", stack)
    assert list(runner.row_index()) == ["a", "b"]
    for step in range(2):
        check(runner, decode_step(runner, contexts, 20 + step), contexts, tiny_model)
