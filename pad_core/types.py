"""Plain data exchanged with the engine. All of it is JSON/msgpack friendly
(`to_dict` / `from_dict`) so it can cross the gateway <-> worker IPC."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class Preference:
    """One user preference, e.g. "short answers with a bit of humour"."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names and meanings)."""

    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, only with logprobs


@dataclass(frozen=True)
class GuidanceParams:
    """PAD settings. None means: the engine's default."""

    weight: float | None = None  # w; 0 = plain decoding
    top_k: int | None = None  # candidates kept by the base model's prescreen
    min_p: float | None = None  # prescreen floor: keep a if p_base(a) >= min_p * max p_base
    reward_model: str = "self"
    base_sees_preference: bool | None = None  # None: False for self, True otherwise


@dataclass
class ChatRequest:
    """What a gateway sends: chat messages plus settings. The engine renders
    the chat template (with and without the preference) itself."""

    request_id: str
    messages: list[dict[str, str]]  # [{"role": ..., "content": ...}], content already flattened to text
    preferences: list[Preference] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatRequest:
        sampling = dict(data.get("sampling") or {})
        for key in ("stop", "stop_token_ids"):
            if key in sampling:
                sampling[key] = tuple(sampling[key])
        return cls(
            request_id=data["request_id"],
            messages=[dict(m) for m in data["messages"]],
            preferences=[Preference(**p) for p in data.get("preferences") or []],
            sampling=SamplingParams(**sampling),
            guidance=GuidanceParams(**(data.get("guidance") or {})),
        )


@dataclass(frozen=True)
class RewardPrompt:
    """One reward (PersRM) context: the prompt with one preference in it."""

    prompt_ids: tuple[int, ...]
    weight: float = 1.0


@dataclass
class GenerationRequest:
    """Token-level request: a base context and zero or more reward contexts.
    No reward context: plain decoding, no reward rows, no overhead."""

    request_id: str
    prompt_ids: list[int]
    reward_prompts: list[RewardPrompt] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the base model (raw logits,
    after presence/frequency penalties), as OpenAI reports it."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one engine step produced for one request.

    `text` is the new text since the previous output (it may be empty while
    bytes of a multi-byte character or a possible stop string are held back).
    `finish_reason` is set exactly once, on the request's last output.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepOutput:
        logprobs = data.get("logprobs")
        if logprobs is not None:
            logprobs = [
                TokenLogprob(
                    token=lp["token"],
                    logprob=lp["logprob"],
                    bytes=list(lp["bytes"]),
                    top_logprobs=[tuple(t) for t in lp.get("top_logprobs") or []],
                )
                for lp in logprobs
            ]
        return cls(**{**data, "logprobs": logprobs})
