"""Model runners: one set of weights and the rows it decodes together.

The engine (scheduler, PAD's rule, sampling) talks to runners only through
the `Runner` protocol below, so a GPU backend (a preallocated KV pool, CUDA
graphs) replaces the transformers one without touching the scheduler, the
guidance or the server. A row is one context: a request's base context or
one of its reward contexts. Rows that share weights share one forward pass;
with LoRA adapters each row names its adapter (batched multi-LoRA).

Runners return final hidden states, not logits: the engine asks for full
logits of base rows (`logits`) and for reward rows' logits only at the
top-k candidates (`logits_at`), a few dot products instead of a
vocabulary-sized matmul.

`TransformersRunner` (left-padded cache whose rows are concatenated and
selected between steps) is the reference and the CPU path;
`pad_core.slot_runner.SlotRunner` keeps rows in a preallocated pool.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import torch

from transformers.cache_utils import Cache

from pad_core.kv_cache import GrowableKVLayer, concat_caches, new_cache, pad_mask_left
from pad_core.lora import NO_ADAPTER, MultiLora
from pad_core.output_head import OutputHead
from pad_core.prefix_cache import PrefixCache
from pad_core.transfer import to_device

RowKey = Hashable
BASE_RUNNER = "base"  # the runner of the base model; `self` and LoRA reward rows run there too


@dataclass(frozen=True)
class NewRow:
    """Prompt tokens for `prefill` to write into a row: the whole prompt of a
    new row, or, where the runner takes prompts in pieces
    (`Runner.chunked_prefill`), the tokens at positions start.. of it (start 0:
    the row is new and takes its place; start > 0: it continues the row).
    `last`: the prompt is complete with these tokens; the row joins the
    decode batch. `cache_salt` (vLLM's): the row shares prefix-cache
    entries only with rows of the same salt (`prefix_key`)."""

    key: RowKey
    prompt_ids: Sequence[int]
    adapter: str = NO_ADAPTER
    start: int = 0
    last: bool = True
    cache_salt: str | None = None

    @property
    def prefix_key(self) -> Hashable:
        return prefix_key(self.adapter, self.cache_salt)


def prefix_key(adapter: str, cache_salt: str | None) -> Hashable:
    """What a row's prefix-cache entries are filed under: its adapter (a
    LoRA row's KV differs from the base row's), and its request's
    cache_salt when given, so tenants that salt their requests never reuse
    (nor time) each other's cached prompts."""
    return adapter if cache_salt is None else (adapter, cache_salt)


def prefix_key_adapter(key: Hashable) -> str:
    """The adapter a prefix-cache key (`prefix_key`) files entries under."""
    return key[0] if isinstance(key, tuple) else key


@dataclass(frozen=True)
class RewardSource:
    """Where a named reward model's rows run: a runner, and the LoRA adapter
    to apply there (NO_ADAPTER for the plain weights)."""

    runner: str
    adapter: str = NO_ADAPTER
    base_sees_preference: bool = True  # default for trained reward models


@runtime_checkable
class Runner(Protocol):
    """What the engine needs from a backend that runs rows of one model.

    Rows are identified by key. `row_index()` says where each live row sits
    in the batch that `decode` takes and returns; it is kept up to date as
    rows join (`prefill`) and leave (`remove`), not rebuilt per step. The
    batch may be wider than the live rows (`batch_size >= num_rows`): a
    pool-based runner decodes its free slots too and ignores them.
    """

    @property
    def device(self) -> torch.device: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_rows(self) -> int:
        """Live rows."""

    @property
    def batch_size(self) -> int:
        """Width of `decode`'s batch: the tokens it takes, the hidden states it returns."""

    @property
    def chunked_prefill(self) -> bool:
        """Whether `prefill` takes a prompt in pieces (`NewRow.start` / `last`);
        if not, every row is given whole (start 0, last)."""

    @property
    def runs_identical_rows_once(self) -> bool:
        """Whether rows given in one `prefill` that hold the same tokens and
        get the same ones cost one row's compute (the others get copies)."""

    @property
    def kv_token_budget(self) -> int | None:
        """KV tokens the batch may hold, counted as rows x the widest row's
        length (a left-padded cache holds every row as wide as the widest);
        the scheduler admits requests within it. None: the runner bounds
        its memory itself (a pool's slots)."""

    @property
    def kv_usage(self) -> float | None:
        """The share (0 to 1) of the KV memory the runner may hold that its
        rows hold now (vLLM's kv_cache_usage_perc); None: unbounded."""

    def row_index(self) -> Mapping[RowKey, int]:
        """Live row key -> its index in `decode`'s batch (a live view)."""

    def prefill(self, rows: Sequence[NewRow]) -> torch.Tensor:
        """Runs the prompts (or prompt pieces) of rows and adds the rows whose
        prompt is complete to the batch. Returns the hidden states of each
        row's last given token [len(rows), H], in the order given."""

    def decode(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """One token per batch position ([batch_size] long, by `row_index()`;
        positions no row holds are ignored); returns hidden states [batch_size, H]."""

    def remove(self, keys: Collection[RowKey]) -> None:
        """Frees the rows of these keys (keys not live are ignored)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits over the vocabulary [N, V]."""

    def logits_at(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """hidden [M, H], token_ids [M, K] -> float32 logits of those tokens [M, K]."""

    def add_adapter(self, name: str, folder: Path) -> None:
        """Loads a LoRA reward adapter folder onto these weights, for rows
        that name it (`NewRow.adapter`). Raises ModelLoadError."""

    def remove_adapter(self, name: str) -> None:
        """Unloads an adapter no row uses any more: its weights, and the
        prefix-cache entries its rows left (a later adapter of the same
        name would otherwise read their KV)."""

    def adapters_in_use(self) -> Collection[str]:
        """The adapters of the rows the runner holds."""

    def retain(self, rows: Mapping[RowKey, Sequence[int]]) -> None:
        """Offers the KV of rows about to leave to the runner's prefix cache,
        with each row's tokens (prompt, then answer); a runner without one
        ignores it."""

    def prompt_hidden(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The plain weights' hidden states at every position of `token_ids`
        [len(token_ids), H], outside the batch (no row joins, no cache is
        kept): what prompt logprobs are read from."""

    def cached_length(self, prefix_key: Hashable, prompt_ids: Sequence[int]) -> int:
        """Tokens at the start of a new row's prompt its prefix cache holds
        now (0 without one): what `prefill` will not compute, so a scheduler
        can size the row's first piece past them."""


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The name a transformers decoder takes its KV cache under: `cache` in
    transformers >= 5.2x, `past_key_values` before (still accepted, with a
    deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class ModelRows:
    """What every runner of one Hugging Face causal LM shares, whatever its
    KV cache: the model, its output head (the engine's logits), its reward
    adapters and the row -> batch position index the runner keeps.

    fingerprint: gives the base model's fingerprint
    (`pad_core.adapters.base_model_fingerprint`, ~0.1 s: asked only when an
    adapter is loaded), to refuse adapters trained on another model; None
    skips that check."""

    prefix_cache: PrefixCache | None = None  # finished rows' KV (pad_core.prefix_cache), where a runner keeps one
    kv_token_budget: int | None = None  # see Runner.kv_token_budget

    def __init__(self, model: torch.nn.Module, pad_token_id: int, fingerprint: Callable[[], str] | None):
        self.pad_token_id = pad_token_id
        self.fingerprint = fingerprint
        self.model = model.requires_grad_(False)  # inference only
        self.decoder = model.get_decoder()
        self._cache_keyword = cache_keyword(self.decoder)
        self.head = OutputHead(model)
        self.lora = MultiLora(model)  # reward adapters (`add_adapter`)
        self._index: dict[RowKey, int] = {}
        self._index_view = MappingProxyType(self._index)

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    @property
    def num_rows(self) -> int:
        return len(self._index)

    def row_index(self) -> Mapping[RowKey, int]:
        return self._index_view

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.full(hidden)

    def logits_at(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.head.at(hidden, token_ids)

    def add_adapter(self, name: str, folder: Path) -> None:
        from pad_core.adapters import load_adapter  # peft, imported only when an adapter is loaded

        self.lora.add(name, load_adapter(name, folder, self.fingerprint))

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters_in_use():
            raise RuntimeError(f"reward adapter {name!r} is in use by a live row")
        self.lora.remove(name)
        if self.prefix_cache is not None:
            self.prefix_cache.forget(lambda key: prefix_key_adapter(key) == name)

    def adapters_in_use(self) -> Collection[str]:
        """The adapters of the live rows."""
        raise NotImplementedError

    def retain(self, rows: Mapping[RowKey, Sequence[int]]) -> None:
        """No prefix cache here (the transformers runner overrides it)."""

    def cached_length(self, prefix_key: Hashable, prompt_ids: Sequence[int]) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.peek(prefix_key, prompt_ids)

    @torch.inference_mode()
    def prompt_hidden(self, token_ids: Sequence[int]) -> torch.Tensor:
        """One causal forward of the plain weights over `token_ids`, without a
        cache: [len(token_ids), H]. A second pass over a prompt the batch
        also prefills, asked only for prompt logprobs (a scoring request);
        the batch's caches and prefill stay as they are for everyone else."""
        device = next(self.model.parameters()).device
        self.lora.select([NO_ADAPTER])
        output = self.decoder(input_ids=torch.tensor([list(token_ids)], dtype=torch.long, device=device),
                              use_cache=False)
        return output.last_hidden_state[0]


class TransformersRunner(ModelRows):
    """Decodes rows of one Hugging Face causal LM with a left-padded KV cache
    (`pad_core.kv_cache`): joining rows are concatenated to the batch,
    leaving rows selected out. The reference runner, and the CPU path.

    With a `prefix_cache` (pad_core.prefix_cache), rows that leave offer
    their KV to it (`retain`), and a new row whose prompt begins with a
    cached prefix starts from a copy of it and prefills only the rest.

    Its memory grows with the batch: `kv_token_budget` (rows x the widest
    row, in tokens) is what the scheduler keeps it to."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0, fingerprint: Callable[[], str] | None = None,
                 prefix_cache: PrefixCache | None = None, kv_token_budget: int | None = None):
        super().__init__(model, pad_token_id, fingerprint)
        self.kv_token_budget = kv_token_budget
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.prefix_cache = prefix_cache
        # Rows whose prompt is being written in pieces (chunked prefill), outside
        # the batch until complete: key -> (tokens written, their KV
        # [layers, 2, kv_heads, tokens, head_dim]), continued like a cached prefix.
        self._partial: dict[RowKey, tuple[int, torch.Tensor]] = {}
        self._partial_tokens: dict[RowKey, tuple[int, ...]] = {}  # the tokens each of them holds
        self._reset()

    def _reset(self) -> None:
        self.row_keys: list[RowKey] = []
        self._index.clear()
        self.adapters: list[str] = []
        self.prefix_keys: list[Hashable] = []  # each row's NewRow.prefix_key, where retain files its KV
        self.cache = None
        self.attention_mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self.next_positions: torch.Tensor | None = None  # [B] position id of the next input

    def adapters_in_use(self) -> Collection[str]:
        return set(self.adapters)

    @property
    def batch_size(self) -> int:
        return len(self.row_keys)  # dense: every batch position is a live row

    @property
    def chunked_prefill(self) -> bool:
        return True  # a row mid-prompt waits outside the batch (`_partial`) and joins it complete

    @property
    def runs_identical_rows_once(self) -> bool:
        return True

    @property
    def cache_columns(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    @property
    def kv_usage(self) -> float | None:
        if not self.kv_token_budget:
            return None
        # The batch's rows, each as wide as the widest, and the prompts being written in pieces outside it.
        held = self.num_rows * self.cache_columns + sum(tokens for tokens, _ in self._partial.values())
        return min(1.0, held / self.kv_token_budget)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[NewRow]) -> torch.Tensor:
        """Runs the prompts of new rows, in one forward, and appends them to
        the batch. Returns their last hidden states [len(rows), H].

        A row whose prompt begins with a cached prefix (`prefix_cache`) runs
        only the rest, over a copy of that prefix. Layout of the new rows'
        cache, R rows, P the longest cached prefix, S the longest rest:
        [R, heads, P + S, head_dim], each row's prefix right-aligned in the
        first P columns and its rest right-aligned in the last S (the
        attention mask marks the real columns; a row may have a gap of
        padding between the two).

        Rows with the same prompt and adapter (the `n` choices of one
        request) run once; the others get copies of that row's cache.

        A prompt given in pieces (chunked prefill: `NewRow.start` / `last`)
        waits outside the batch between them, its KV kept as a prefix the
        next piece continues (as a cached one); it joins the batch with its
        last piece. Rows holding the same tokens so far, given the same
        piece, run once too."""
        firsts: dict[tuple, int] = {}  # (prefix key, tokens so far) -> index among the rows that run
        copy_of = [firsts.setdefault((row.prefix_key, self._partial_tokens.get(row.key, ()) + tuple(row.prompt_ids)),
                                     len(firsts)) for row in rows]
        if len(firsts) < len(rows):
            unique = {index: row for row, index in zip(rows, copy_of, strict=True)}
            return self._prefill_rows([unique[index] for index in range(len(firsts))], rows, copy_of)
        return self._prefill_rows(rows, rows, None)

    def _prefill_rows(self, rows: Sequence[NewRow], joining: Sequence[NewRow],
                      copy_of: list[int] | None) -> torch.Tensor:
        """Runs `rows` and appends `joining` (row i of which is a copy of
        rows[copy_of[i]]; None: `joining` is `rows`). [len(joining), H]."""
        held = {row.key: self._partial_tokens.pop(row.key, ()) for row in joining}  # tokens before these pieces
        running = {id(row) for row in rows}
        for row in joining:
            if id(row) not in running:  # a copy: the row that runs holds the same earlier pieces
                self._partial.pop(row.key, None)
        prefixes = [self._prefix_of(row) for row in rows]
        prefix_width = max(length for length, _ in prefixes)
        ends = [row.start + len(row.prompt_ids) for row in rows]  # tokens each row holds after this
        rests = [end - length for end, (length, _) in zip(ends, prefixes, strict=True)]
        width = max(rests)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_width + width), dtype=torch.long)
        for index, (row, (length, _)) in enumerate(zip(rows, prefixes, strict=True)):
            input_ids[index, width - rests[index] :] = torch.tensor(row.prompt_ids[length - row.start :],
                                                                    dtype=torch.long)
            mask[index, prefix_width - length : prefix_width] = 1
            mask[index, prefix_width + width - rests[index] :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, prefix_width:]
        cache = self._prefix_batch(prefixes, prefix_width)
        adapters = [row.adapter for row in rows]
        hidden = self._forward(input_ids, mask, positions, cache, adapters)
        _zero_padding(cache, mask)
        if copy_of is not None:
            expand = torch.tensor(copy_of, device=self.device)
            for layer in cache.layers:
                layer.batch_select_indices(expand)
            hidden, mask = hidden[expand], mask[expand]
            ends = [ends[index] for index in copy_of]
        complete = [index for index, row in enumerate(joining) if row.last]
        if len(complete) < len(joining):  # pieces of longer prompts wait outside the batch
            for index, row in enumerate(joining):
                if not row.last:
                    self._partial[row.key] = (ends[index], self._row_kv(cache, index, mask[index].nonzero().flatten()))
                    self._partial_tokens[row.key] = held[row.key] + tuple(row.prompt_ids)
            if not complete:
                return hidden
            keep = torch.tensor(complete, device=self.device)
            for layer in cache.layers:
                layer.batch_select_indices(keep)
            mask = mask[keep]
        cache, mask = self._packed(cache, mask)
        lengths = torch.tensor([ends[index] for index in complete], device=self.device)
        self._append(cache, mask, lengths, [joining[index] for index in complete])
        return hidden

    def _packed(self, cache, mask: torch.Tensor) -> tuple[Cache, torch.Tensor]:
        """Joining rows written beside a longer prefix (a cached one, an
        earlier piece) or a longer rest hold their real columns in two runs
        with padding between: `prefix_width + width` columns where the
        widest row holds fewer. Packed right-aligned to the widest row's
        length, so the batch carries no column no row needs (the scheduler's
        KV budget counts rows x the widest row). A copy of the joining rows
        only, and only then."""
        real = mask.sum(dim=1)  # [R] tokens each row holds
        width = int(real.max())
        if width == mask.shape[1]:
            return cache, mask
        rows = [(int(real[index]), self._row_kv(cache, index, mask[index].nonzero().flatten()))
                for index in range(mask.shape[0])]
        packed = torch.arange(width, device=mask.device)[None, :] >= (width - real)[:, None]
        return self._prefix_batch(rows, width), packed.to(mask.dtype)

    def _prefix_of(self, row: NewRow) -> tuple[int, torch.Tensor | None]:
        """What a row starts from: its own earlier pieces (chunked prefill),
        else the longest cached prefix of its tokens, else nothing."""
        if row.start:
            held, kv = self._partial.pop(row.key, (0, None))
            if held != row.start:
                raise ValueError(f"row {row.key!r} does not hold {row.start} tokens of an unfinished prompt")
            return held, kv
        if row.key in self._index or row.key in self._partial:
            raise ValueError(f"row {row.key!r} is already here")
        if self.prefix_cache is None:
            return 0, None
        return self.prefix_cache.longest(row.prefix_key, row.prompt_ids)

    @staticmethod
    def _row_kv(cache, index: int, columns: torch.Tensor) -> torch.Tensor:
        """Row `index`'s KV at `columns` (its real ones, in order): [layers, 2, kv_heads, tokens, head_dim]."""
        return torch.stack([torch.stack((layer.keys[index][:, columns], layer.values[index][:, columns]))
                            for layer in cache.layers])

    def _prefix_batch(self, prefixes: Sequence[tuple[int, torch.Tensor | None]], width: int) -> Cache:
        """A cache holding each row's cached prefix ([layers, 2, heads,
        length, head_dim]) right-aligned in `width` columns (empty when no
        row has one). Its buffers are exactly `width` long, so the forward's
        first write allocates new ones (the copy here is the only one)."""
        if width == 0:
            return new_cache(self.num_layers)
        sample = next(kv for _, kv in prefixes if kv is not None)
        _, _, heads, _, head_dim = sample.shape
        both = sample.new_zeros((self.num_layers, 2, len(prefixes), heads, width, head_dim))
        for index, (length, kv) in enumerate(prefixes):
            if length:
                both[:, :, index, :, width - length :] = kv
        return Cache(layers=[GrowableKVLayer(both[layer, 0], both[layer, 1], width) for layer in range(self.num_layers)])

    @torch.inference_mode()
    def decode(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (in row order, [B]); returns hidden states [B, H].
        The attention mask grows by a column (torch.cat, O(B x L)); cheap
        next to the forward on CPU, one of the costs the pool runner avoids."""
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.num_rows, 1))], dim=1)
        logits = self._forward(
            to_device(next_tokens, torch.long, self.device)[:, None], mask, self.next_positions[:, None], self.cache, self.adapters
        )
        self.attention_mask = mask
        self.next_positions = self.next_positions + 1
        return logits

    def retain(self, rows: Mapping[RowKey, Sequence[int]]) -> None:
        """Copies the KV of live rows into the prefix cache. A row holds the
        KV of `held` tokens, at the columns its attention mask marks (in
        order; padding may sit between a cached prefix and the rest);
        `rows` gives its tokens, of which the first `held` are the ones it
        holds (an answer's last token was chosen, never fed). Only what the
        cache will keep is copied."""
        if self.prefix_cache is None or self.cache is None:
            return
        first = self.cache.layers[0]
        bytes_per_token = 2 * first.keys.shape[1] * first.keys.shape[3] * first.keys.element_size() * self.num_layers
        for key, tokens in rows.items():
            index = self._index.get(key)
            if index is None:
                continue
            columns = self.attention_mask[index].nonzero().flatten()
            held = tokens[: len(columns)]
            length = self.prefix_cache.kept_length(self.prefix_keys[index], held, bytes_per_token)
            if length == 0:
                continue
            self.prefix_cache.store(self.prefix_keys[index], held[:length],
                                    self._row_kv(self.cache, index, columns[:length]))

    def remove(self, keys: Collection[RowKey]) -> None:
        """Frees the rows of finished or aborted requests (the others' caches
        are selected into new buffers: the reason for a pool-based runner)."""
        for key in keys:
            self._partial.pop(key, None)
            self._partial_tokens.pop(key, None)
        leaving = {self._index[key] for key in keys if key in self._index}
        if not leaving:
            return
        if len(leaving) == self.num_rows:
            self._reset()
            return
        keep = [index for index in range(self.num_rows) if index not in leaving]
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_positions = self.next_positions[index]
        self.row_keys = [self.row_keys[i] for i in keep]
        self.adapters = [self.adapters[i] for i in keep]
        self.prefix_keys = [self.prefix_keys[i] for i in keep]
        self._index.clear()  # rows after a leaving one move up
        self._index.update((key, position) for position, key in enumerate(self.row_keys))
        self._drop_padding_columns()

    def _drop_padding_columns(self) -> None:
        """After rows leave, columns that are padding in every row are waste."""
        leading = int(self.attention_mask.any(dim=0).long().argmax())
        if leading:
            for layer in self.cache.layers:
                layer.drop_leading(leading)
            self.attention_mask = self.attention_mask[:, leading:]

    def _append(self, cache, mask, next_positions, rows: Sequence[NewRow]) -> None:
        keys = [row.key for row in rows]
        if self.cache is None:
            self.cache, self.attention_mask, self.next_positions = cache, mask, next_positions
        else:
            width = max(self.cache_columns, mask.shape[1])
            self.cache = concat_caches(self.cache, cache)
            self.attention_mask = torch.cat(
                [pad_mask_left(self.attention_mask, width), pad_mask_left(mask, width)], dim=0
            )
            self.next_positions = torch.cat([self.next_positions, next_positions])
        self._index.update((key, len(self.row_keys) + offset) for offset, key in enumerate(keys))
        self.row_keys.extend(keys)
        self.adapters.extend(row.adapter for row in rows)
        self.prefix_keys.extend(row.prefix_key for row in rows)

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters) -> torch.Tensor:
        self.lora.select(adapters)
        output = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_keyword: cache},
        )
        return output.last_hidden_state[:, -1]


def _zero_padding(cache, mask: torch.Tensor) -> None:
    """Padded query positions attend to nothing and may leave NaN in the
    cache; later queries give those columns zero weight, but 0 * NaN = NaN."""
    padding = (mask == 0)[:, None, :, None]
    if not padding.any():
        return
    width = mask.shape[1]
    for layer in cache.layers:
        assert isinstance(layer, GrowableKVLayer)
        layer.key_buffer[:, :, :width].masked_fill_(padding, 0.0)
        layer.value_buffer[:, :, :width].masked_fill_(padding, 0.0)
