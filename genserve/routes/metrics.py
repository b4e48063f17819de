"""GET /metrics: Prometheus metrics of this server (genserve.metrics), in the text exposition format.

Once API keys exist it needs the ``metrics`` scope (``admin`` passes too): genserve.auth checks it before this runs.
``server.metrics_port`` serves the same registry without a key on a port of its own (genserve.app).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from genserve.metrics import Metrics

router = APIRouter()


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format; needs the 'metrics' scope once keys exist)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    # Off the event loop: a scrape takes the supervisor lock briefly and may wait on NVML.
    body, content_type = await run_in_threadpool(registry.render, request.headers.get("accept"))
    return Response(body, media_type=content_type)
