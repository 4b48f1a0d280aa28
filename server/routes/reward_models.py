"""The reward models a request may name in `pad.reward_model`: list and
read them (any key), load a LoRA reward adapter into the running worker and
unload one (admin key), as vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter do for its generation adapters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.auth import Scope, key_scope
from server.auth_scopes import check_admin
from server.errors import APIError, unavailable
from server.generation import map_exception
from server.openai_models import RewardModelCard, RewardModelDeleted, RewardModelList, RewardModelLoaded
from server.openapi import errors
from server.request_body import JSONRoute
from server.worker_client import RequestRejected, WorkerUnavailable

router = APIRouter(tags=["reward models"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class LoadRewardModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    path: str = Field(min_length=1)


def reward_model_cards(request: Request) -> list[dict]:
    info = request.app.state.worker.model_info
    types = info.get("reward_model_types", {})
    return [{"object": "reward_model", "id": name, "type": types.get(name, "self" if name == "self" else "lora")}
            for name in info.get("reward_models", ["self"])]


def reward_model_not_found(name: str, request: Request) -> APIError:
    names = request.app.state.worker.model_info.get("reward_models", ["self"])
    return APIError(404, f"reward model {name!r} is not loaded; loaded: {', '.join(names)}",
                    param="name", code="model_not_found")


def ready_worker(request: Request):
    client = request.app.state.worker
    if not client.ready:
        raise unavailable(client.down_reason)
    return client


@router.get("/v1/reward_models", response_model=RewardModelList, responses=errors(401, 503))
async def list_reward_models(request: Request):
    ready_worker(request)
    return {"object": "list", "data": reward_model_cards(request)}


@router.get("/v1/reward_models/{name}", response_model=RewardModelCard, responses=errors(401, 404, 503))
async def retrieve_reward_model(name: str, request: Request):
    ready_worker(request)
    card = next((card for card in reward_model_cards(request) if card["id"] == name), None)
    if card is None:
        raise reward_model_not_found(name, request)
    return card


@router.post("/v1/reward_models", response_model=RewardModelLoaded, responses=errors(400, 401, 403, 413, 503))
async def load_reward_model(body: LoadRewardModel, request: Request, scope: Scope):
    """Loads a LoRA reward adapter into the running worker (admin key only)."""
    check_admin(scope)
    client = ready_worker(request)
    if body.name in client.model_info.get("reward_models", []):
        raise APIError(400, f"a reward model named {body.name!r} is already loaded", param="name", code="already_loaded")
    try:
        info = await client.load_adapter(body.name, body.path)
    except (RequestRejected, WorkerUnavailable) as exc:
        raise map_exception(exc) from None
    return {"object": "reward_model", "id": body.name, "reward_models": info.get("reward_models", [])}


@router.delete("/v1/reward_models/{name}", response_model=RewardModelDeleted,
               responses=errors(400, 401, 403, 404, 503))
async def unload_reward_model(name: str, request: Request, scope: Scope):
    """Unloads a LoRA reward adapter (admin key only). Requests naming it
    are refused from now on; those already running finish with it, and its
    memory is freed when they end (`in_use` says how many)."""
    check_admin(scope)
    client = ready_worker(request)
    if name not in client.model_info.get("reward_models", []):
        raise reward_model_not_found(name, request)
    try:
        reply = await client.unload_adapter(name)
    except (RequestRejected, WorkerUnavailable) as exc:
        if isinstance(exc, RequestRejected) and exc.error.get("code") == "model_not_found":
            raise reward_model_not_found(name, request) from None  # another gateway of the worker unloaded it first
        raise map_exception(exc) from None
    return {"object": "reward_model.deleted", "id": name, "deleted": True, "in_use": reply["in_use"],
            "reward_models": reply["info"].get("reward_models", [])}
