"""The batch-editable KV cache: append, concat (left padding), select, trim."""

from __future__ import annotations

import torch

from pad_core.kv_cache import GrowableKVLayer, concat_caches, new_cache, pad_mask_left

HEADS, DIM = 2, 3


def kv(rows: int, length: int, start: float) -> torch.Tensor:
    """Distinct, recognisable values: [rows, HEADS, length, DIM]."""
    return torch.arange(rows * HEADS * length * DIM, dtype=torch.float32).reshape(rows, HEADS, length, DIM) + start


def filled_cache(rows: int, lengths_per_update: list[int], start: float, layers: int = 2):
    cache = new_cache(layers)
    pieces = []
    for step, length in enumerate(lengths_per_update):
        keys = kv(rows, length, start + 1000 * step)
        pieces.append(keys)
        for index, layer in enumerate(cache.layers):
            layer.update(keys + index, -(keys + index))
    return cache, torch.cat(pieces, dim=2)


def test_updates_append_and_keep_everything_across_growth():
    cache, expected = filled_cache(2, [5, 1, 1, 60, 1], start=0.0)  # grows past the minimum capacity
    for index, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == 68
        assert layer.key_buffer.shape[2] >= 68
        assert torch.equal(layer.keys, expected + index)
        assert torch.equal(layer.values, -(expected + index))


def test_update_returns_the_full_history():
    layer = GrowableKVLayer()
    layer.update(kv(1, 3, 0.0), kv(1, 3, 0.0))
    keys, values = layer.update(kv(1, 1, 500.0), kv(1, 1, 700.0))
    assert keys.shape == (1, HEADS, 4, DIM)
    assert torch.equal(keys[:, :, 3:], kv(1, 1, 500.0)) and torch.equal(values[:, :, 3:], kv(1, 1, 700.0))


def test_concat_left_pads_the_shorter_cache_and_keeps_rows_in_order():
    first, first_kv = filled_cache(2, [4], start=0.0)
    second, second_kv = filled_cache(1, [6, 1], start=10_000.0)
    merged = concat_caches(first, second)
    for index, layer in enumerate(merged.layers):
        assert layer.length == 7
        keys = layer.keys
        assert keys.shape == (3, HEADS, 7, DIM)
        assert torch.equal(keys[:2, :, 3:], first_kv + index)  # right-aligned
        assert torch.equal(keys[:2, :, :3], torch.zeros(2, HEADS, 3, DIM))  # left padding is zeros
        assert torch.equal(keys[2:], second_kv + index)
        assert torch.equal(layer.values[2:], -(second_kv + index))
    # Appending after a concat writes the next column of every row.
    for layer in merged.layers:
        layer.update(kv(3, 1, 99_000.0), kv(3, 1, 99_000.0))
    assert merged.layers[0].length == 8
    assert torch.equal(merged.layers[0].keys[:, :, 7:], kv(3, 1, 99_000.0))


def test_concat_when_the_new_rows_are_longer_pads_the_old_rows():
    first, first_kv = filled_cache(1, [9], start=0.0)
    second, second_kv = filled_cache(2, [2], start=5_000.0)
    merged = concat_caches(second, first)
    layer = merged.layers[0]
    assert layer.length == 9
    assert torch.equal(layer.keys[:2, :, 7:], second_kv)
    assert torch.equal(layer.keys[2], first_kv[0])


def test_select_keeps_the_chosen_rows_and_drop_leading_trims_columns():
    cache, expected = filled_cache(4, [5, 1], start=0.0)
    for layer in cache.layers:
        layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(cache.layers[0].keys, expected[[3, 1]])
    for layer in cache.layers:
        layer.drop_leading(2)
    assert cache.layers[1].get_seq_length() == 4
    assert torch.equal(cache.layers[1].keys, expected[[3, 1]][:, :, 2:] + 1)
    # Still appendable after select and trim.
    cache.layers[0].update(kv(2, 1, 42.0), kv(2, 1, 42.0))
    assert torch.equal(cache.layers[0].keys[:, :, :4], expected[[3, 1]][:, :, 2:])
    assert torch.equal(cache.layers[0].keys[:, :, 4:], kv(2, 1, 42.0))


def test_pad_mask_left():
    mask = torch.tensor([[1, 1], [0, 1]])
    assert pad_mask_left(mask, 4).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert pad_mask_left(mask, 2).tolist() == mask.tolist()
