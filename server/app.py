"""create_app(settings): the FastAPI gateway. State lives on app.state,
set up and torn down by the lifespan: the worker client (and its local
worker process), the metrics registry, the key table, the preference store."""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from server.auth_scopes import KeyTable, bearer_token
from server.errors import APIError, error_response, install_error_handlers
from server.metrics import Metrics
from server.routes import chat, feedback, models, users
from server.settings import ServerSettings
from server.store.repository import Store
from server.worker_client import WorkerClient

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/metrics", "/docs", "/openapi.json", "/redoc"}


def create_app(settings: ServerSettings | None = None, start_worker: bool = True) -> FastAPI:
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = await Store.open(settings=settings)
        if start_worker:
            await app.state.worker.start()
        try:
            yield
        finally:
            await app.state.worker.stop()
            await app.state.store.close()

    app = FastAPI(title="PAD server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.key_table = KeyTable.from_settings(settings)
    app.state.worker = WorkerClient(settings, app.state.metrics)
    app.state.started = int(time.time())

    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        table: KeyTable = request.app.state.key_table
        if not table.enabled or request.url.path in OPEN_PATHS or request.method == "OPTIONS":
            request.state.key_scope = None
            return await call_next(request)
        token = bearer_token(request.headers.get("authorization")) or request.headers.get("api-key")
        scope = table.authenticate(token)
        if scope is None:
            message = "Incorrect API key provided." if token else "You didn't provide an API key."
            return error_response(APIError(401, message, "invalid_request_error", None, "invalid_api_key"))
        request.state.key_scope = scope
        return await call_next(request)

    for router in (chat.router, models.router, users.router, feedback.router):
        app.include_router(router)
    return app
