"""All settings of `pad serve`: one pydantic-settings class (PAD_* variables;
the CLI flags fill the same fields). Built once, kept on app.state."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from pad_core.settings import EngineSettings
from server.store.config import StoreSettings


def _split_commas(value):
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _as_list(value):
    # Key specs keep their commas (`KEY:alice,bob`): KeyTable splits them.
    return [value] if isinstance(value, str) and value.strip() else ([] if isinstance(value, str) else value)


class ServerSettings(EngineSettings, StoreSettings):
    model_config = SettingsConfigDict(env_prefix="PAD_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "PAD_API_KEY", "PAD_API_KEYS"),
        description="accepted API keys, `KEY` or `KEY:user1,user2` (none: no auth)",
    )
    api_keys_file: str | None = Field(None, description="a file of key specs, one a line")
    ssl_certfile: str | None = Field(None, description="serve HTTPS with this certificate (PEM; with ssl_keyfile)")
    ssl_keyfile: str | None = Field(None, description="the certificate's private key (PEM)")
    root_path: str = Field(
        "", description="the path prefix a reverse proxy serves this server under (and strips), e.g. /pad: the "
        "OpenAPI docs then name their routes under it",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="allowed CORS origins")
    max_queue: int = Field(256, ge=1, description="requests in flight before 429")
    max_request_bytes: int = Field(
        2 * 1024 * 1024, ge=1024,
        description="largest request body; a larger one is refused (413) before it is read",
    )
    max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1024,
        description="largest file POST /v1/files takes (a batch's input), and largest Message Batch POST "
        "/v1/messages/batches takes; a larger one is refused (413)",
    )
    batch_concurrency: int = Field(
        16, ge=1, le=1024, description="requests of one batch (POST /v1/batches) in flight at once")
    worker_address: str | None = Field(
        None, description="attach to a running worker (tcp://host:port) instead of spawning one"
    )
    worker_start_timeout: float = Field(600.0, gt=0, description="seconds to wait for a worker to load")
    shutdown_timeout_s: float = Field(
        15.0, gt=0, allow_inf_nan=False,
        description="on SIGTERM / Ctrl+C, seconds to let open requests finish; then they are cut and the "
        "shutdown's clean-up runs (background responses marked failed, batches' results stored). Below the "
        "orchestrator's grace period (Kubernetes 30 s, the compose files 20 s), which ends in SIGKILL",
    )
    worker_heartbeat_timeout: float = Field(
        60.0, gt=0, description="seconds of silence before an attached (remote) worker counts as down, and a "
        "spawned one as hung (it is killed and restarted)"
    )
    conversation_turn_lease_s: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="seconds a gateway holds a conversation's turn (one response at a time in it) without "
        "renewing it; renewed every third of it while the answer is written, so a gateway that died frees "
        "its conversations after this long",
    )
    background_lease_s: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="seconds a gateway holds a background response's or a batch's run without renewing it; "
        "renewed every third of it, so a response whose gateway died reads as failed after this long, a batch "
        "whose gateway died is resumed by another after this long, and a cancel asked through another "
        "gateway takes effect within a third of it",
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    @model_validator(mode="after")
    def _ssl_pair(self) -> ServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both, or neither")
        return self

    _keys_as_list = field_validator("api_keys", mode="before")(_as_list)
    _split_origins = field_validator("cors_origins", mode="before")(_split_commas)


def worker_environment(settings: EngineSettings) -> dict[str, str]:
    """The engine settings as PAD_* variables, for a spawned worker process."""
    env = {}
    for name in EngineSettings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps({k: str(v) for k, v in value.items()})
        elif isinstance(value, list | tuple):  # pydantic-settings reads a list as JSON
            value = json.dumps([str(v) for v in value])
        env[f"PAD_{name.upper()}"] = str(value)
    return env
