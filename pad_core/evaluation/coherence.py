"""Coherence of an answer: its mean per-token log-probability under the base
model, given the conversation with the preference as a system message (the
quality gate's model-based component, `pad_core/evaluation/quality.py`).

Fluent text the model could have written scores around -1 to -2 nats per
token; invented words, switched languages and token salad score far lower,
because each piece is improbable given what came before. Repetition scores
high, which is why the gate also has a loop check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringItem:
    """One answer in its context: the chat messages the model is conditioned
    on (already holding the preference as a system message) and the answer."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    answer: str


class CoherenceScorer:
    """Scores answers in batches with a causal LM and its chat template."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_answer_tokens: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_answer_tokens = max_answer_tokens

    @classmethod
    def load(cls, model: str = "embedded", **settings) -> CoherenceScorer:
        """The scorer on a model the engine can load ('embedded', a folder, a
        .gguf), in float32 on the CPU unless told otherwise."""
        from pad_core.model_loading import load_causal_lm
        from pad_core.settings import EngineSettings

        engine_settings = EngineSettings(model=model, **{"dtype": "float32", "device": "cpu", **settings})
        lm, tokenizer = load_causal_lm(engine_settings.model, engine_settings)
        return cls(lm, tokenizer)

    def encode(self, item: ScoringItem) -> tuple[list[int], list[int]]:
        """(context ids, answer ids)."""
        chat = [{"role": role, "content": content} for role, content in item.messages]
        text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        context = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = self.tokenizer(item.answer, add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        return context, answer

    @torch.inference_mode()
    def score(self, items: Sequence[ScoringItem]) -> list[float | None]:
        """Mean log-probability per answer token (None for an empty answer)."""
        encoded = [self.encode(item) for item in items]
        scores: list[float | None] = [None] * len(items)
        todo = [i for i, (_, answer) in enumerate(encoded) if answer]
        # Similar lengths together: less padding per batch.
        todo.sort(key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for index, value in zip(batch, self._score_batch([encoded[i] for i in batch]), strict=True):
                scores[index] = value
        return scores

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        device = next(self.model.parameters()).device
        length = max(len(c) + len(a) for c, a in pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), length), dtype=torch.long)
        for row, (context, answer) in enumerate(pairs):  # right padding: positions start at 0
            sequence = context + answer
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
        results = []
        for row, (context, answer) in enumerate(pairs):
            # Position t predicts token t + 1: the answer's tokens are predicted
            # from the last context position on. Normalise those rows only.
            start = len(context) - 1
            log_probs = logits[row, start : start + len(answer)].float().log_softmax(dim=-1)  # [A, V]
            targets = torch.tensor(answer, device=device)
            results.append(float(log_probs.gather(1, targets[:, None]).mean()))
        return results
