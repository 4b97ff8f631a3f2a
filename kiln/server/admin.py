"""Adapter management over HTTP: vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`,
and SageMaker's `/adapters` routes. Loading reads and validates the files off the event loop,
so traffic keeps flowing while an adapter loads."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from ..runtime.engine import AsyncEngine
from ..runtime.lora import Adapter, AdapterError, AdapterNotFoundError
from .openai import APIError, _engine

router = APIRouter()


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)


class SageMakerAdapterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    src: str = Field(min_length=1, max_length=4096)


def adapter_card(adapter: Adapter) -> dict[str, Any]:
    return {"name": adapter.name, "path": str(adapter.path), "rank": adapter.rank,
            "alpha": adapter.alpha, "target_modules": list(adapter.targets),
            "resident": adapter.weights is not None, "in_use": adapter.in_use}


async def load(engine: AsyncEngine, name: str, path: str) -> Adapter:
    try:
        return await asyncio.to_thread(engine.load_adapter, name, path)
    except AdapterError as exc:
        raise APIError(400, str(exc), param="lora_path") from None


def unload(engine: AsyncEngine, name: str) -> None:
    try:
        engine.unload_adapter(name)
    except AdapterNotFoundError as exc:
        raise APIError(404, str(exc), "not_found_error", "lora_name") from None


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, http: HttpRequest) -> str:
    await load(_engine(http), body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, http: HttpRequest) -> str:
    unload(_engine(http), body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


@router.get("/adapters")
async def list_adapters(http: HttpRequest) -> list[dict[str, Any]]:
    return [adapter_card(a) for a in _engine(http).list_adapters()]


@router.post("/adapters")
async def register_adapter(body: SageMakerAdapterRequest, http: HttpRequest) -> dict[str, Any]:
    adapter = await load(_engine(http), body.name, body.src)
    return {"status": "loaded", **adapter_card(adapter)}


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, http: HttpRequest) -> dict[str, Any]:
    unload(_engine(http), name)
    return {"status": "unloaded", "name": name}
