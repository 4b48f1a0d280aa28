"""GET /v1/models, GET /health, GET /metrics, POST /v1/reward_models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from server.auth_scopes import check_admin
from server.errors import APIError, unavailable
from server.store.http import request_scope
from server.worker_client import RequestRejected, WorkerUnavailable

router = APIRouter(tags=["models"])


@router.get("/health")
async def health(request: Request):
    client = request.app.state.worker
    if client.ready:
        return {"status": "ok", "model": client.model_info.get("served_model_name")}
    return JSONResponse({"status": client.state, "reason": client.down_reason}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request):
    client, settings = request.app.state.worker, request.app.state.settings
    info = client.model_info
    name = info.get("served_model_name") or settings.resolved_served_name()
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": request.app.state.started,
                "owned_by": "pad-server",
                "context_length": info.get("context_length"),
                "reward_models": info.get("reward_models", ["self"]),
            }
        ],
    }


class LoadRewardModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1)


@router.post("/v1/reward_models")
async def load_reward_model(body: LoadRewardModel, request: Request):
    """Loads a LoRA reward adapter into the running worker (admin key only)."""
    check_admin(request_scope(request))
    client = request.app.state.worker
    if body.name in client.model_info.get("reward_models", []):
        raise APIError(400, f"a reward model named {body.name!r} is already loaded", param="name", code="already_loaded")
    try:
        info = await client.load_adapter(body.name, body.path)
    except RequestRejected as exc:
        raise APIError(400, exc.error["message"], param="path", code="invalid_adapter") from None
    except WorkerUnavailable as exc:
        raise unavailable(str(exc)) from None
    return {"object": "reward_model", "id": body.name, "reward_models": info.get("reward_models", [])}
