"""PAD engine: personalized reward-guided decoding with continuous batching.

Knows nothing about HTTP: token ids and chat messages in, per-step token
outputs out.
"""

from pad_core.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    UnknownRewardModelError,
)
from pad_core.types import (
    ChatRequest,
    FinishReason,
    GenerationRequest,
    GuidanceParams,
    Preference,
    RewardPrompt,
    SamplingParams,
    StepOutput,
    StructuredOutput,
    TokenLogprob,
    ToolCall,
    ToolFunction,
)

__all__ = [
    "ChatRequest",
    "ContextLengthExceededError",
    "EngineError",
    "FinishReason",
    "GenerationRequest",
    "GuidanceParams",
    "InvalidRequestError",
    "Preference",
    "RewardPrompt",
    "SamplingParams",
    "StepOutput",
    "StructuredOutput",
    "TokenLogprob",
    "ToolCall",
    "ToolFunction",
    "UnknownRewardModelError",
]
