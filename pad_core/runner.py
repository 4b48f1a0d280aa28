"""Model runner: one set of weights and the rows it decodes together.

Behind this small interface (prefill / decode / remove) a GPU backend can
replace the transformers one without touching the scheduler or guidance.
A row is one context: a request's base context or one of its reward
contexts. Rows that share weights share one forward pass; with LoRA
adapters each row names its adapter (batched multi-LoRA, `pad_core.lora`).

The runner returns final hidden states, not logits: the engine applies the
output head (`self.head`) in full to base rows and only at the top-k
candidates to reward rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from pad_core.kv_cache import GrowableKVLayer, concat_caches, new_cache, pad_mask_left
from pad_core.lora import NO_ADAPTER, MultiLora
from pad_core.output_head import OutputHead

RowKey = Hashable


@dataclass(frozen=True)
class NewRow:
    key: RowKey
    prompt_ids: Sequence[int]
    adapter: str = NO_ADAPTER


class TransformersRunner:
    """Decodes rows of one Hugging Face causal LM with a left-padded KV cache."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id
        self.model = model.requires_grad_(False)  # inference only
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.decoder = model.get_decoder()
        self.head = OutputHead(model)
        self.lora = MultiLora(model)  # reward adapters, added with `lora.add`
        self._reset()

    def _reset(self) -> None:
        self.row_keys: list[RowKey] = []
        self.adapters: list[str] = []
        self.cache = None
        self.attention_mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self.next_positions: torch.Tensor | None = None  # [B] position id of the next input

    @property
    def num_rows(self) -> int:
        return len(self.row_keys)

    @property
    def cache_columns(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def row_index(self) -> dict[RowKey, int]:
        return {key: index for index, key in enumerate(self.row_keys)}

    @torch.inference_mode()
    def prefill(self, rows: Sequence[NewRow]) -> torch.Tensor:
        """Runs the prompts of new rows and appends them to the batch.
        Returns their last hidden states [len(rows), H]."""
        lengths = [len(row.prompt_ids) for row in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - lengths[index] :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[index, width - lengths[index] :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = new_cache(self.num_layers)
        adapters = [row.adapter for row in rows]
        logits = self._forward(input_ids, mask, positions, cache, adapters)
        _zero_padding(cache, mask)
        self._append(cache, mask, torch.tensor(lengths, device=self.device), [row.key for row in rows], adapters)
        return logits

    @torch.inference_mode()
    def decode(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (in row order, [B]); returns hidden states [B, H]."""
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.num_rows, 1))], dim=1)
        logits = self._forward(
            next_tokens.to(self.device)[:, None], mask, self.next_positions[:, None], self.cache, self.adapters
        )
        self.attention_mask = mask
        self.next_positions = self.next_positions + 1
        return logits

    def remove(self, keys: set[RowKey]) -> None:
        """Frees the rows of finished or aborted requests."""
        keep = [index for index, key in enumerate(self.row_keys) if key not in keys]
        if len(keep) == self.num_rows:
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_positions = self.next_positions[index]
        self.row_keys = [self.row_keys[i] for i in keep]
        self.adapters = [self.adapters[i] for i in keep]
        self._drop_padding_columns()

    def _drop_padding_columns(self) -> None:
        """After rows leave, columns that are padding in every row are waste."""
        leading = int(self.attention_mask.any(dim=0).long().argmax())
        if leading:
            for layer in self.cache.layers:
                layer.drop_leading(leading)
            self.attention_mask = self.attention_mask[:, leading:]

    def _append(self, cache, mask, next_positions, keys, adapters) -> None:
        if self.cache is None:
            self.cache, self.attention_mask, self.next_positions = cache, mask, next_positions
        else:
            width = max(self.cache_columns, mask.shape[1])
            self.cache = concat_caches(self.cache, cache)
            self.attention_mask = torch.cat(
                [pad_mask_left(self.attention_mask, width), pad_mask_left(mask, width)], dim=0
            )
            self.next_positions = torch.cat([self.next_positions, next_positions])
        self.row_keys.extend(keys)
        self.adapters.extend(adapters)

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters) -> torch.Tensor:
        self.lora.select(adapters)
        output = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
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
