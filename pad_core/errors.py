"""Engine errors. Each names the offending parameter so a gateway can map it
to an OpenAI-shaped 400 without parsing messages."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses; the engine keeps serving the others."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class UnknownRewardModelError(InvalidRequestError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(
            f"unknown reward model {name!r}; available: {', '.join(sorted(available))}",
            param="pad.reward_model",
            code="model_not_found",
        )


class ModelLoadError(EngineError):
    """A model, adapter or reward model that cannot be served (bad path,
    mismatched tokenizer...). Raised at start-up, never per request."""
