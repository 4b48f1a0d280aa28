"""A runner whose rows live in a preallocated KV pool of fixed slots.

Why: the transformers runner (pad_core.runner) keeps one left-padded cache
for the batch, so a joining row re-allocates and copies every running row's
cache (concat with left padding), and a leaving row copies the survivors
(select). Here every layer owns one buffer per K and V,

    pool [slots, kv_heads, slot_tokens, head_dim]

allocated once. A row takes a free slot when it joins (its prompt's K/V are
written into that slot, columns 0..len-1, no left padding) and gives it back
when it leaves: no other row's cache is touched, and the buffers never move,
which is what CUDA graphs need (the decode step reads and writes the same
addresses every time).

The decode batch is the prefix of slots [0, batch_size): free slots inside
it decode a dummy token (position 0, attending to column 0 of their own
slot) and are ignored. Rows take the lowest free slot, so the prefix stays
short; `batch_buckets` rounds it up to a few fixed sizes (one CUDA graph per
size, later). Attention reads each row's slot up to the longest live row.

The model's own transformers modules compute the forward (any decoder that
calls `cache.update` and takes a 4D attention mask: Llama, Qwen, Mistral...);
this module only decides where K/V are written and which columns a query
sees, so float32 greedy tokens equal the transformers runner's.

The decode step reads only buffers that never move (the tokens, the
lengths, the pool, one row mask per LoRA adapter) and has fixed shapes for a
given (batch bucket, read-length bucket), so on CUDA it is recorded once per
bucket pair in a CUDA graph and replayed (pad_core.cuda_graphs); on the CPU
the very same step runs eagerly. The read length is bucketed (powers of
two) on both, so CPU tests run the shapes the GPU records.

Prefill may come in pieces (chunked prefill): a row keeps its slot while
its prompt is written over several calls, each piece attending to the
columns before it, and joins the decode batch with its last piece (until
then its slot decodes a dummy token, like a free one, whose K/V the next
piece overwrites).

A model with SDPA attention is switched to pad_core.attention's, the same
results, whose decode step reads each KV head once (transformers' SDPA path
repeats the KV heads for grouped-query attention when a mask is given, a
copy of the whole read per layer per step).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from pad_core.attention import GROUPED_DECODE, use_grouped_decode_attention
from pad_core.cuda_graphs import EagerSteps, GraphedSteps, read_length_bucket, read_length_buckets
from pad_core.errors import ModelLoadError
from pad_core.lora import NO_ADAPTER
from pad_core.prefix_cache import PrefixCache
from pad_core.runner import ModelRows, NewRow, RowKey
from pad_core.transfer import copy_to

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = ("sdpa", "eager", GROUPED_DECODE)
MIN_SLOT_TOKENS = 64


@dataclass(frozen=True)
class PoolShape:
    """Sizes of a KV pool; `bytes` is what it takes (K and V, every layer)."""

    num_layers: int
    slots: int
    kv_heads: int
    slot_tokens: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    @property
    def bytes(self) -> int:
        return self.slots * self.slot_tokens * self.bytes_per_token


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def slot_tokens_for_budget(budget_bytes: int, slots: int, bytes_per_token: int, context_length: int) -> int:
    """Tokens each of `slots` slots can hold within `budget_bytes`, at most
    the model's context length. Raises ModelLoadError below MIN_SLOT_TOKENS
    (a pool that cannot hold a conversation)."""
    tokens = min(context_length, budget_bytes // max(1, slots * bytes_per_token))
    if tokens < MIN_SLOT_TOKENS:
        raise ModelLoadError(
            f"the KV pool budget ({budget_bytes / 2**30:.2f} GiB) gives {slots} slots only {tokens} tokens each; "
            "raise kv_pool_gib / gpu_memory_utilization, or lower prefix_cache_gib or max_batch_rows"
        )
    return int(tokens)


def decode_batch_size(high_water: int, buckets: Sequence[int] | None) -> int:
    """Width of the decode batch for live slots below `high_water`: exactly
    that without buckets, else the smallest bucket that holds it (the last
    bucket is the pool's slot count, so one always does)."""
    if not buckets:
        return high_water
    return next(size for size in buckets if size >= high_water)


def model_kv_geometry(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers causal LM."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


@dataclass
class _Plan:
    """Where one forward writes K/V and what it reads back.

    prefill: rows [B] are slot ids. New rows only (read_length 0): written at
    columns 0..Q-1, attention sees only the new tokens (no past). With rows
    that continue (chunked prefill): columns [B, Q], row b's query q writes
    column start_b + q (a padding query: the scratch column), attention
    reads each slot's columns [0, read_length).
    decode: the batch is slots [0, B); row b writes column columns[b] and
    reads columns [0, read_length)."""

    prefill: bool
    slots: torch.Tensor  # [B] long
    columns: torch.Tensor  # prefill: [Q] or [B, Q] long; decode: [B] long
    read_length: int = 0


class _SlotLayer(DynamicLayer):
    """One layer of the pool as a transformers cache layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, owner: _SlotCache):
        super().__init__()
        self.key_pool, self.value_pool, self.owner = keys, values, owner
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, Q, D] -> the K/V attention sees."""
        plan = self.owner.plan
        if plan.prefill:
            rows = plan.slots[:, None]
            columns = plan.columns if plan.columns.dim() == 2 else plan.columns[None, :]
            self.key_pool[rows, :, columns] = key_states.transpose(1, 2)  # [B, Q, kv_heads, D]
            self.value_pool[rows, :, columns] = value_states.transpose(1, 2)
            if not plan.read_length:  # new rows: nothing before these tokens
                return key_states, value_states
            return self.key_pool[plan.slots, :, : plan.read_length], self.value_pool[plan.slots, :, : plan.read_length]
        batch = key_states.shape[0]
        self.key_pool[plan.slots, :, plan.columns] = key_states[:, :, 0]  # [B, kv_heads, D]
        self.value_pool[plan.slots, :, plan.columns] = value_states[:, :, 0]
        return self.key_pool[:batch, :, : plan.read_length], self.value_pool[:batch, :, : plan.read_length]

    def get_seq_length(self) -> int:
        return 0  # unused: positions and the 4D mask are given

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # unused: the 4D mask is given

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("pool rows leave by slot, they are never selected")


class _SlotCache(Cache):
    def __init__(self, shape: PoolShape, device: torch.device):
        self.plan: _Plan | None = None
        # One column more per slot: the scratch column padding queries of a
        # chunked prefill write to (never read: reads stop at slot_tokens).
        size = (shape.slots, shape.kv_heads, shape.slot_tokens + 1, shape.head_dim)
        # zeros, not empty: a stale column is masked out, and 0 * NaN would not be 0
        layers = [
            _SlotLayer(torch.zeros(size, dtype=shape.dtype, device=device),
                       torch.zeros(size, dtype=shape.dtype, device=device), self)
            for _ in range(shape.num_layers)
        ]
        super().__init__(layers=layers)


def attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask in the form the model's attention takes: bool (True =
    attend) for SDPA, additive (0 / most negative) for eager."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class SlotRunner(ModelRows):
    """Decodes rows of one Hugging Face causal LM whose KV caches live in a
    preallocated pool of `slots` slots of `slot_tokens` tokens each."""

    def __init__(self, model: torch.nn.Module, slots: int, slot_tokens: int, pad_token_id: int = 0,
                 fingerprint: Callable[[], str] | None = None, batch_buckets: Sequence[int] | None = None,
                 steps: EagerSteps | GraphedSteps | None = None, prefix_cache: PrefixCache | None = None):
        implementation = model.config.get_text_config()._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ModelLoadError(f"the slots backend supports attention {SUPPORTED_ATTENTION}, not {implementation!r}")
        if use_grouped_decode_attention(model):  # decode steps read each KV head once (pad_core.attention)
            implementation = "sdpa"  # its masks are SDPA's
        super().__init__(model, pad_token_id, fingerprint)  # self._index: row key -> slot (num_rows counts it)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._attention = implementation
        num_layers, kv_heads, head_dim = model_kv_geometry(model)
        self.shape = PoolShape(num_layers, slots, kv_heads, slot_tokens, head_dim, self.dtype)
        self.cache = _SlotCache(self.shape, self.device)
        self.buckets = tuple(sorted(set(batch_buckets))) if batch_buckets else None
        if self.buckets and self.buckets[-1] < slots:
            self.buckets = (*self.buckets, slots)
        # Per slot, on the device: tokens held (the next write column and
        # position) and whether a row lives there. Free slots hold 0.
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.live = torch.zeros(slots, dtype=torch.long, device=self.device)
        # The decode step's other inputs, at fixed addresses (CUDA graphs replay them).
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # next input of each slot
        self._slot_ids = torch.arange(slots, device=self.device)
        self._columns = torch.arange(slot_tokens, device=self.device)
        self._adapter_masks: dict[str, torch.Tensor] = {}  # adapter -> [slots, 1, 1], 1 where a row uses it
        self.steps = steps or EagerSteps()  # runs the decode step: eagerly, or recorded in CUDA graphs
        self._graphed_adapters: tuple[str, ...] = ()
        # The same, on the host (no device sync to size a step).
        self._free = list(range(slots))  # a heap: rows take the lowest free slot
        self._adapters = [NO_ADAPTER] * slots
        self._prefix_keys: list[Hashable] = [NO_ADAPTER] * slots  # each slot's row's NewRow.prefix_key
        self._pending: dict[int, int] = {}  # slot of a row whose prompt is not complete -> tokens written
        self._host_lengths: dict[int, int] = {}  # live slot -> tokens held
        self._steps = 0  # decode steps so far; a live slot holds its _host_lengths + steps since it joined
        self._joined_at: dict[int, int] = {}
        self._longest = 0  # tokens of the longest live row
        self._high_water = 0  # 1 + highest live slot
        self.prefix_cache = prefix_cache  # finished rows' KV, copied into a new row's slot (pad_core.prefix_cache)
        logger.info("KV pool: %d slots x %d tokens, %.2f GiB", slots, slot_tokens, self.shape.bytes / 2**30)

    # ---- the Runner protocol ---------------------------------------------
    @property
    def batch_size(self) -> int:
        return decode_batch_size(self._high_water, self.buckets) if self._index else 0

    @property
    def slot_tokens(self) -> int:
        return self.shape.slot_tokens

    @property
    def kv_usage(self) -> float:
        """Slots taken (a row holds its whole slot, written or not) over slots."""
        return 1.0 - len(self._free) / self.shape.slots

    @property
    def chunked_prefill(self) -> bool:
        return True

    @property
    def runs_identical_rows_once(self) -> bool:
        return False  # each row writes its own slot

    def adapters_in_use(self) -> Collection[str]:
        return set(self._adapters)  # free slots hold NO_ADAPTER

    def _installed_adapters(self) -> tuple[str, ...]:
        """The adapters held, in a fixed order: part of a decode graph's key
        (the step's code computes each one's LoRA)."""
        return tuple(sorted(self.lora.names))

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self._adapter_masks.pop(name, None)
        # The decode graphs recorded with it read its weights and its mask: dropped now, not at the next
        # decode, where an adapter loaded meanwhile under the same name would give the same key.
        self.steps.clear()
        self._graphed_adapters = self._installed_adapters()

    @torch.inference_mode()
    def prefill(self, rows: Sequence[NewRow]) -> torch.Tensor:
        """Writes prompt tokens into slots: a row with start 0 takes the lowest
        free slot, a row with start > 0 continues the slot it holds (chunked
        prefill: start must be the tokens it has). Rows are right padded to
        the longest; padding stays beyond a row's tokens in its own slot. A
        row whose prompt is complete (`last`) joins the decode batch. Returns
        the hidden states of each row's last given token [len(rows), H]."""
        new_rows = [row for row in rows if row.start == 0]
        if len(new_rows) > len(self._free):
            raise RuntimeError(f"{len(new_rows)} new rows but {len(self._free)} free KV slots")
        for row in rows:
            if not row.prompt_ids:
                raise ValueError(f"row {row.key!r}: no prompt tokens to write")
            if row.start + len(row.prompt_ids) > self.slot_tokens:
                raise RuntimeError(f"a prompt of {row.start + len(row.prompt_ids)} tokens does not fit a "
                                   f"{self.slot_tokens}-token KV slot")
            if row.start == 0 and row.key in self._index:
                raise ValueError(f"row {row.key!r} is already in the pool")
            if row.start and self._pending.get(self._index.get(row.key, -1)) != row.start:
                raise ValueError(f"row {row.key!r} does not hold {row.start} tokens of an unfinished prompt")
        taken = [heapq.heappop(self._free) for _ in new_rows]
        fresh = iter(taken)
        slots = [next(fresh) if row.start == 0 else self._index[row.key] for row in rows]
        try:
            hidden = self._prefill_forward(self._from_cached_prefixes(rows, slots), slots)
        except BaseException:
            for slot in taken:
                heapq.heappush(self._free, slot)
            raise
        self._record_prefill(rows, slots)
        return hidden

    def _from_cached_prefixes(self, rows: Sequence[NewRow], slots: list[int]) -> list[NewRow]:
        """Copies the longest cached prefix of each new row's tokens into its
        slot; such a row then continues from there (as a chunked prefill's
        next piece does), the others are as given."""
        if self.prefix_cache is None:
            return list(rows)
        given = []
        for row, slot in zip(rows, slots, strict=True):
            length, kv = self.prefix_cache.longest(row.prefix_key, row.prompt_ids) if row.start == 0 else (0, None)
            if length:
                for layer, layer_kv in zip(self.cache.layers, kv, strict=True):  # kv [layers, 2, heads, length, D]
                    layer.key_pool[slot, :, :length] = layer_kv[0]
                    layer.value_pool[slot, :, :length] = layer_kv[1]
                row = dataclasses.replace(row, prompt_ids=row.prompt_ids[length:], start=length)
            given.append(row)
        return given

    def retain(self, rows: Mapping[RowKey, Sequence[int]]) -> None:
        """Copies the KV of live rows (their slot's first tokens) into the
        prefix cache, with each row's tokens, of which a slot holds the first
        `_row_length` (an answer's last token was chosen, never fed); only
        what the cache will keep is copied. Rows still being prefilled are
        left out."""
        if self.prefix_cache is None:
            return
        shape = self.shape
        bytes_per_token = 2 * shape.num_layers * shape.kv_heads * shape.head_dim * self.cache.layers[0].key_pool.element_size()
        for key, tokens in rows.items():
            slot = self._index.get(key)
            if slot is None or slot in self._pending:
                continue
            held = tokens[: self._row_length(slot)]
            length = self.prefix_cache.kept_length(self._prefix_keys[slot], held, bytes_per_token)
            if length:
                kv = torch.stack([torch.stack((layer.key_pool[slot, :, :length], layer.value_pool[slot, :, :length]))
                                  for layer in self.cache.layers])
                self.prefix_cache.store(self._prefix_keys[slot], held[:length], kv)

    def _record_prefill(self, rows: Sequence[NewRow], slots: list[int]) -> None:
        ends = [row.start + len(row.prompt_ids) for row in rows]
        new = [(row, slot) for row, slot in zip(rows, slots, strict=True) if row.start == 0]
        for row, slot in new:
            self._index[row.key] = slot
            self._prefix_keys[slot] = row.prefix_key
        self._set_adapters([slot for _, slot in new], [row.adapter for row, _ in new])
        complete = []
        for row, slot, end in zip(rows, slots, ends, strict=True):
            if row.last:
                self._pending.pop(slot, None)
                self._host_lengths[slot], self._joined_at[slot] = end, self._steps
                complete.append(slot)
            else:
                self._pending[slot] = end
        self.lengths[torch.tensor(slots, device=self.device)] = torch.tensor(ends, device=self.device)
        if complete:
            self.live[torch.tensor(complete, device=self.device)] = 1
            self._longest = max(self._longest, *(self._host_lengths[slot] for slot in complete))
        self._high_water = max(self._high_water, max(slots) + 1)

    @torch.inference_mode()
    def decode(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot of the decode batch ([batch_size], by
        `row_index()`); returns hidden states [batch_size, H], valid until
        the next decode (with CUDA graphs, a buffer the next replay reuses)."""
        batch = self.batch_size
        read_length = read_length_bucket(self._longest + 1, self.slot_tokens)
        copy_to(self._tokens[:batch], next_tokens)
        adapters = self._installed_adapters()
        if adapters != self._graphed_adapters:  # the step's code changed: older graphs are stale
            self.steps.clear()
            self._graphed_adapters = adapters
        hidden = self.steps.run((batch, read_length, adapters), lambda: self._decode_step(batch, read_length))
        self.lengths[:batch] += self.live[:batch]
        self._steps += 1
        self._longest += 1
        return hidden

    @torch.inference_mode()
    def record_graphs(self) -> int:
        """Records the decode step of every (batch bucket, read-length
        bucket) now, largest batch first (as nano-vllm: the graphs' shared
        memory is sized by the first), so serving never waits for a capture.
        Before any row joins: the steps run on the free slots (writing column
        0 of each, which a prefill overwrites). Returns the graphs held; 0
        where steps are not recorded (eager)."""
        if not self.steps.records:
            return 0
        if self._index:
            raise RuntimeError("decode graphs are recorded before rows join")
        self._graphed_adapters = adapters = self._installed_adapters()
        for batch in sorted(self.buckets or (self.shape.slots,), reverse=True):
            for read_length in read_length_buckets(self.slot_tokens):
                self.steps.run((batch, read_length, adapters),
                               lambda batch=batch, read_length=read_length: self._decode_step(batch, read_length))
        return self.steps.graphs

    def _decode_step(self, batch: int, read_length: int) -> torch.Tensor:
        """The recorded step: reads the fixed buffers only, writes each row's
        new K/V at column lengths[b] (the same column when run again: the
        lengths advance outside), returns hidden states [batch, H]."""
        lengths = self.lengths[:batch]
        # A live row sees its tokens and the new one; a free slot sees column 0 (its dummy token).
        allowed = (self._columns[None, :read_length] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, read]
        self.cache.plan = _Plan(False, self._slot_ids[:batch], lengths, read_length)
        self.lora.use_row_masks([(name, self._adapter_mask(name)[:batch]) for name in self._graphed_adapters])
        hidden = self._forward(self._tokens[:batch, None], allowed, lengths[:, None], adapters=None)
        return hidden[:, -1]

    def _adapter_mask(self, name: str) -> torch.Tensor:
        """[slots, 1, 1]: 1 at the slots whose row uses adapter `name`."""
        mask = self._adapter_masks.get(name)
        if mask is None:
            rows = [adapter == name for adapter in self._adapters]
            mask = torch.tensor(rows, dtype=self.dtype, device=self.device)[:, None, None]
            self._adapter_masks[name] = mask
        return mask

    def _set_adapters(self, slots: Sequence[int], adapters: Sequence[str]) -> None:
        """Records the slots' adapters, in the host list and in place in the masks."""
        for slot, adapter in zip(slots, adapters, strict=True):
            self._adapters[slot] = adapter
        for name, mask in self._adapter_masks.items():
            mask[list(slots), 0, 0] = torch.tensor([float(adapter == name) for adapter in adapters],
                                                   dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def remove(self, keys: Collection[RowKey]) -> None:
        """Frees the slots of these rows (whole or still being prefilled); no
        other slot is touched."""
        slots = [self._index.pop(key) for key in set(keys) if key in self._index]
        if not slots:
            return
        for slot in slots:
            heapq.heappush(self._free, slot)
            if self._pending.pop(slot, None) is None:
                del self._host_lengths[slot], self._joined_at[slot]
        self._set_adapters(slots, [NO_ADAPTER] * len(slots))
        index = torch.tensor(slots, device=self.device)
        self.lengths[index] = 0
        self.live[index] = 0
        live = self._host_lengths.keys()
        self._high_water = max([*live, *self._pending], default=-1) + 1
        self._longest = max((self._row_length(slot) for slot in live), default=0)

    # ---- internals -------------------------------------------------------
    def _row_length(self, slot: int) -> int:
        return self._host_lengths[slot] + self._steps - self._joined_at[slot]

    def _prefill_forward(self, rows: Sequence[NewRow], slots: list[int]) -> torch.Tensor:
        lengths = [len(row.prompt_ids) for row in rows]
        starts = [row.start for row in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : lengths[index]] = torch.tensor(row.prompt_ids, dtype=torch.long)
        queries = torch.arange(width, device=self.device)
        slot_ids = torch.tensor(slots, device=self.device)
        if not any(starts):  # new rows only: attention over the new tokens alone
            causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
            allowed = causal[None, None].expand(len(rows), 1, width, width)
            self.cache.plan = _Plan(True, slot_ids, queries)
            positions = queries[None, :].expand(len(rows), width)
        else:  # rows that continue: attention over each slot's columns so far
            start = torch.tensor(starts, device=self.device)[:, None]
            positions = start + queries[None, :]  # [B, Q]
            real = queries[None, :] < torch.tensor(lengths, device=self.device)[:, None]
            columns = torch.where(real, positions, self.slot_tokens)  # padding queries: the scratch column
            read_length = max(s + n for s, n in zip(starts, lengths, strict=True))
            keys = torch.arange(read_length, device=self.device)
            allowed = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, Q, read_length]
            self.cache.plan = _Plan(True, slot_ids, columns, read_length)
        hidden = self._forward(input_ids.to(self.device), allowed, positions, [row.adapter for row in rows])
        last = torch.tensor(lengths, device=self.device) - 1
        return hidden[torch.arange(len(rows), device=self.device), last]

    def _forward(self, input_ids, allowed, position_ids, adapters: Sequence[str] | None) -> torch.Tensor:
        """input_ids [B, Q], allowed [B, 1, Q, K] -> last hidden states [B, Q, H].
        adapters: each row's LoRA adapter; None: already set (`use_row_masks`)."""
        if adapters is not None:
            self.lora.select(adapters)
        try:
            output = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask(allowed, self._attention, self.dtype),
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_keyword: self.cache},
            )
        finally:
            self.cache.plan = None
        return output.last_hidden_state
