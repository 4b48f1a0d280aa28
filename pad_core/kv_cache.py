"""A left-padded, batch-editable KV cache for Hugging Face models.

Rows join (`concat`) and leave (`select`) between steps; the prefix of a row
is never recomputed. Each layer keeps keys/values in a buffer with spare
capacity, so a decode step writes one column instead of re-allocating the
whole cache as transformers' DynamicLayer does with torch.cat.

Layout per layer: buffer [B, H, capacity, D], the first `length` columns in
use; column t of row b is a real token iff attention_mask[b, t] == 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 64


def _grown_capacity(needed: int) -> int:
    return max(_MIN_CAPACITY, 1 << (needed - 1).bit_length())


class GrowableKVLayer(DynamicLayer):
    """DynamicLayer with amortised O(1) appends."""

    def __init__(self, key_buffer: torch.Tensor | None = None, value_buffer: torch.Tensor | None = None, length: int = 0):
        super().__init__()
        self.is_initialized = False  # transformers 4.56's layer base class does not set it
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.length = length
        if key_buffer is not None:
            self.dtype, self.device = key_buffer.dtype, key_buffer.device
            self.is_initialized = True
            self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def _reserve(self, needed: int) -> None:
        if self.key_buffer is not None and needed <= self.key_buffer.shape[2]:
            return
        capacity = _grown_capacity(needed)
        self.key_buffer = _with_capacity(self.key_buffer, self.length, capacity)
        self.value_buffer = _with_capacity(self.value_buffer, self.length, capacity)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_length = self.length + key_states.shape[2]
        self._reserve(new_length)
        self.key_buffer[:, :, self.length : new_length] = key_states
        self.value_buffer[:, :, self.length : new_length] = value_states
        self.length = new_length
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5 passes the cache_position tensor
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._refresh_views()

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` positions (all-padding columns)."""
        if columns and self.is_initialized:
            self.key_buffer = self.key_buffer[:, :, columns:]
            self.value_buffer = self.value_buffer[:, :, columns:]
            self.length -= columns
            self._refresh_views()


def _with_capacity(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    shape = (*buffer.shape[:2], capacity, buffer.shape[3])
    grown = buffer.new_zeros(shape)
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowableKVLayer() for _ in range(num_layers)])


def _stack_left_padded(first: torch.Tensor, first_length: int, second: torch.Tensor, second_length: int) -> torch.Tensor:
    """Rows of two buffers [B, H, *, D] in one new buffer, right-aligned at the
    longer length (left padding is zeros), with spare capacity for appends."""
    target = max(first_length, second_length)
    rows = first.shape[0] + second.shape[0]
    merged = first.new_zeros((rows, first.shape[1], _grown_capacity(target + 1), first.shape[3]))
    merged[: first.shape[0], :, target - first_length : target] = first[:, :, :first_length]
    merged[first.shape[0] :, :, target - second_length : target] = second[:, :, :second_length]
    return merged


def concat_caches(first: Cache, second: Cache) -> Cache:
    """Rows of `first` then rows of `second`, both left padded to the longer.
    Both are left whole until the merged cache is built: a join that fails
    (out of memory) leaves the running rows' cache as it was, so only the
    joining requests fail (the engine's prefill retry relies on it). The
    price is both at once at the join's peak (the scheduler's KV budget
    counts it)."""
    target = max(first.layers[0].length, second.layers[0].length)
    layers = [
        GrowableKVLayer(
            _stack_left_padded(a.key_buffer, a.length, b.key_buffer, b.length),
            _stack_left_padded(a.value_buffer, a.length, b.value_buffer, b.length),
            target,
        )
        for a, b in zip(first.layers, second.layers, strict=True)
    ]
    return Cache(layers=layers)


def pad_mask_left(mask: torch.Tensor, target: int) -> torch.Tensor:
    return F.pad(mask, (target - mask.shape[1], 0))
