"""The PAD engine: continuous batching of reward-guided decoding.

Every request owns a base row and one reward row per preference. Between
steps requests join (their prompts are prefilled and their rows appended to
the running batch) and leave (their rows are dropped); rows keep their KV
caches, and rows on the same weights run in one forward pass.

    engine = load_engine(settings)    # pad_core.model_loading: builds the runners
    engine.add_chat(request)          # or add_request(GenerationRequest)
    while engine.has_unfinished():
        for output in engine.step(): ...

The engine never loads models: it is given its runners (the `Runner`
protocol of pad_core.runner) and reaches them only through that protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from pad_core.decoding import StepInputs, TokenMask, apply_token_mask, next_tokens
from pad_core.detokenize import IncrementalDetokenizer, token_bytes
from pad_core.errors import ContextLengthExceededError, InvalidRequestError, UnknownRewardModelError
from pad_core.lora import NO_ADAPTER
from pad_core.prompting import PromptBuilder
from pad_core.request_state import RequestState, RewardRowRef
from pad_core.runner import BASE_RUNNER, NewRow, RewardSource, Runner, prefix_key
from pad_core.sampling import (
    INVALID_TOKEN,
    NO_LEGAL_TOKEN,
    apply_penalties,
    apply_sampling_controls,
    token_ranks,
    top_logprobs,
    usable_rows,
)
from pad_core.settings import EngineSettings
from pad_core.structured import StructuredOutputs
from pad_core.token_controls import bad_words_ids, longest, message_cut_points, truncate_request, without_oldest
from pad_core.transfer import select_rows, to_device
from pad_core.types import (
    ChatRequest,
    GenerationRequest,
    RequestLimits,
    RewardPrompt,
    StepOutput,
    StructuredOutput,
    TextRequest,
    TokenLogprob,
)
from pad_core.validation import TEMPERATURE_FLOOR

logger = logging.getLogger(__name__)

# What OpenAI reports for a token the model finds impossible: logprobs stay
# finite numbers (JSON has no -Infinity).
MIN_LOGPROB = -9999.0
PROMPT_LOGPROBS_CHUNK = 512  # prompt positions per vocabulary-wide log-softmax ([chunk, V] float32: 100 MB at 49k)


__all__ = ["BASE_RUNNER", "PadEngine", "RewardSource", "default_max_tokens", "finite_logprob", "max_token_chars"]


def without_zero_weights(request: ChatRequest | TextRequest) -> ChatRequest | TextRequest:
    """The request without its preferences of weight 0: they add nothing to
    the combined reward, so they cost no reward pass and stay out of every
    prompt; when none is left, the request decodes plainly (no prescreen)."""
    if all(p.weight != 0 for p in request.preferences):
        return request
    return dataclasses.replace(request, preferences=[p for p in request.preferences if p.weight != 0])


class PadEngine:
    """runners: name -> Runner (BASE_RUNNER holds the base model);
    reward_sources: reward model name (as requests give it) -> where its rows run."""

    def __init__(
        self,
        tokenizer,
        runners: Mapping[str, Runner],
        reward_sources: Mapping[str, RewardSource],
        settings: EngineSettings,
        context_length: int,
        stop_token_ids: Iterable[int],
        sampling_defaults: Mapping[str, float | int] | None = None,
    ):
        self.tokenizer = tokenizer
        # Request field -> the model's default (pad_core/generation_defaults.py); the gateway applies them.
        self.sampling_defaults = dict(sampling_defaults or {})
        self.runners = dict(runners)
        self.reward_sources = dict(reward_sources)
        self.settings = settings
        self.context_length = context_length
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prompts = PromptBuilder(tokenizer, settings.preference_template)
        self.limits = RequestLimits.from_settings(settings)
        self.max_token_chars = max_token_chars(tokenizer)
        self.structured = StructuredOutputs(tokenizer, runners[BASE_RUNNER].vocab_size, self.stop_token_ids)
        self.waiting: deque[RequestState] = deque()
        self.prefilling: list[RequestState] = []  # admitted; prompts being written (chunked prefill)
        self.running: list[RequestState] = []
        self._aborted: set[str] = set()
        self._unloading: dict[str, str] = {}  # reward adapter unloaded -> its runner, freed once no request uses it
        # The seeds of requests that bring none: from PAD_SEED when set (vLLM's --seed: a restarted
        # server answers the same requests, in the same order, alike), else fresh.
        self._seed_source = random.Random(settings.seed)
        self._token_texts: dict[int, tuple[str, list[int]]] = {}  # token id -> its text and bytes (logprobs)
        # The tokens skip_special_tokens leaves out of an answer's text (the tokenizer's special added tokens).
        self._special_ids = frozenset(token_id for token_id, added in tokenizer.added_tokens_decoder.items()
                                      if added.special)
        self.max_prefill_tokens = settings.resolved_max_prefill_tokens(self.runners[BASE_RUNNER].device.type)

    # ---- requests -----------------------------------------------------
    def add_chat(self, chat: ChatRequest) -> None:
        """Renders the chat (with the preferences in the reward contexts) and
        queues it. Raises InvalidRequestError subclasses; nothing is queued then."""
        self.add_request(self.prepare_chat(chat))

    def prepare_chat(self, chat: ChatRequest) -> GenerationRequest:
        """Validates and renders the chat (tokenization, the slow part of a
        long prompt). Reads only the tokenizer and the settings, so the worker
        runs it off its decode loop, in another thread; `add_request` then
        queues the result. Raises InvalidRequestError subclasses."""
        return self._render_chat(chat, refuse_long=True)

    def count_chat(self, chat: ChatRequest) -> int:
        """The tokens of the base prompt the chat would run with (the Responses
        API's input_tokens count): rendered and checked as prepare_chat does
        it (preferences, tools, truncation "auto"), but a prompt longer than
        the context is counted, not refused."""
        return len(self._render_chat(chat, refuse_long=False).prompt_ids)

    def _render_chat(self, chat: ChatRequest, refuse_long: bool) -> GenerationRequest:
        chat.verify(self.limits)
        chat = without_zero_weights(chat)
        if chat.drop_oldest_messages:
            chat = dataclasses.replace(chat, messages=self._messages_within_chars(chat))
        if refuse_long and chat.sampling.truncate_prompt_tokens is None:  # a truncated prompt fits whatever its length
            self._check_prompt_chars(chat)
        source = self._reward_source(chat.guidance.reward_model)
        sees = chat.guidance.base_sees_preference
        if sees is None:
            sees = source.base_sees_preference
        structured = chat.structured
        if structured is not None:
            self.structured.compile(structured)  # here, off the decode loop (a grammar may take a while)
        tool_call = structured is not None and structured.kind == "tool_calls"

        def encode(messages: list[dict[str, str]]) -> tuple[list[int], list[list[int]]]:
            return self.prompts.encode_request(
                messages,
                chat.preferences,
                sees,
                tools=structured.tools if tool_call else (),
                tool_choice=structured.tool_choice if tool_call else None,
                optional_tools=tool_call and structured.auto,
                template=chat.template,
            )

        if chat.drop_oldest_messages:
            prompt_ids, reward_ids = self._encode_fitting(chat, encode)
        else:
            prompt_ids, reward_ids = encode(chat.messages)
        return self.generation_request(chat, prompt_ids, reward_ids, structured)

    # ---- truncation "auto": the oldest messages leave --------------------
    def _room_to_keep(self, chat: ChatRequest) -> int:
        """What truncation "auto" leaves for the answer: max_tokens, or when
        not given the default answer length (capped at a quarter of the
        context), so the answer is not squeezed to the one token left."""
        if chat.sampling.max_tokens is not None:
            return max(chat.sampling.max_tokens, 1)
        return max(1, self._default_max_tokens(self.context_length // 4))

    def _default_max_tokens(self, room: int) -> int:
        """max_tokens of a request that gives none: the room left in the
        context, at most PAD_DEFAULT_MAX_TOKENS and the model's own
        max_new_tokens (its generation config; vLLM's default too)."""
        default = default_max_tokens(self.settings.default_max_tokens, room)
        recommended = self.sampling_defaults.get("max_tokens")
        return default if recommended is None else min(default, recommended)

    def _messages_within_chars(self, chat: ChatRequest) -> list[dict[str, str]]:
        """The messages with the oldest left out while the rest could not fit
        for certain: at least max(characters / max_token_chars, one token a
        message) tokens with the longest running preference, plus the room
        for the answer (the bound _check_prompt_chars applies). Counting
        costs nothing; tokenizing what must go anyway does."""
        messages = chat.messages
        points = message_cut_points(messages)
        chars = [sum(len(v) for v in m.values() if isinstance(v, str)) for m in messages]
        preferences = chat.preferences if self._runs_rewards(chat.sampling, chat.guidance) else ()
        fixed = sum(chars[:points[0]]) + max((len(p.text) for p in preferences), default=0)
        suffix = [0] * (len(messages) + 1)  # suffix[i]: characters of messages[i:]
        for index in range(len(messages) - 1, -1, -1):
            suffix[index] = suffix[index + 1] + chars[index]
        room = self.context_length - self._room_to_keep(chat)
        for point in points:
            at_least = max(-(-(fixed + suffix[point]) // self.max_token_chars), points[0] + len(messages) - point)
            if at_least <= room:
                return without_oldest(messages, point)
        return without_oldest(messages, points[-1])

    def _encode_fitting(self, chat: ChatRequest, encode) -> tuple[list[int], list[list[int]]]:
        """The prompts of the longest recent part of the conversation whose
        contexts leave room for the answer: the whole when it fits, else
        the search grows the kept part from the newest message by doubling,
        then halves between the last part that fit and the first that did
        not (leaving out more never lengthens a prompt), so it tokenizes
        parts about the context's size, not the whole conversation again
        and again. When not even the newest part fits, its prompts: the
        usual context-length 400."""
        messages = chat.messages
        room = self.context_length - self._room_to_keep(chat)
        runs = self._runs_rewards(chat.sampling, chat.guidance)

        def fits(encoded: tuple[list[int], list[list[int]]]) -> bool:
            base, rewards = encoded
            return longest((base, rewards if runs else [])) <= room

        points = message_cut_points(messages)
        whole = encode(messages)
        if fits(whole) or len(points) == 1:
            return whole
        high = len(points) - 1  # the kept part from points[high] fits (checked next); from points[0], not
        kept = encode(without_oldest(messages, points[high]))
        if not fits(kept):
            return kept
        low, step = 0, 1
        while high - step > 0:  # doubling: how far back the kept part may reach
            encoded = encode(without_oldest(messages, points[high - step]))
            if not fits(encoded):
                low = high - step
                break
            high, kept, step = high - step, encoded, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            encoded = encode(without_oldest(messages, points[middle]))
            if fits(encoded):
                high, kept = middle, encoded
            else:
                low = middle
        return kept

    def generation_request(self, request: ChatRequest | TextRequest, prompt_ids: list[int],
                           reward_ids: list[list[int]], structured: StructuredOutput | None) -> GenerationRequest:
        """A tokenized chat or raw-text request as the engine runs it, with
        vLLM's token-level fields applied (truncate_prompt_tokens, bad_words)."""
        sampling = request.sampling
        if sampling.truncate_prompt_tokens is not None:
            # Only reward prompts that will run claim room (-1 cuts until they fit): with weight 0, or
            # max_tokens 0 (the prompt's logprobs only), they never reach the model and stay as they are.
            runs = self._runs_rewards(sampling, request.guidance)
            prompt_ids, cut = truncate_request(prompt_ids, reward_ids if runs else [], sampling.truncate_prompt_tokens,
                                               self.context_length, sampling.max_tokens, sampling.truncation_side)
            reward_ids = cut if runs else reward_ids
        return GenerationRequest(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            reward_prompts=[
                RewardPrompt(tuple(ids), p.weight) for ids, p in zip(reward_ids, request.preferences, strict=True)
            ],
            sampling=sampling,
            guidance=request.guidance,
            structured=structured,
            priority=request.priority,
            bad_words_ids=bad_words_ids(self.tokenizer, sampling.bad_words) if sampling.bad_words else (),
        )

    def _guidance_weight(self, guidance) -> float:
        return self.settings.default_weight if guidance.weight is None else guidance.weight

    def _runs_rewards(self, sampling, guidance) -> bool:
        """Whether a request's reward prompts reach the model: not with weight
        0 (plain decoding) nor max_tokens 0 (the prompt's logprobs only)."""
        return sampling.max_tokens != 0 and self._guidance_weight(guidance) != 0

    def add_request(self, request: GenerationRequest) -> None:
        state = self._new_state(request)
        if self.settings.scheduling_policy == "priority":
            # Behind every waiting request of the same or a lower priority value (first come among equals).
            place = next((i for i, other in enumerate(self.waiting)
                          if other.request.priority > request.priority), len(self.waiting))
            self.waiting.insert(place, state)
        else:
            self.waiting.append(state)

    def abort(self, request_id: str) -> None:
        """The request ends (finish_reason "abort") at the next step and its rows are freed."""
        if any(state.request_id == request_id for state in self._in_flight()):
            self._aborted.add(request_id)

    def add_reward_adapter(self, name: str, path: str) -> None:
        """Loads a LoRA reward adapter at run time (between steps); requests
        may name it in `pad.reward_model` from the next step on. Raises
        ModelLoadError for a folder that cannot be served."""
        if name in self.reward_sources:
            raise InvalidRequestError(f"a reward model named {name!r} is already loaded", param="name")
        if name in self._unloading:
            raise InvalidRequestError(
                f"reward model {name!r} is still unloading: {self._adapter_users(name)} running requests use it; "
                "load it again once they end", param="name", code="unloading")
        self.runners[BASE_RUNNER].add_adapter(name, Path(path))
        self.reward_sources[name] = RewardSource(BASE_RUNNER, adapter=name)

    def remove_reward_adapter(self, name: str) -> int:
        """Unloads a LoRA reward adapter: new requests naming it are refused
        at once; those already taken finish with it, and its weights (and
        its prefix-cache entries) are freed when the last one ends. Returns
        how many requests still use it. `self` and reward models with weights
        of their own (set at start) are not unloaded."""
        source = self._reward_source(name)
        if source.adapter == NO_ADAPTER:
            raise InvalidRequestError(
                f"reward model {name!r} is not a LoRA adapter ("
                + ("it reads the base model" if name == "self" else "it has weights of its own, set at start")
                + "); only adapters are unloaded", param="name", code="cannot_unload")
        del self.reward_sources[name]
        self._unloading[source.adapter] = source.runner
        self._free_unloaded_adapters()
        return self._adapter_users(source.adapter)

    def _adapter_users(self, adapter: str) -> int:
        return sum(1 for state in self._in_flight() if state.reward_adapter == adapter and state.reward_rows)

    def _free_unloaded_adapters(self) -> None:
        for adapter, runner in list(self._unloading.items()):
            if not self._adapter_users(adapter) and adapter not in self.runners[runner].adapters_in_use():
                self.runners[runner].remove_adapter(adapter)
                del self._unloading[adapter]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def chunked_prefill(self) -> bool:
        """Prompts are written in pieces between decode steps (every runner can)."""
        return self.settings.chunked_prefill and all(runner.chunked_prefill for runner in self.runners.values())

    def _in_flight(self) -> list[RequestState]:
        return [*self.waiting, *self.prefilling, *self.running]

    def stats(self) -> dict[str, float]:
        caches = [cache for runner in self.runners.values()
                  if (cache := getattr(runner, "prefix_cache", None)) is not None]
        return {
            "running_requests": len(self.running) + len(self.prefilling),
            "running_rows": sum(runner.num_rows for runner in self.runners.values()),
            # The fullest runner's share of its KV memory (vLLM's kv_cache_usage_perc).
            "kv_cache_usage": max((usage for runner in self.runners.values()
                                   if (usage := runner.kv_usage) is not None), default=0.0),
            "waiting_requests": len(self.waiting),
            # totals since the engine started (the gateway's counters add what is new)
            "prefix_cache_queried_tokens": sum(cache.queried_tokens for cache in caches),
            "prefix_cache_hit_tokens": sum(cache.hit_tokens for cache in caches),
            "prefix_cache_bytes": sum(cache.bytes for cache in caches),
        }

    def model_info(self) -> dict:
        return {
            "served_model_name": self.settings.resolved_served_name(),
            "served_model_names": self.settings.served_names(),
            "context_length": self.context_length,
            "reward_models": sorted(self.reward_sources),
            "reward_model_types": {name: reward_model_type(name, source) for name, source in self.reward_sources.items()},
            # Structured outputs (pad_core/structured.py); tools are honoured
            # as forced calls (tool_choice "required" or a named function) or
            # as a choice between calls and text (tool_choice "auto").
            "structured_outputs": ["json_object", "json_schema", "tool_calls", "regex", "choice", "grammar"],
            # Whether the chat template renders `tools` itself; where it does
            # not, the engine describes them in the system message.
            "chat_template_tools": self.prompts.template_knows_tools,
            "sampling_defaults": self.sampling_defaults,
            # PAD's own defaults and, per reward model, whether the base context
            # holds the preferences: the gateway's `pad` echo of a request not
            # yet admitted (a queued background response) reads them here.
            "guidance_defaults": self.settings.guidance_defaults(),
            "base_sees_preference": {name: source.base_sees_preference
                                     for name, source in self.reward_sources.items()},
        }

    def generate(self, requests: Iterable[ChatRequest | GenerationRequest]) -> Iterator[StepOutput]:
        """Runs the given requests to completion, yielding every step output."""
        for request in requests:
            (self.add_chat if isinstance(request, ChatRequest) else self.add_request)(request)
        while self.has_unfinished():
            yield from self.step()

    # ---- the step -----------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step of the running requests, then prefill: the
        admitted requests' prompts, whole or (chunked prefill) a piece of at
        most max_prefill_tokens, so a long prompt is written over several
        steps while the others decode. A failure ends only the requests it
        can be traced to: a request whose token choice fails ends alone
        (`_advance`), a prefill that fails is retried request by request
        (`_prefill`); only a failed decode forward, which every running row
        shares, ends them all."""
        outputs = self._finish_aborted()
        self._release_finished()
        if self.running:
            try:
                outputs += self._decode_running()
            except Exception as exc:  # the shared forward failed: its KV caches are not trustworthy
                logger.exception("decode step failed; failing the running requests")
                outputs += self._fail_all(f"engine error: {exc}")
                self._release_finished()  # the failed requests mid-prompt too: none is written on
        admitted = self._admit()
        outputs += self._read_prompt_logprobs([state for state in admitted
                                               if state.request.sampling.prompt_logprobs is not None])
        self.prefilling += [state for state in admitted if state.finish_reason is None]
        if self.prefilling:
            outputs += self._prefill(self._prefill_plan())
        self._release_finished()
        if self._unloading:
            self._free_unloaded_adapters()
        return outputs

    def _decode_running(self) -> list[StepOutput]:
        hidden = {}
        for name, tokens in self._decode_tokens().items():
            runner = self.runners[name]
            hidden[name] = (runner.decode(torch.tensor(tokens, dtype=torch.long)), runner.row_index())
        return self._advance(list(self.running), hidden)

    def _decode_tokens(self) -> dict[str, list[int]]:
        """Each runner's decode input: the next token of every live row at its
        batch index (`Runner.row_index`, kept by the runner as rows join and
        leave); 0 where no row sits (a pool's free slot)."""
        tokens = {name: [0] * runner.batch_size for name, runner in self.runners.items() if runner.num_rows}
        indexes = {name: self.runners[name].row_index() for name in tokens}
        for state in self.running:
            token = state.next_input
            for runner_name, key in state.row_locations:
                tokens[runner_name][indexes[runner_name][key]] = token
        return tokens

    def _prefill_plan(self) -> list[tuple[RequestState, int]]:
        """(request, tokens to advance its prompts by) for this step, first
        come first served within max_prefill_tokens: with chunked prefill the
        last request planned may get a piece of its prompts; without, every
        admitted request is written whole (admission kept to the budget)."""
        if not self.chunked_prefill:
            return [(state, state.prefill_length - state.prefilled) for state in self.prefilling]
        budget = self.max_prefill_tokens
        plan = []
        # Requests whose rows are identical (the n choices of one) move together
        # where the runners run identical rows once: the copies cost nothing.
        shared = all(runner.runs_identical_rows_once for runner in self.runners.values())
        planned: dict[tuple, int] = {}  # (prompts, progress) -> advance planned this step
        full = False  # the budget is spent: only such copies still join
        for state in self.prefilling:
            key = (state.prompts_key, state.prefilled) if shared else None
            if key is not None and key in planned:
                plan.append((state, planned[key]))
                continue
            if full:
                if shared:
                    continue
                break
            lengths = [len(prompt) for prompt in state.prompts]
            cached = self._cached_lengths(state) if state.prefilled == 0 else [0] * len(lengths)
            # A first piece reaches past what every row's prefix cache holds
            # (those tokens cost nothing), so a chat's next turn reuses its
            # whole history whatever the piece size.
            skip = min(state.prefill_length - n + c for n, c in zip(lengths, cached, strict=True))
            advance = min(state.prefill_length - state.prefilled, skip + budget // len(lengths))
            if advance < 1:
                if plan:
                    full = True
                    continue
                advance = 1  # the first request always moves, whatever the budget
            plan.append((state, advance))
            if key is not None:
                planned[key] = advance
            spans = prompt_spans(lengths, state.prefilled, advance)
            budget -= sum(end - start - min(c, end - start) for (start, end), c in zip(spans, cached, strict=True))
            full = budget <= 0
        return plan

    def _cached_lengths(self, state: RequestState) -> list[int]:
        """Tokens at the start of each of the request's prompts (`row_keys`
        order) that its runner's prefix cache holds now."""
        salt = state.request.sampling.cache_salt
        return [self.runners[runner].cached_length(prefix_key(adapter, salt), prompt)
                for (runner, _), adapter, prompt in zip(state.row_locations, self._row_adapters(state), state.prompts,
                                                         strict=True)]

    def _row_adapters(self, state: RequestState) -> list[str]:
        """The LoRA adapter of each of the request's rows (`row_keys` order):
        none for the base row, the reward model's for its reward rows."""
        return [NO_ADAPTER, *([state.reward_adapter] * len(state.reward_rows))]

    def _prefill(self, plan: list[tuple[RequestState, int]]) -> list[StepOutput]:
        """Writes the planned pieces of the requests' prompts; a request whose
        prompts are then complete chooses its first token and joins the
        running batch. A failed prefill leaves the other rows alone (new rows
        take free places, no running row moves) and drops the rows of the
        requests it wrote for; several requests are then retried one by
        one, from the start of their prompts, so only one that fails alone
        ends ("error")."""
        try:
            hidden = self._prefill_forward(plan)
        except Exception as exc:
            states = [state for state, _ in plan]
            self._drop_rows(states)
            for state in states:
                state.prefilled = 0
            if len(plan) > 1:
                logger.warning("prefill of %d requests failed (%s); retrying each alone", len(plan), exc)
                return [output for entry in plan for output in self._prefill([entry])]
            logger.exception("prefill of request %s failed", states[0].request_id)
            return [states[0].finish("error", error=f"engine error: {exc}")]
        for state, advance in plan:
            state.prefilled += advance
        complete = [state for state, _ in plan if state.prefilled >= state.prefill_length]
        if not complete:
            return []
        joining = {id(state) for state in complete}
        self.prefilling = [state for state in self.prefilling if id(state) not in joining]
        self.running.extend(complete)
        return self._advance(complete, hidden)

    def _prefill_forward(self, plan: list[tuple[RequestState, int]]) -> dict:
        """Runs the planned prompt pieces, each runner its rows in one call.
        Returns runner name -> (hidden states [rows, H], row key -> index)."""
        new_rows: dict[str, list[NewRow]] = {}
        for state, advance in plan:
            lengths = [len(prompt) for prompt in state.prompts]
            spans = prompt_spans(lengths, state.prefilled, advance)
            for (name, key), prompt, row_adapter, (start, end) in zip(
                state.row_locations, state.prompts, self._row_adapters(state), spans, strict=True
            ):
                if start < end:
                    row = NewRow(key, prompt[start:end], row_adapter, start=start, last=end == len(prompt),
                                 cache_salt=state.request.sampling.cache_salt)
                    if start == 0 and key == state.base_key:  # usage's cached_tokens: what prefill will not compute
                        # (looked up on this first piece, as the runner does: a short piece reuses less)
                        state.cached_tokens = self.runners[name].cached_length(row.prefix_key, row.prompt_ids)
                    new_rows.setdefault(name, []).append(row)
        hidden = {}
        for name, rows in new_rows.items():
            hidden[name] = (self.runners[name].prefill(rows), {row.key: index for index, row in enumerate(rows)})
        return hidden

    def _drop_rows(self, states: list[RequestState]) -> None:
        keys = {key for state in states for key in state.row_keys}
        for runner in self.runners.values():
            runner.remove(keys)

    def _advance(self, states: list[RequestState], hidden) -> list[StepOutput]:
        """Chooses and records one token for each of `states`. A request whose
        choice or bookkeeping fails (a numerical error, a bug its input
        reaches) ends alone with "error"; the others get their token.

        hidden: runner name -> (hidden states [B, H], row key -> index in B)."""
        generators = [state.generator for state in states]
        snapshot = [None if g is None else g.get_state() for g in generators]
        try:
            tokens, logprobs = self._choose(states, hidden)
        except Exception:
            logger.exception("choosing the next tokens of %d requests failed; retrying each alone", len(states))
            for generator, state in zip(generators, snapshot, strict=True):
                if generator is not None:  # the retry draws what the batch would have drawn
                    generator.set_state(state)
            tokens, logprobs = self._choose_each(states, hidden)
        outputs = []
        for index, state in enumerate(states):
            token = tokens[index]
            if token == NO_LEGAL_TOKEN:
                outputs.append(state.no_token_left())
                continue
            if token == INVALID_TOKEN:
                outputs.append(state.finish("error", error="engine error on this request: the scores are not "
                                            "finite numbers (NaN or infinite logits)"))
                continue
            if isinstance(token, Exception):
                outputs.append(state.finish("error", error=f"engine error on this request: {token}"))
                continue
            try:
                outputs.append(state.append_token(token, logprobs[index] if logprobs else None))
            except Exception as exc:
                logger.exception("request %s failed after its token was chosen", state.request_id)
                outputs.append(state.finish("error", error=f"engine error on this request: {exc}"))
        return outputs

    def _choose_each(self, states: list[RequestState], hidden) -> tuple[list, list | None]:
        """_choose for one request at a time: a request that fails gets its
        exception in place of a token."""
        tokens: list = []
        logprobs: list = []
        for state in states:
            try:
                chosen, chosen_logprobs = self._choose([state], hidden)
            except Exception as exc:
                logger.exception("choosing the next token of request %s failed", state.request_id)
                chosen, chosen_logprobs = [exc], None
            tokens += chosen
            logprobs += chosen_logprobs or [None]
        return tokens, logprobs

    def _choose(self, states: list[RequestState], hidden) -> tuple[list[int], list[TokenLogprob] | None]:
        """The next token of each request (INVALID_TOKEN where its scores are
        not usable), and its logprobs where asked."""
        base_hidden, base_index = hidden[BASE_RUNNER]
        base_rows = [base_index[state.base_key] for state in states]
        raw_base = self.runners[BASE_RUNNER].logits(select_rows(base_hidden, base_rows))
        base = apply_sampling_controls(self._penalised(states, raw_base), states)  # vLLM extensions, logit_bias
        reward_rows = [(position, ref) for position, state in enumerate(states) for ref in state.reward_rows]
        # Per-request settings stay on the host (next_tokens sends them without a sync).
        tokens = next_tokens(
            StepInputs(
                base_logits=base,
                reward_logits_at=lambda candidates: self._reward_logits_at(reward_rows, hidden, candidates),
                reward_owner=torch.tensor([p for p, _ in reward_rows], dtype=torch.long),
                preference_weight=torch.tensor([r.weight for _, r in reward_rows], dtype=torch.float32),
                guidance_weight=torch.tensor([s.guidance_weight for s in states], dtype=torch.float32),
                top_k=torch.tensor([s.top_k for s in states], dtype=torch.long),
                min_p=torch.tensor([s.min_p for s in states], dtype=torch.float32),
                temperature=[s.request.sampling.temperature for s in states],
                top_p=[s.request.sampling.top_p for s in states],
                generators=[s.generator for s in states],
                unpenalised_base_logits=None if base is raw_base else raw_base,
                token_mask=(token_mask := self._token_mask(states, base.device)),
            )
        )
        logprobs = self._logprobs(states, base, token_mask, tokens.clamp(min=0))
        tokens = tokens.tolist()
        if INVALID_TOKEN in tokens:  # rare: worth a look at whose fault it is
            blame_no_legal_token(tokens, raw_base, base, token_mask)
        return tokens, logprobs

    def _token_mask(self, states: list[RequestState], device: torch.device) -> TokenMask | None:
        """The legal next tokens of the requests with a grammar (structured outputs)."""
        constrained = [row for row, state in enumerate(states) if state.grammar is not None]
        if not constrained:
            return None
        allowed = self.structured.allowed_tokens([states[row].grammar for row in constrained])
        return TokenMask(torch.tensor(constrained, dtype=torch.long, device=device), allowed.to(device))

    def _reward_logits_at(self, reward_rows, hidden, candidates: torch.Tensor) -> torch.Tensor:
        """Logits of each reward row [M] at its candidates [M, K], each row
        through the runner that holds it."""
        by_runner: dict[str, list[int]] = {}
        for m, (_, ref) in enumerate(reward_rows):
            by_runner.setdefault(ref.runner, []).append(m)
        if len(by_runner) == 1:  # the usual case: no scatter
            (runner_name, positions), = by_runner.items()
            return self._runner_logits_at(runner_name, [reward_rows[m][1] for m in positions], hidden, candidates)
        logits = candidates.new_empty(candidates.shape, dtype=torch.float32)
        for runner_name, positions in by_runner.items():
            index = to_device(positions, torch.long, candidates.device)
            logits[index] = self._runner_logits_at(runner_name, [reward_rows[m][1] for m in positions], hidden,
                                                   candidates[index])
        return logits

    def _runner_logits_at(self, runner_name: str, refs, hidden, candidates: torch.Tensor) -> torch.Tensor:
        runner_hidden, index = hidden[runner_name]
        rows = select_rows(runner_hidden, [index[ref.key] for ref in refs])
        return self.runners[runner_name].logits_at(rows, candidates)

    def _penalised(self, states: list[RequestState], base: torch.Tensor) -> torch.Tensor:
        presence = [s.request.sampling.presence_penalty for s in states]
        frequency = [s.request.sampling.frequency_penalty for s in states]
        if not any(presence) and not any(frequency):
            return base
        counts = torch.zeros_like(base)
        for row, state in enumerate(states):
            if state.generated:
                ids = torch.tensor(state.generated, device=base.device)
                counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=base.dtype))
        return apply_penalties(base, counts, base.new_tensor(presence), base.new_tensor(frequency))

    def _logprobs(self, states, base: torch.Tensor, token_mask: TokenMask | None,
                  tokens: torch.Tensor) -> list[TokenLogprob] | None:
        """The chosen tokens' logprobs where asked: of the distribution they
        were chosen from, every rule in (penalties, logit_bias, top_k ...,
        and a grammar's legal tokens)."""
        wanted = [s.request.sampling.logprobs for s in states]
        if not any(wanted):
            return None
        base = apply_token_mask(base, token_mask)
        rows = [row for row, want in enumerate(wanted) if want]
        count = max(states[row].request.sampling.top_logprobs for row in rows)
        index = torch.tensor(rows, device=base.device)
        entries = iter(self._logprob_entries(base[index].log_softmax(dim=-1), tokens[index], count))
        return [self._answer_entry(next(entries), s.request.sampling) if want else None
                for want, s in zip(wanted, states, strict=True)]

    def _answer_entry(self, entry: TokenLogprob, sampling) -> TokenLogprob:
        """A row's entry as its request asked: top_logprobs cut to its count,
        and a special token that skip_special_tokens leaves out of the text
        marked so (`in_text`)."""
        entry = self._cut(entry, sampling.top_logprobs)
        if sampling.skip_special_tokens and entry.token_id in self._special_ids:
            entry = dataclasses.replace(entry, in_text=False)
        return entry

    def _logprob_entries(self, log_probs: torch.Tensor, tokens: torch.Tensor, count: int) -> list[TokenLogprob]:
        """log_probs [N, V], tokens [N] -> each token's entry with the `count`
        most likely tokens of its row."""
        chosen, values, ids = top_logprobs(log_probs, tokens, count)
        ranks = token_ranks(log_probs, chosen).tolist()
        chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
        result = []
        for row, token_id in enumerate(tokens.tolist()):
            top = [self._token_entry(i, finite_logprob(v)) for i, v in zip(ids[row], values[row], strict=True)]
            token, _, raw = self._token_entry(token_id, 0.0)
            result.append(TokenLogprob(token=token, logprob=finite_logprob(chosen[row]), bytes=raw, top_logprobs=top,
                                       token_id=token_id, rank=ranks[row], top_ids=ids[row]))
        return result

    @staticmethod
    def _cut(entry: TokenLogprob, count: int) -> TokenLogprob:
        if len(entry.top_logprobs) == count:
            return entry
        return dataclasses.replace(entry, top_logprobs=entry.top_logprobs[:count], top_ids=entry.top_ids[:count])

    def _read_prompt_logprobs(self, states: list[RequestState]) -> list[StepOutput]:
        """Reads the prompt logprobs of newly admitted requests that ask for
        them (kept for their first output). A request that only scores its
        prompt (max_tokens 0) ends here, "length", without taking rows; one
        whose reading fails ends alone ("error")."""
        outputs = []
        read: dict[tuple, list[TokenLogprob]] = {}  # the n choices of a request share their prompt's
        for state in states:
            key = (tuple(state.request.prompt_ids), state.request.sampling.prompt_logprobs)
            try:
                if key not in read:
                    read[key] = self._prompt_logprobs(*key)
                state.prompt_logprobs = read[key]
            except Exception as exc:
                logger.exception("prompt logprobs of request %s failed", state.request_id)
                outputs.append(state.finish("error", error=f"engine error: {exc}"))
                continue
            if state.max_tokens == 0:
                outputs.append(state.finish("length"))
        return outputs

    @torch.inference_mode()
    def _prompt_logprobs(self, prompt_ids: Sequence[int], count: int) -> list[TokenLogprob]:
        """Each prompt token's logprob under the plain model given the tokens
        before it, with the `count` most likely tokens there; the first
        token's is None. The vocabulary-wide log-softmax runs over
        PROMPT_LOGPROBS_CHUNK positions at a time ([chunk, V] float32)."""
        runner = self.runners[BASE_RUNNER]
        hidden = runner.prompt_hidden(prompt_ids)  # [T, H]
        targets = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=hidden.device)
        token, _, raw = self._token_entry(prompt_ids[0], 0.0)
        entries = [TokenLogprob(token=token, logprob=None, bytes=raw, token_id=prompt_ids[0])]
        for start in range(0, len(targets), PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, len(targets))
            log_probs = runner.logits(hidden[start:end]).log_softmax(dim=-1)
            entries += self._logprob_entries(log_probs, targets[start:end], count)
        return entries

    def _token_entry(self, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
        text = self._token_texts.get(token_id)
        if text is None:  # decoding is most of a logprobs entry's cost: once per token id
            text = self._token_texts[token_id] = (self.tokenizer.decode([token_id]), token_bytes(self.tokenizer, token_id))
        return text[0], logprob, text[1]

    # ---- scheduling ---------------------------------------------------
    def _admit(self) -> list[RequestState]:
        """FIFO admission within the request and row budgets, and, without
        chunked prefill, the prefill-token budget (with it, `_prefill_plan`
        spreads the prompts over steps instead)."""
        admitted: list[RequestState] = []
        in_batch = [*self.prefilling, *self.running]
        rows = sum(len(state.row_keys) for state in in_batch)
        prefill_tokens = scored_tokens = 0
        scored: set[tuple] = set()  # prompts whose logprobs this step reads already (a request's n choices)
        token_budget = None if self.chunked_prefill else self.max_prefill_tokens
        while self.waiting:
            state = self.waiting[0]
            scores_only = state.max_tokens == 0  # takes no rows (_read_prompt_logprobs)
            state_rows = 0 if scores_only else len(state.row_keys)
            state_tokens = 0 if scores_only else sum(len(prompt) for prompt in state.prompts)
            # Reading prompt logprobs is a forward of its own, at admission: at
            # most max_prefill_tokens of it a step (the first always), so
            # scoring requests never stall the running streams for longer.
            count = state.request.sampling.prompt_logprobs
            scoring = (tuple(state.request.prompt_ids), count) if count is not None else None
            state_scored = len(scoring[0]) if scoring is not None and scoring not in scored else 0
            if state_scored and scored_tokens and scored_tokens + state_scored > self.max_prefill_tokens:
                break
            fits = (
                len(in_batch) + len(admitted) < self.settings.max_running_requests
                and rows + state_rows <= self.settings.max_batch_rows
                and (token_budget is None or prefill_tokens + state_tokens <= token_budget)
                and (scores_only or self._kv_fits([*in_batch, *admitted, state]))
            )
            # A request bigger than a budget still runs, alone.
            if not fits and (admitted or in_batch):
                break
            admitted.append(self.waiting.popleft())
            admitted[-1].admitted_at = time.perf_counter()
            rows += state_rows
            prefill_tokens += state_tokens
            scored_tokens += state_scored
            if scoring is not None:
                scored.add(scoring)
        return admitted

    def _kv_fits(self, batch: Sequence[RequestState]) -> bool:
        """Whether `batch` fits every runner's KV budget (`Runner.kv_token_budget`:
        rows x the widest row, a left-padded cache's size), each request
        reserving its longest prompt plus its max_tokens. Kept to at
        admission, so a batch of long answers cannot grow the worker past
        its memory (the kernel would kill it, with every request in flight)."""
        for name, runner in self.runners.items():
            if runner.kv_token_budget is None:
                continue
            rows, width = 0, 0
            for state in batch:
                held = sum(1 for runner_name, _ in state.row_locations if runner_name == name)
                if held and state.max_tokens:  # a request that only scores its prompt holds no rows
                    rows += held
                    width = max(width, state.prefill_length + state.max_tokens)
            if rows * width > runner.kv_token_budget:
                return False
        return True

    def _finish_aborted(self) -> list[StepOutput]:
        if not self._aborted:
            return []
        outputs = []
        for state in self._in_flight():
            if state.request_id in self._aborted:
                outputs.append(state.finish("abort"))
        self.waiting = deque(s for s in self.waiting if s.finish_reason is None)
        self._aborted.clear()
        return outputs

    def _fail_all(self, message: str) -> list[StepOutput]:
        """Fails the requests with rows in the runners (running, and those
        whose prompts are being written): their KV caches are dropped."""
        in_batch = [*self.prefilling, *self.running]
        outputs = [state.finish("error", error=message) for state in in_batch if state.finish_reason is None]
        for runner in self.runners.values():
            runner.remove(list(runner.row_index()))
        return outputs

    def _release_finished(self) -> None:
        finished = [state for state in (*self.prefilling, *self.running) if state.finish_reason is not None]
        if not finished:
            return
        self._retain_rows([state for state in finished if state.finish_reason != "error"])
        keys = {key for state in finished for key in state.row_keys}
        for runner in self.runners.values():
            runner.remove(keys)
        self.prefilling = [state for state in self.prefilling if state.finish_reason is None]
        self.running = [state for state in self.running if state.finish_reason is None]

    def _retain_rows(self, states: list[RequestState]) -> None:
        """Offers the leaving rows' KV to their runners' prefix caches, each
        with its tokens (its prompt, then the answer every row of a request
        was fed). A request that failed keeps nothing: its cache may be the
        fault. The cache only saves time: a failure to keep is logged, and
        the rows leave as they would without it."""
        offered: dict[str, dict] = {}
        for state in states:
            for (runner, key), prompt in zip(state.row_locations, state.prompts, strict=True):
                offered.setdefault(runner, {})[key] = [*prompt, *state.generated]
        for name, rows in offered.items():
            try:
                self.runners[name].retain(rows)
            except Exception:  # noqa: BLE001 - an optimisation must not fail the step
                logger.exception("keeping %d rows in the prefix cache failed", len(rows))

    # ---- validation ---------------------------------------------------
    def _reward_source(self, name: str) -> RewardSource:
        if name not in self.reward_sources:
            raise UnknownRewardModelError(name, list(self.reward_sources))
        return self.reward_sources[name]

    def _check_prompt_chars(self, chat: ChatRequest) -> None:
        """Refuses, before tokenizing, a chat that cannot fit: a token covers
        at most `max_token_chars` characters, so the longest context (the
        messages plus one preference) has at least chars / max_token_chars
        tokens. Counting characters costs nothing; tokenizing 20 MB does.
        Preferences count only where their reward prompts run."""
        messages = sum(len(v) for m in chat.messages for v in m.values() if isinstance(v, str))
        preferences = chat.preferences if self._runs_rewards(chat.sampling, chat.guidance) else ()
        longest_chars = messages + max((len(p.text) for p in preferences), default=0)
        at_least = -(-longest_chars // self.max_token_chars)
        if at_least >= self.context_length:
            raise ContextLengthExceededError(
                f"the prompt has {longest_chars} characters, at least {at_least} tokens; "
                f"the model's context length is {self.context_length}"
            )
        max_tokens = chat.sampling.max_tokens
        if max_tokens is not None and at_least + max_tokens > self.context_length:
            raise ContextLengthExceededError(
                f"this model's context length is {self.context_length} tokens; the prompt has at least "
                f"{at_least} and max_tokens asks for {max_tokens}",
                param="max_tokens",
            )

    def _new_state(self, request: GenerationRequest) -> RequestState:
        """Validates a request and resolves its defaults."""
        request.verify(self.limits)
        if request.priority and self.settings.scheduling_policy != "priority":
            raise InvalidRequestError("priority needs the priority scheduling policy (PAD_SCHEDULING_POLICY="
                                      "priority); this server admits requests first come, first served",
                                      param="priority")
        sampling, guidance = request.sampling, request.guidance
        if sampling.bad_words and not request.bad_words_ids:  # a GenerationRequest made without prepare_chat
            request.bad_words_ids = bad_words_ids(self.tokenizer, sampling.bad_words)
        live = {s.request_id for s in self._in_flight()}
        if request.request_id in live:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        if not request.prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        # An id outside the vocabulary would fail the forward pass shared by every running request.
        vocab_size = self.runners[BASE_RUNNER].vocab_size
        reward_ids = [p.prompt_ids for p in request.reward_prompts]
        if not all(reward_ids):
            raise InvalidRequestError("a reward prompt is empty", param="reward_prompts")
        for name, prompts in (("prompt_ids", [request.prompt_ids]), ("reward_prompts", reward_ids)):
            if any(type(token) is not int or not 0 <= token < vocab_size for ids in prompts for token in ids):
                raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab_size})", param=name)
        weight = self._guidance_weight(guidance)
        top_k = self.settings.default_top_k if guidance.top_k is None else guidance.top_k
        min_p = self.settings.default_min_p if guidance.min_p is None else guidance.min_p
        source = self._reward_source(guidance.reward_model)
        scores_only = sampling.max_tokens == 0  # reads the prompt's logprobs: no rows, no room for an answer
        rewards_run = self._runs_rewards(sampling, guidance) and bool(request.reward_prompts)
        longest_prompt = max([len(request.prompt_ids),
                              *((len(p.prompt_ids) for p in request.reward_prompts) if rewards_run else ())])
        which = "tokens (the longest with a preference)" if rewards_run else "tokens"
        room = self.context_length - longest_prompt
        if room < (0 if scores_only else 1):
            raise ContextLengthExceededError(
                f"the prompt has {longest_prompt} {which}, the model's context length is {self.context_length}"
            )
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise ContextLengthExceededError(
                f"this model's context length is {self.context_length} tokens; the prompt has {longest_prompt} "
                f"{which} and max_tokens asks for {sampling.max_tokens}",
                param="max_tokens",
            )
        grammar = self.structured.start(request.structured) if request.structured is not None else None
        if weight == 0:  # plain decoding: no reward rows at all
            request = dataclasses.replace(request, reward_prompts=[])
        seed = sampling.seed if sampling.seed is not None else self._seed_source.getrandbits(63)
        generator = None
        if sampling.temperature >= TEMPERATURE_FLOOR:  # below: greedy (sampling.choose_tokens)
            generator = torch.Generator(device=self.runners[BASE_RUNNER].device).manual_seed(seed)
        return RequestState(
            request=request,
            max_tokens=sampling.max_tokens if sampling.max_tokens is not None else self._default_max_tokens(room),
            guidance_weight=weight,
            top_k=top_k,
            min_p=min_p,
            reward_rows=[
                RewardRowRef(source.runner, (request.request_id, index + 1), prompt.weight)
                for index, prompt in enumerate(request.reward_prompts)
            ],
            stop_token_ids=self.stop_token_ids | frozenset(sampling.stop_token_ids),
            eos_token_ids=self.stop_token_ids,
            reward_adapter=source.adapter,
            detokenizer=IncrementalDetokenizer(self.tokenizer.backend_tokenizer, request.prompt_ids,
                                               request.sampling.skip_special_tokens),
            generator=generator,
            grammar=grammar,
        )


def reward_model_type(name: str, source: RewardSource) -> str:
    """How a reward model runs: "self" (the base model reads the preference),
    "lora" (an adapter on the base weights) or "model" (weights of its own)."""
    if source.adapter != NO_ADAPTER:
        return "lora"
    return "self" if source.runner == BASE_RUNNER else "model"


def prompt_spans(lengths: list[int], progress: int, advance: int) -> list[tuple[int, int]]:
    """The span [start, end) of each prompt written when a request's prefill
    advances from `progress` to `progress + advance` tokens. Prompts are
    right-aligned on the longest (a shorter one starts later), so all of a
    request's rows complete in the same step and choose its first token
    together."""
    longest = max(lengths)
    return [(max(0, progress - (longest - n)), max(0, min(n, progress + advance - (longest - n)))) for n in lengths]


def max_token_chars(tokenizer) -> int:
    """The most characters of text one token can stand for: the longest
    token string (a byte-level token's string has one character per byte,
    and a character is at least one byte). Bounds the prompt pre-check."""
    return max(1, max((len(token) for token in tokenizer.get_vocab()), default=1))


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def default_max_tokens(default: int, room: int) -> int:
    """max_tokens of a request that gives none (vLLM-like): the configured
    default, capped by the room left in the context; default 0: the room."""
    return min(default, room) if default > 0 else room


def blame_no_legal_token(tokens: list[int], raw_base: torch.Tensor, base: torch.Tensor,
                         token_mask: TokenMask | None) -> None:
    """In place: an INVALID_TOKEN whose row the model scored with finite
    logits, but whose request's own rules (allowed_token_ids, bad_words,
    min_tokens, its grammar) left no token, becomes NO_LEGAL_TOKEN: the
    client's doing, not the engine's (NaN or infinite logits, or a reward
    row's). raw_base [N, V] the model's logits, base [N, V] after the
    request's sampling controls."""
    masked = apply_token_mask(base, token_mask)
    for row, token in enumerate(tokens):
        # The model's scores are sound as the sampler judges them (`usable_rows`: a finite best, no NaN
        # nor +inf; its own -inf, a token it rules out, is fine), so what left no token was the rules.
        if token == INVALID_TOKEN and bool(usable_rows(raw_base[row:row + 1])) \
                and bool((masked[row] == float("-inf")).all()):
            tokens[row] = NO_LEGAL_TOKEN
