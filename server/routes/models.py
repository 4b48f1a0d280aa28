"""GET /v1/models, GET /v1/models/{model}, GET /health, GET /version, GET /metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import key_scope
from server.errors import RETRY_AFTER_S
from server.generation import model_not_found, served_names
from server.openai_models import ModelCard, ModelList
from server.openapi import RETRY_AFTER_HEADER, errors
from server.request_body import JSONRoute

# Probes: no API key, so a load balancer or Prometheus needs none.
probes = APIRouter(tags=["probes"])
router = APIRouter(tags=["models"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

HEALTH = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "model": {"type": ["string", "null"]},
                   "reason": {"type": "string"}},
    "required": ["status"],
}


PING_RESPONSES = {200: {"description": "the worker is ready", "content": {"application/json": {"schema": HEALTH}}},
                  503: {"description": "the worker is loading or down", "headers": RETRY_AFTER_HEADER,
                        "content": {"application/json": {"schema": HEALTH}}}}


@probes.get("/ping", responses=PING_RESPONSES)
@probes.post("/ping", responses=PING_RESPONSES)
async def ping(request: Request):
    """SageMaker's health probe (vLLM serves it too): /health's answer."""
    return await health(request)


@probes.get(
    "/health",
    responses={200: {"description": "the worker is ready", "content": {"application/json": {"schema": HEALTH}}},
               503: {"description": "the worker is loading or down", "headers": RETRY_AFTER_HEADER,
                     "content": {"application/json": {"schema": HEALTH}}}},
)
async def health(request: Request):
    client = request.app.state.worker
    if client.ready:
        return {"status": "ok", "model": client.model_info.get("served_model_name")}
    return JSONResponse({"status": client.state, "reason": client.down_reason}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S[503])})


@probes.get("/version", responses={200: {"description": "the server's version (vLLM's probe)"}})
async def version(request: Request) -> dict:
    return {"version": request.app.version}


@probes.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def model_card(request: Request, name: str) -> dict:
    """The card of the model under one of its served names."""
    info = request.app.state.worker.model_info
    return {
        "id": name,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "pad-server",
        "context_length": info.get("context_length"),
        "max_model_len": info.get("context_length"),  # vLLM's name for it (clients size their prompts by it)
        "root": served_names(request.app.state)[0],
        "parent": None,
        "reward_models": info.get("reward_models", ["self"]),
        # Anthropic's model object too (its SDK's client.models), beside OpenAI's fields
        "type": "model",
        "display_name": name,
        "created_at": datetime.fromtimestamp(request.app.state.started, UTC).isoformat(),
        "lifecycle": "active",
    }


@router.get("/v1/models", response_model=ModelList, responses=errors(401))
async def list_models(request: Request):
    cards = [model_card(request, name) for name in served_names(request.app.state)]
    # OpenAI's list, and Anthropic's page (has_more, first_id, last_id)
    return {"object": "list", "data": cards, "has_more": False, "first_id": cards[0]["id"], "last_id": cards[-1]["id"]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(401, 404))
async def retrieve_model(model_id: str, request: Request):
    """The served model under one of its names (`client.models.retrieve`); any other id is a 404."""
    names = served_names(request.app.state)
    if model_id not in names:
        raise model_not_found(model_id, names)
    return model_card(request, model_id)
