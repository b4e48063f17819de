"""A worker node's own HTTP routes (cluster.role worker): its health, nothing that takes jobs — those come from the
cluster queue. /ready is what an orchestrator checks: a worker loaded and Redis reachable."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from genserve import __version__
from genserve.cluster.redis_queue import QueueUnavailable
from genserve.service import NodeService

router = APIRouter(tags=["worker node"])


def _service(request: Request) -> NodeService:
    service: NodeService = request.app.state.service
    return service


@router.get("/health", summary="Liveness: the node's process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/status", summary="This node's pool, and the jobs it holds")
async def status(request: Request) -> dict[str, Any]:
    service = _service(request)
    body = service.node.supervisor.status()
    body["version"] = __version__
    body["node"] = {"node_id": service.node.node_id, "role": "worker", "held_jobs": service.node.held()}
    return body


@router.get("/ready", summary="Readiness: 200 once a worker is loaded and Redis answers, else 503")
async def ready(request: Request) -> JSONResponse:
    service = _service(request)
    pool = service.node.supervisor.status()
    ready_workers = sum(worker["state"] in ("ready", "busy") for worker in pool["workers"])
    body: dict[str, Any] = {"node_id": service.node.node_id, "ready_workers": ready_workers, "status": pool["status"]}
    try:
        await run_in_threadpool(service.cluster.queue.ping)
        body["redis"] = "ok"
    except QueueUnavailable as error:
        body["redis"] = error.message
    body["ready"] = ready_workers > 0 and body["redis"] == "ok" and pool["status"] != "stopping"
    if not body["ready"]:
        body["reason"] = body["redis"] if body["redis"] != "ok" else service.node.supervisor.not_ready_reason()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
