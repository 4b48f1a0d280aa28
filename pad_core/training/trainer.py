"""`pad train`: a PersRM as a LoRA adapter, trained with PAD's objective.

A plain torch loop rather than TRL's DPOTrainer: in PAD the reference model
sees the prompt WITHOUT the preference while the trained model sees it WITH
the preference, which TRL's trainer (one prompt for both) does not express.
The loop is short: reference log-probs are computed once (adapter disabled),
then AdamW on the LoRA weights with gradient accumulation, a validation
split, checkpoints and resume.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from pad_core.adapters import base_model_fingerprint, write_training_summary
from pad_core.output_head import OutputHead
from pad_core.prompting import PromptBuilder
from pad_core.settings import DEFAULT_PREFERENCE_TEMPLATE
from pad_core.training.loss import pad_dpo_loss, sequence_log_probs
from pad_core.training.pairs import PreferencePair

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class TrainSettings(BaseModel):
    beta: float = Field(0.1, gt=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = Field(5e-4, gt=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    seed: int = 0
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: each epoch)")
    preference_template: str = DEFAULT_PREFERENCE_TEMPLATE


@dataclass
class EncodedSequence:
    input_ids: list[int]
    answer_start: int  # index of the first answer token


@dataclass
class EncodedPair:
    policy_chosen: EncodedSequence
    policy_rejected: EncodedSequence
    reference_chosen: EncodedSequence
    reference_rejected: EncodedSequence


def encode_sequence(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> EncodedSequence:
    """Prompt then answer; long prompts lose their beginning, long answers their end."""
    prompt_ids = prompt_ids[-(max_length // 2) :] if len(prompt_ids) + len(answer_ids) > max_length else prompt_ids
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return EncodedSequence(prompt_ids + answer_ids, len(prompt_ids))


def encode_pair(prompts: PromptBuilder, pair: PreferencePair, end_token: int, max_length: int) -> EncodedPair:
    tokenizer = prompts.tokenizer
    with_preference = prompts.encode_with_preference(pair.chat(), pair.preference)
    without = prompts.encode(pair.chat())
    chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [end_token]
    rejected = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + [end_token]
    return EncodedPair(
        encode_sequence(with_preference, chosen, max_length),
        encode_sequence(with_preference, rejected, max_length),
        encode_sequence(without, chosen, max_length),
        encode_sequence(without, rejected, max_length),
    )


def batch_log_probs(model, sequences: list[EncodedSequence], pad_id: int, device) -> torch.Tensor:
    """Sum of answer-token log-probs of each sequence [B] (right padded).

    The decoder runs over every token, the output head only where a hidden
    state predicts an answer token (about half of a chat pair's tokens).
    """
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    predicts_answer = torch.zeros_like(ids, dtype=torch.bool)  # position t predicts answer token t + 1
    for row, seq in enumerate(sequences):
        ids[row, : len(seq.input_ids)] = torch.tensor(seq.input_ids)
        attention[row, : len(seq.input_ids)] = 1
        predicts_answer[row, max(seq.answer_start, 1) - 1 : len(seq.input_ids) - 1] = True
    ids, attention, predicts_answer = ids.to(device), attention.to(device), predicts_answer.to(device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state  # [B, T, H]
    labels = torch.roll(ids, shifts=-1, dims=1)[predicts_answer]  # [N]
    token_logits = OutputHead(model).full(hidden[predicts_answer])  # [N, V]
    row_of_token = predicts_answer.nonzero()[:, 0]
    return sequence_log_probs(token_logits, labels, row_of_token, len(sequences))


class PersRMTrainer:
    """Trains one LoRA adapter; `model` is a peft model over the base."""

    def __init__(self, model, tokenizer, settings: TrainSettings, out_dir: Path, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prompts = PromptBuilder(tokenizer, settings.preference_template)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate
        )
        self.step = 0
        self.epoch = 0

    # ---- data ---------------------------------------------------------
    def encode(self, pairs: list[PreferencePair]) -> list[EncodedPair]:
        end = self.tokenizer.eos_token_id
        return [encode_pair(self.prompts, pair, end, self.settings.max_length) for pair in pairs]

    @torch.no_grad()
    def reference_log_probs(self, encoded: list[EncodedPair]) -> torch.Tensor:
        """[N, 2] (chosen, rejected) under the frozen base without the preference."""
        self.model.eval()
        rows = []
        with self.model.disable_adapter():
            starts = range(0, len(encoded), self.settings.batch_size)
            for start in tqdm(starts, desc="reference log-probs", unit="batch", disable=len(starts) < 2):
                chunk = encoded[start : start + self.settings.batch_size]
                sequences = [p.reference_chosen for p in chunk] + [p.reference_rejected for p in chunk]
                logps = batch_log_probs(self.model, sequences, self.pad_id, self.device)
                rows.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1))
        return torch.cat(rows).cpu()

    def pair_loss(self, chunk: list[EncodedPair], reference: torch.Tensor):
        sequences = [p.policy_chosen for p in chunk] + [p.policy_rejected for p in chunk]
        logps = batch_log_probs(self.model, sequences, self.pad_id, self.device)
        reference = reference.to(self.device)
        return pad_dpo_loss(logps[: len(chunk)], logps[len(chunk) :], reference[:, 0], reference[:, 1], self.settings.beta)

    # ---- loop ---------------------------------------------------------
    def train(self, train: list[EncodedPair], validation: list[EncodedPair]) -> dict:
        settings = self.settings
        reference = self.reference_log_probs(train)
        val_reference = self.reference_log_probs(validation) if validation else None
        batches_per_epoch = math.ceil(len(train) / settings.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / settings.gradient_accumulation)
        history = []
        order_rng = random.Random(settings.seed)
        orders = [order_rng.sample(range(len(train)), len(train)) for _ in range(settings.epochs)]
        while self.epoch < settings.epochs:
            order = orders[self.epoch]
            first_batch = (self.step - self.epoch * steps_per_epoch) * settings.gradient_accumulation
            self.model.train()
            progress = tqdm(range(first_batch, batches_per_epoch), desc=f"epoch {self.epoch + 1}/{settings.epochs}",
                            unit="batch", initial=first_batch, total=batches_per_epoch)
            for batch in progress:
                index = order[batch * settings.batch_size : (batch + 1) * settings.batch_size]
                result = self.pair_loss([train[i] for i in index], reference[index])
                (result.loss / settings.gradient_accumulation).backward()
                last = batch == batches_per_epoch - 1
                if (batch + 1) % settings.gradient_accumulation == 0 or last:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if settings.checkpoint_every and self.step % settings.checkpoint_every == 0:
                        self.save_checkpoint()
                progress.set_postfix(loss=f"{result.loss.item():.4f}", acc=f"{result.accuracy.item():.2f}")
            self.epoch += 1
            metrics = {"epoch": self.epoch, "step": self.step}
            if validation:
                metrics.update(self.evaluate(validation, val_reference))
            logger.info("epoch %d: %s", self.epoch, metrics)
            history.append(metrics)
            self.save_checkpoint()
        return {"history": history, **(history[-1] if history else {})}

    @torch.no_grad()
    def evaluate(self, pairs: list[EncodedPair], reference: torch.Tensor) -> dict:
        self.model.eval()
        losses, correct = [], 0.0
        for start in range(0, len(pairs), self.settings.batch_size):
            chunk = pairs[start : start + self.settings.batch_size]
            result = self.pair_loss(chunk, reference[start : start + len(chunk)])
            losses.append(result.loss.item() * len(chunk))
            correct += result.accuracy.item() * len(chunk)
        self.model.train()
        return {"val_loss": sum(losses) / len(pairs), "val_accuracy": correct / len(pairs)}

    # ---- checkpoints --------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints" / f"step-{self.step:06d}"

    def save_checkpoint(self) -> None:
        folder = self.checkpoint_dir()
        self.model.save_pretrained(folder)
        torch.save(
            {"step": self.step, "epoch": self.epoch, "optimizer": self.optimizer.state_dict()}, folder / STATE_FILE
        )

    def resume(self) -> bool:
        """Continues from the newest checkpoint in out_dir, if any."""
        checkpoints = sorted((self.out_dir / "checkpoints").glob("step-*"))
        if not checkpoints:
            return False
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        latest = checkpoints[-1]
        set_peft_model_state_dict(self.model, load_file(latest / "adapter_model.safetensors"))
        state = torch.load(latest / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        logger.info("resumed from %s (epoch %d, step %d)", latest, self.epoch, self.step)
        return True


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    shuffled = random.Random(seed).sample(pairs, len(pairs))
    cut = max(1, round(len(pairs) * fraction))
    return shuffled[cut:], shuffled[:cut]


def wrap_with_lora(model, settings: TrainSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train_adapter(model, tokenizer, pairs: list[PreferencePair], settings: TrainSettings, out_dir: Path,
                  resume: bool = False) -> dict:
    """Trains and writes the adapter folder (peft files + pad_training.json)."""
    torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    fingerprint = base_model_fingerprint(model, tokenizer)
    peft_model = wrap_with_lora(model, settings)
    trainer = PersRMTrainer(peft_model, tokenizer, settings, out_dir, device)
    train_pairs, validation_pairs = split_pairs(pairs, settings.validation_fraction, settings.seed)
    if resume:
        trainer.resume()
    metrics = trainer.train(trainer.encode(train_pairs), trainer.encode(validation_pairs))
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    summary = {
        "settings": settings.model_dump(),
        "pairs": {"train": len(train_pairs), "validation": len(validation_pairs)},
        "metrics": metrics,
    }
    return write_training_summary(out_dir, summary, fingerprint)
