"""A request's life inside the engine: its rows, its generated tokens, its
text stream and when it stops (TGI's per-request stopping criteria)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pad_core.detokenize import IncrementalDetokenizer
from pad_core.lora import NO_ADAPTER
from pad_core.runner import BASE_RUNNER
from pad_core.sampling import allowed_mask
from pad_core.stopping import StopStringMatcher
from pad_core.structured import GrammarMatcher
from pad_core.types import FinishReason, GenerationRequest, StepOutput, TokenLogprob, ToolCall


@dataclass(frozen=True)
class RewardRowRef:
    runner: str  # which runner holds the row
    key: tuple[str, int]
    weight: float


@dataclass
class RequestState:
    request: GenerationRequest
    max_tokens: int  # resolved against the context length
    guidance_weight: float
    top_k: int
    min_p: float
    reward_rows: list[RewardRowRef]
    stop_token_ids: frozenset[int]  # the model's end-of-sequence ids and the request's own stop token ids
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    # The model's end-of-sequence ids: an answer they end has no stop_reason, even where the request
    # names one of them among its stop_token_ids (vLLM checks end-of-sequence first).
    eos_token_ids: frozenset[int] = frozenset()
    # The LoRA adapter of the reward rows, fixed at creation: an adapter unloaded
    # meanwhile (`PadEngine.remove_reward_adapter`) stays until its requests end.
    reward_adapter: str = NO_ADAPTER
    stop_matcher: StopStringMatcher = field(init=False)
    # (runner name, row key) of each of the request's rows, fixed at creation
    # (read at every decode step).
    row_locations: tuple[tuple[str, tuple[str, int]], ...] = field(init=False)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Chunked prefill: how far the request's prompts are written, counted on
    # the longest (the rows are right-aligned: pad_core.engine.prompt_spans).
    prefilled: int = 0
    cached_tokens: int = 0  # of the base prompt, found in the prefix cache (not computed)
    grammar: GrammarMatcher | None = None  # structured output: the answer's grammar
    prompt_logprobs: list[TokenLogprob] | None = None  # when asked: sent with the first output, then dropped
    prompt_ids_due: bool = field(init=False, default=False)  # return_token_ids: the first output has the prompt's
    # sampling.allowed_token_ids as a [V] bool mask on the logits' device,
    # made at the first step that needs it (allowed_mask), not from a list
    # of up to a vocabulary's ids, with a host-to-device copy, at every step.
    _allowed_mask: torch.Tensor | None = field(init=False, default=None, repr=False)
    # perf_counter seconds (vLLM's request phases): added to the queue, admitted (its prefill
    # begins), its first token chosen; the last output reports the phases (`phase_seconds`).
    added_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    _prompts_key: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        sampling = self.request.sampling
        self.stop_matcher = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output)
        self.prompt_ids_due = sampling.return_token_ids
        self.row_locations = ((BASE_RUNNER, self.base_key), *((row.runner, row.key) for row in self.reward_rows))

    def allowed_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """allowed_token_ids as a [V] bool tensor on `device` (made once)."""
        if self._allowed_mask is None:
            self._allowed_mask = allowed_mask(self.request.sampling.allowed_token_ids, vocab, device)
        return self._allowed_mask

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def base_key(self) -> tuple[str, int]:
        return (self.request_id, 0)

    @property
    def row_keys(self) -> list[tuple[str, int]]:
        return [self.base_key, *(row.key for row in self.reward_rows)]

    @property
    def prompts(self) -> list[tuple[int, ...] | list[int]]:
        """The prompt of each row, in `row_keys` order."""
        return [self.request.prompt_ids, *(prompt.prompt_ids for prompt in self.request.reward_prompts)]

    @property
    def prompts_key(self) -> tuple:
        """What makes two requests' rows identical to prefill: every prompt
        and the reward rows' runners and weights (the `n` choices of one
        request share it), and the cache salt. Computed once."""
        if self._prompts_key is None:
            self._prompts_key = (tuple(tuple(prompt) for prompt in self.prompts), tuple(self.reward_rows and
                                 [(row.runner, row.weight) for row in self.reward_rows]),
                                 self.request.guidance.reward_model, self.request.sampling.cache_salt)
        return self._prompts_key

    @property
    def prefill_length(self) -> int:
        """Tokens of the longest of the request's prompts."""
        return max(len(prompt) for prompt in self.prompts)

    @property
    def next_input(self) -> int:
        return self.generated[-1]

    def output(self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None = None,
               error: str | None = None, error_param: str | None = None) -> StepOutput:
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        prompt_ids_due, self.prompt_ids_due = self.prompt_ids_due, False
        return StepOutput(
            request_id=self.request_id,
            token_ids=token_ids,
            text=text,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.generated),
            cached_tokens=self.cached_tokens,
            logprobs=logprobs,
            error=error,
            tool_calls=self._tool_calls(),
            error_param=error_param,
            prompt_logprobs=prompt_logprobs,
            prompt_token_ids=list(self.request.prompt_ids) if prompt_ids_due else None,
            phase_seconds=self.phase_seconds() if self.finish_reason is not None else None,
            stop_reason=self._stop_reason() if self.finish_reason == "stop" else None,
        )

    def _stop_reason(self) -> str | int | None:
        """What stopped the answer (vLLM's stop_reason): the stop string
        matched, or the request's own stop token; None for end-of-sequence."""
        if self.stop_matcher.matched is not None:
            return self.stop_matcher.matched
        last = self.generated[-1] if self.generated else None
        return last if last in self.request.sampling.stop_token_ids and last not in self.eos_token_ids else None

    def phase_seconds(self) -> dict[str, float]:
        """How long the request waited (queue), wrote its prompt up to its
        first token (prefill) and wrote the rest (decode), as far as it got
        (vLLM's request_queue / _prefill / _decode_time_seconds)."""
        now = time.perf_counter()
        admitted = self.admitted_at if self.admitted_at is not None else now
        phases = {"queue": admitted - self.added_at}
        if self.admitted_at is not None:
            first = self.first_token_at if self.first_token_at is not None else now
            phases["prefill"] = first - admitted
            if self.first_token_at is not None:
                phases["decode"] = now - first
        return phases

    def _tool_calls(self) -> list[ToolCall] | None:
        """The parsed calls, on the last output of a completed tool-call answer."""
        if self.grammar is None or self.finish_reason != "stop":
            return None
        return self.grammar.tool_calls([t for t in self.generated if t not in self.stop_token_ids])

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> StepOutput:
        """Records a chosen token and says what the client sees."""
        self.generated.append(token_id)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        logprobs = [logprob] if logprob is not None else None
        if self.grammar is not None:
            self.grammar.consume(token_id)
            if self.grammar.error is not None:  # the schema could not be followed: even an end-of-sequence is no answer
                self.finish_reason = "error"
                return self.output([token_id], "", logprobs, error=f"structured output: {self.grammar.error}",
                                   error_param=self.grammar.spec.param)
            if self.grammar.chose_text:  # tool_choice "auto" answers in text: the rest is plain decoding
                self.grammar = None
        sampling = self.request.sampling
        if token_id in self.stop_token_ids and not sampling.ignore_eos:
            self.finish_reason = "stop"
            text = self._last_text()
            if sampling.include_stop_str_in_output and self.stop_matcher.matched is None:
                # The stop token's own text (vLLM's; a special token's is "" unless skip_special_tokens is false).
                text += self.detokenizer.step(token_id) + self.detokenizer.flush()
            return self.output([token_id], text, logprobs)
        piece = self.detokenizer.step(token_id)
        if self.grammar is not None:
            self.grammar.scan(piece)
        text = self.stop_matcher.feed(piece)
        if self.stop_matcher.matched is not None:
            self.finish_reason = "stop"
        elif self.grammar is not None and (self.grammar.done or self.grammar.repeated):
            # complete (only end-of-sequence could follow), or a tool call repeated (the calls before it)
            self.finish_reason = "stop"
            text += self._last_text()
        elif len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
            text += self._last_text()
        return self.output([token_id], text, logprobs)

    def _last_text(self) -> str:
        """What the answer still holds back as it ends: the detokenizer's
        unfinished bytes (through the stop strings, which may still match
        there), then the stop matcher's tail."""
        text = self.stop_matcher.feed(self.detokenizer.flush())
        if self.stop_matcher.matched is not None:
            self.finish_reason = "stop"
            return text
        return text + self.stop_matcher.flush()

    def finish(self, reason: FinishReason, error: str | None = None, error_param: str | None = None) -> StepOutput:
        self.finish_reason = reason
        return self.output([], "", error=error, error_param=error_param)

    def no_token_left(self) -> StepOutput:
        """The end of a request whose own rules left no token to choose (the
        engine checked the model's scores were fine): a 400 naming the
        client's field that narrows the choice most (allowed_token_ids, then
        bad_words, then min_tokens), else its answer's format."""
        sampling = self.request.sampling
        fields = [name for name, given in (("allowed_token_ids", sampling.allowed_token_ids),
                                           ("bad_words", self.request.bad_words_ids),
                                           ("min_tokens", len(self.generated) < sampling.min_tokens)) if given]
        param = fields[0] if fields else (self.grammar.spec.param if self.grammar is not None else None)
        return self.finish("error", "no token can be chosen here: the answer's format, allowed_token_ids, "
                           "bad_words and min_tokens rule them all out", param)
