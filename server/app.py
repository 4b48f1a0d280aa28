"""create_app(settings): the FastAPI gateway. State lives on app.state,
set up and torn down by the lifespan: the worker client (and its local
worker process), the metrics registry, the key table, the preference store.

Every request passes the body limit (413) first; the routers then check
the API key (server/auth.py, a dependency) and parse JSON bodies strictly
(server/request_body.py); one set of handlers shapes every error."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.anthropic_errors import AnthropicErrorsMiddleware
from server.auth_scopes import KeyTable
from server.errors import install_error_handlers
from server.generation import served_names
from server.metrics import Metrics
from server.openapi import install_openapi
from server.request_body import BodyLimitMiddleware
from server.background import BackgroundResponses
from server.batches import BatchRuns
from server.request_id import RequestIdMiddleware
from server.routes import (
    batches,
    chat,
    completions,
    conversations,
    feedback,
    files,
    input_tokens,
    message_batches,
    messages,
    models,
    responses,
    reward_models,
    stored_completions,
    stored_responses,
    tokenize,
    users,
)
from server.invocations import InvocationsMiddleware
from server.settings import ServerSettings
from server.store.repository import Store
from server.worker_client import WorkerClient

logger = logging.getLogger(__name__)


def package_version() -> str:
    """The installed pad-server's version (pyproject.toml's)."""
    try:
        return importlib.metadata.version("pad-server")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0+unknown"


def create_app(settings: ServerSettings | None = None, start_worker: bool = True) -> FastAPI:
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = await Store.open(settings=settings)
        app.state.conversation_turns = conversations.ConversationTurns(
            app.state.store, settings.conversation_turn_lease_s)
        app.state.background_responses = BackgroundResponses(app.state.store, settings.background_lease_s)
        app.state.batches = BatchRuns(app, app.state.store, settings)
        if start_worker:
            await app.state.worker.start()
        app.state.batches.start_looking()  # resumes the batches of gateways that stopped or died
        try:
            yield
        finally:
            await app.state.background_responses.close()  # failed, while the store is open
            await app.state.batches.close()
            await app.state.worker.stop()
            await app.state.conversation_turns.close()
            await app.state.store.close()

    app = FastAPI(title="PAD server", version=package_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics(lambda: served_names(app.state)[0])
    app.state.key_table = KeyTable.from_settings(settings)
    app.state.worker = WorkerClient(settings, app.state.metrics)
    app.state.started = int(time.time())

    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    # SageMaker's /invocations: a body's endpoint, chosen once the body is whole and bounded (inside the limit).
    app.add_middleware(InvocationsMiddleware)
    # An oversized body is refused before anything reads it.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, upload_limit=settings.max_file_bytes)
    # The Anthropic routes' errors in Anthropic's shape, the body limit's 413 included.
    app.add_middleware(AnthropicErrorsMiddleware)
    # Outermost (added last): every answer, a 413 included, carries its x-request-id.
    app.add_middleware(RequestIdMiddleware)

    for router in (chat.router, stored_completions.router, completions.router, responses.router,
                   input_tokens.router, stored_responses.router, files.router, batches.router,
                   conversations.router, models.router, models.probes, reward_models.router, users.router, feedback.router,
                   tokenize.router, messages.router, message_batches.router):
        app.include_router(router)
    install_openapi(app, max_top_k=settings.max_top_k)
    return app
