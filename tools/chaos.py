#!/usr/bin/env python3
"""Chaos test of a running GenServe: a mixed load while a random worker is kill -9'ed every few seconds.

Client side (HTTP only), except for the kills: those need the server on this machine, as the same user.

The load: ``--jobs`` generations, at most ``--concurrency`` in flight, drawn with seeded randomness (``--seed``):

- every mode (text2img; img2img with an input image; fill with an input image and a mask; controlnet with a
  control image, sometimes with an input image too), the images drawn in memory with Pillow at ``--size``;
- four routes: ``generate-json`` (POST /generate, images as base64), ``generate-form`` (POST /generate/img2img,
  images as multipart files), ``jobs-json`` (POST /jobs) and ``jobs-form`` (POST /jobs/form); an async job is
  polled with GET /jobs/{id} until it ends;
- priorities from -K to K (``--priority-spread``);
- cancels: ``--cancel-fraction`` of the async jobs get POST /jobs/{id}/cancel after a random delay of up to
  ``--cancel-delay`` seconds (a cancel that arrives after the job ended answers 409, and the job counts as
  whatever it ended as).

The killer: a thread polls GET /status every 50 ms. The first kill comes as soon as a worker is seen busy (so jobs
are running when it lands; at the latest ``--kill-every`` seconds after the start), then one every ``--kill-every``
seconds while the load runs. Each kill picks a random worker whose state is ready or busy, whose pid is set and
whose slot is not still recovering from an earlier kill, and sends it SIGKILL, but only after checking that the
URL is local and that the pid is a child of the process listening on the URL's port. Its recovery time is
measured from the kill until /status shows the slot ready (or already busy) again with a new pid. Every kill
spends one of the slot's respawns (``workers.max_restarts`` per ``workers.restart_window_s`` on the server):
keep ``--jobs`` and ``--kill-every`` such that a run does not spend a slot's whole budget.

Accounting, once the load is done. Every job ends as exactly one of:

- completed, failed (with the reason: the sync response's ``error_type`` or the job's ``error.type``) or
  canceled;
- refused: answered 429 or 503 at submission (no job was created); counted apart, with its reason;
- lost: a sync request got no HTTP answer (connection error, timeout) and no job with its prompt (each prompt
  carries a unique tag) is found in GET /jobs afterwards; or an async job did not reach a terminal state within
  ``--job-timeout``; or a sync response's ``task_id`` is not found by GET /jobs/{id} afterwards.

Cross-check: for every sync response with a ``task_id``, GET /jobs/{task_id} must agree with what the response
said (completed / failed with the same error type / canceled). A disagreement is reported as a mismatch.

A job running on a worker that is killed is re-queued once; if it is running on a second worker that dies it fails
with ``worker_died``. That is an accounted failure, not a loss: with frequent kills expect some.

At the end the tool waits (up to ``--recovery-timeout``) until the pool is back to full strength: every worker
ready and ``alive_processes`` equal to the number of workers (a slot that spent its restart budget retries more
slowly, so the wait may be longer). It prints summary tables and,
as its last line:

    jobs sent N, completed C, failed F (reason: count, ...), canceled X, refused R, lost L, restarts K,
    longest recovery S.SSs

(one line; "restarts" is the growth of ``concurrent_manager.total_restarts`` during the run.)

Cluster mode (``--cluster``): instead of a server at ``--url``, the tool starts a cluster of its own
(tools/_cluster.py): a ``redis-server`` on a free loopback port (Debian's package; the tool says how to install it
when it is missing), one API node (``cluster.role: api``) and ``--nodes`` worker nodes (``cluster.role: worker``,
``--node-workers`` CPU workers each, the embedded test model from ``--embedded-cache``, the modes of ``--modes``),
all ``python -m genserve`` processes on this machine sharing one results folder, with ``cluster.lease_s`` =
``--lease``. The load goes to the API node. With ``--kill-nodes`` the killer kills whole worker nodes instead of
workers: every ``--kill-every`` seconds (the first as soon as a worker is seen busy) it picks a random node that
is up (listed by the API node with all its workers ready or busy, and not still recovering from an earlier kill),
sends SIGKILL to its process group (the node's API process, forkserver and workers: a crashed machine or
container) and starts it again at once with the same config, port and node id, as an orchestrator would. A node's
recovery time runs from the kill until the API node's /status lists it again with every worker ready (or busy)
under a new pid. The jobs a killed node held come back through their leases (``--lease`` seconds): re-queued
once, failed with ``worker_died`` when their second node dies too. The accounting is the same as above; "restarts"
in the last line counts the node restarts, and "longest recovery" is a node's. At the end the tool waits until the
API node lists every node with all its workers ready, then stops the cluster (also on Ctrl-C or SIGTERM) and
removes its folder (``--cluster-dir`` keeps the nodes' logs and config there instead). ``--cluster`` without
``--kill-nodes`` needs ``--kill-every 0`` (the load alone): this tool kills single workers only of a one-machine
server, whose workers are children of the process at ``--url``.

Exit status: 0 when no job was lost, every sync response agreed with its job record and the pool is back to full
strength; 1 otherwise; 2 for a usage error, an unreachable or not-ready server, a cluster that does not start, or
kills asked of a server this tool cannot safely kill workers of (not local, or its listening process cannot be
seen).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests
from PIL import Image, ImageDraw
from rich.markup import escape
from rich.table import Table

from _cli import DEFAULT_URL, ToolError, add_connection_arguments, console, fail, make_session, request_json
from _cluster import Cluster, Node, own_cluster
from _procs import api_process_of, listens_on
from _server import ServerError, add_embedded_cache_argument

MODES = ("text2img", "img2img", "fill", "controlnet")
ROUTES = ("generate-json", "generate-form", "jobs-json", "jobs-form")
SYNC_ROUTES = ("generate-json", "generate-form")
ROUTE_PATHS = {
    "generate-json": "/generate",
    "generate-form": "/generate/img2img",
    "jobs-json": "/jobs",
    "jobs-form": "/jobs/form",
}
OUTCOMES = ("completed", "failed", "canceled", "refused", "lost")
TERMINAL = ("completed", "failed", "canceled")
REFUSAL_STATUSES = (429, 503)
CONTROL_TYPES = ("canny", "depth", "tile")
SUBJECTS = (
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "a glass house in a pine forest",
    "a bowl of lemons on a blue table",
    "a sailing boat in a storm",
    "a neon street at night in the rain",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE_MULTIPLE, MIN_SIZE, MAX_SIZE = 16, 64, 2048
STATUS_INTERVAL_S = 0.05  # the killer's /status polling; also the granularity of the recovery times
LOOKUP_TIMEOUT_S = 10.0  # one GET /jobs/... or /status call
SETTLE_S = 10.0  # how long a sync job's record may take to show the state its response announced

EPILOG = """\
examples:
  %(prog)s --url http://127.0.0.1:12411 --jobs 200 --kill-every 5
  %(prog)s --jobs 24 --kill-every 3 --size 64 --steps 2          # a quick run on a CPU server
  %(prog)s --jobs 100 --kill-every 0                              # the same load, no kills (any server)
  %(prog)s --jobs 500 --concurrency 16 --cancel-fraction 0.2 --seed 7 --report chaos.jsonl
  %(prog)s --modes text2img,img2img --routes jobs-json,generate-form --size 512 --steps 8
  %(prog)s --cluster --kill-nodes --nodes 2 --jobs 40 --kill-every 20 --size 64 --steps 2   # a cluster of its own

exit status: 0 no job lost and the pool back to full strength; 1 otherwise; 2 usage error or server unreachable.
"""


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlan:
    index: int
    route: str
    mode: str
    priority: int
    seed: int
    prompt: str  # carries a unique tag, so a job can be found by its prompt in GET /jobs
    strength: float | None
    controlnet_type: str | None
    images: tuple[str, ...]  # which of input_image, mask_image, control_image it sends
    cancel_after_s: float | None  # async jobs only: cancel this long after submission

    @property
    def sync(self) -> bool:
        return self.route in SYNC_ROUTES


def make_plan(args: argparse.Namespace, modes: tuple[str, ...], run_id: str) -> list[JobPlan]:
    rng = random.Random(args.seed)
    plans = []
    for index in range(args.jobs):
        route = rng.choice(args.routes)
        mode = rng.choice(modes)
        images: tuple[str, ...] = ()
        strength = controlnet_type = None
        if mode == "img2img":
            images, strength = ("input_image",), round(rng.uniform(0.5, 0.95), 2)
        elif mode == "fill":
            images = ("input_image", "mask_image")
        elif mode == "controlnet":
            controlnet_type = rng.choice(CONTROL_TYPES)
            with_input = rng.random() < 0.5  # ControlNet img2img
            images = ("control_image", "input_image") if with_input else ("control_image",)
            strength = round(rng.uniform(0.5, 0.95), 2) if with_input else None
        cancel = route not in SYNC_ROUTES and rng.random() < args.cancel_fraction
        plans.append(
            JobPlan(
                index=index,
                route=route,
                mode=mode,
                priority=rng.randint(-args.priority_spread, args.priority_spread),
                seed=rng.randrange(2**31),
                prompt=f"{rng.choice(SUBJECTS)} [chaos {run_id} job {index}]",
                strength=strength,
                controlnet_type=controlnet_type,
                images=images,
                cancel_after_s=round(rng.uniform(0.0, args.cancel_delay), 3) if cancel else None,
            )
        )
    return plans


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_images(size: int, seed: int) -> dict[str, bytes]:
    """The three inputs, drawn at the output size: a picture, a fill mask (white = repaint), an edge map."""
    rng = random.Random(seed)
    picture = Image.new("RGB", (size, size), (40, 90, 160))
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = rng.randrange(x0, size + 1), rng.randrange(y0, size + 1)
        draw.rectangle((x0, y0, x1, y1), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    edges = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(edges)
    for _ in range(8):
        points = [(rng.randrange(size), rng.randrange(size)) for _ in range(2)]
        draw.line(points, fill=(255, 255, 255), width=max(1, size // 64))
    return {"input_image": png(picture), "mask_image": png(mask), "control_image": png(edges)}


# --- one job's fate ---------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    plan: JobPlan
    outcome: str = "lost"  # one of OUTCOMES, settled by the accounting
    reason: str | None = None  # failed / refused: the error type
    task_id: str | None = None
    http_status: int | None = None  # of the submission (sync: of the whole request)
    claim: str | None = None  # sync only: what the response said (completed | failed | canceled | refused)
    no_answer: str | None = None  # the submission got no HTTP answer: why
    cancel: str | None = None  # what the cancel request got: "200 canceled", "409 already ended", ...
    seconds: float | None = None  # submission to terminal state (client side)
    mismatch: str | None = None  # a sync response that its job record contradicts
    detail: str = ""  # how a lost job was lost, or how a no-answer job was found


def say(text: str) -> None:
    """One plain line on stdout: no markup (worker lists look like [tags]), never folded."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 160 else text[:157] + "..."


class Load:
    """Sends the jobs; each one is followed to its end in one of the pool's threads."""

    def __init__(self, args: argparse.Namespace, images: dict[str, bytes]) -> None:
        self.args = args
        self.base: str = args.url
        self.images = images
        self.images_b64 = {name: base64.b64encode(data).decode("ascii") for name, data in images.items()}
        self._local = threading.local()

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = make_session(self.args.api_key)
        return session

    def fields(self, plan: JobPlan) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "prompt": plan.prompt,
            "mode": plan.mode,
            "width": self.args.size,
            "height": self.args.size,
            "num_inference_steps": self.args.steps,
            "seed": plan.seed,
            "priority": plan.priority,
        }
        if plan.strength is not None:
            fields["strength"] = plan.strength
        if plan.controlnet_type is not None:
            fields["controlnet_type"] = plan.controlnet_type
        return fields

    def body(self, plan: JobPlan) -> dict[str, Any]:
        """requests keyword arguments: JSON with base64 images, or multipart with the images as files."""
        fields = self.fields(plan)
        if plan.route.endswith("-json"):
            return {"json": {**fields, **{name: self.images_b64[name] for name in plan.images}}}
        # Every part in files= (text ones with no filename), so even text2img goes as multipart/form-data.
        parts: dict[str, tuple[str | None, Any, str] | tuple[None, str]] = {
            name: (None, str(value)) for name, value in fields.items()
        }
        for name in plan.images:
            parts[name] = (f"{name}.png", self.images[name], "image/png")
        return {"files": parts}

    def run(self, plan: JobPlan) -> JobResult:
        result = JobResult(plan)
        session = self.session()
        began = time.monotonic()
        try:
            response = session.post(self.base + ROUTE_PATHS[plan.route], timeout=self.args.timeout, **self.body(plan))
        except requests.RequestException as exc:
            result.no_answer = short_error(exc)  # settled by the accounting: found by its prompt, or lost
            return result
        result.http_status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            result.claim = result.outcome = "failed"
            result.reason = f"http_{response.status_code}_not_json"
            return result
        if plan.sync:
            self._read_sync(result, response.status_code, body)
            result.seconds = time.monotonic() - began
            return result
        if response.status_code in REFUSAL_STATUSES:
            result.outcome, result.reason = "refused", str(body.get("error_type") or f"http_{response.status_code}")
            return result
        if response.status_code != 202 or not body.get("task_id"):
            result.outcome, result.reason = "failed", str(body.get("error_type") or f"http_{response.status_code}")
            return result
        result.task_id = str(body["task_id"])
        cancel_at = began + plan.cancel_after_s if plan.cancel_after_s is not None else None
        view, waited = follow_job(session, self.base, result, began + self.args.job_timeout, cancel_at)
        settle_from_view(result, view, waited)
        result.seconds = time.monotonic() - began
        return result

    def _read_sync(self, result: JobResult, status: int, body: dict[str, Any]) -> None:
        result.task_id = body.get("task_id") or None
        error_type = str(body.get("error_type") or f"http_{status}")
        if status == 200 and body.get("success") is True:
            result.claim = "completed"
            if not is_png(body.get("image_base64")):
                result.mismatch = "answered 200 success but image_base64 is not a PNG"
        elif status in REFUSAL_STATUSES:
            result.claim, result.reason = "refused", error_type
        elif error_type == "canceled":
            result.claim = "canceled"
        else:
            result.claim, result.reason = "failed", error_type


def is_png(image_base64: Any) -> bool:
    if not isinstance(image_base64, str):
        return False
    try:
        return base64.b64decode(image_base64[:24], validate=True)[:8] == PNG_MAGIC
    except (binascii.Error, ValueError):
        return False


def get_job(session: requests.Session, base: str, task_id: str) -> tuple[int, dict[str, Any] | None]:
    """GET /jobs/{id} → (status, view); (0, None) when the server gave no usable answer."""
    try:
        code, body = request_json(session, "GET", f"{base}/jobs/{task_id}", timeout=LOOKUP_TIMEOUT_S, expect_ok=False)
    except ToolError:
        return 0, None
    return code, body if isinstance(body, dict) else None


def follow_job(
    session: requests.Session,
    base: str,
    result: JobResult,
    deadline: float,
    cancel_at: float | None = None,
    interval: float = 0.1,
) -> tuple[dict[str, Any] | None, float]:
    """Poll GET /jobs/{id} until a terminal state or the deadline; send the planned cancel on the way.

    Returns (last view, seconds waited); the view is None when the job is not found (404 three times running).
    """
    assert result.task_id is not None
    began = time.monotonic()
    view: dict[str, Any] | None = None
    not_found = 0
    while True:
        now = time.monotonic()
        if cancel_at is not None and result.cancel is None and now >= cancel_at:
            result.cancel = cancel_job(session, base, result.task_id)
        code, body = get_job(session, base, result.task_id)
        if code == 200 and body is not None:
            view, not_found = body, 0
            if body.get("status") in TERMINAL:
                if cancel_at is not None and result.cancel is None:
                    view = cancel_after_end(session, base, result, view, cancel_at)
                return view, time.monotonic() - began
        elif code == 404:
            not_found += 1
            if not_found >= 3:
                return None, time.monotonic() - began
        if time.monotonic() >= deadline:
            return view or {"status": "unknown (no answer from GET /jobs/{id})"}, time.monotonic() - began
        pause = interval
        if cancel_at is not None and result.cancel is None:
            pause = max(0.0, min(pause, cancel_at - time.monotonic()))
        time.sleep(pause)


def cancel_after_end(
    session: requests.Session, base: str, result: JobResult, view: dict[str, Any], cancel_at: float
) -> dict[str, Any]:
    """The job ended before its planned cancel: send the cancel anyway (409 is due) and check nothing changed."""
    assert result.task_id is not None
    time.sleep(max(0.0, cancel_at - time.monotonic()))
    result.cancel = cancel_job(session, base, result.task_id)
    code, after = get_job(session, base, result.task_id)
    if code != 200 or after is None:
        result.mismatch = f"a cancel after the job ended ({result.cancel}), then GET /jobs/{{id}} answered {code}"
        return view
    if after.get("status") != view.get("status"):
        result.mismatch = (
            f"the job had ended {view.get('status')}, a later cancel ({result.cancel}) turned it {after.get('status')}"
        )
    return after


def cancel_job(session: requests.Session, base: str, task_id: str) -> str:
    try:
        code, body = request_json(
            session, "POST", f"{base}/jobs/{task_id}/cancel", timeout=LOOKUP_TIMEOUT_S + 20, expect_ok=False
        )
    except ToolError as exc:
        return f"no answer ({exc})"
    if code in (200, 202) and isinstance(body, dict):
        return f"{code} {body.get('status')}"
    if code == 409:
        return "409 already ended"
    return f"{code} {body.get('error_type') if isinstance(body, dict) else ''}".strip()


def settle_from_view(result: JobResult, view: dict[str, Any] | None, waited: float) -> None:
    """An async job (or a sync one found by its prompt): its outcome is the state GET /jobs/{id} reports."""
    if view is None:
        result.outcome = "lost"
        result.detail = f"GET /jobs/{result.task_id} answers 404"
        return
    status = view.get("status")
    if status in TERMINAL:
        result.outcome = str(status)
        if status == "failed":
            error = view.get("error") or {}
            result.reason = str(error.get("type") or "unknown")
        return
    result.outcome = "lost"
    result.detail = f"still {status} {waited:.0f} s later (--job-timeout)"


# --- accounting of sync jobs -----------------------------------------------------------------------------------


class Accountant:
    """Settles each sync job against the server's job records, after the load."""

    def __init__(self, args: argparse.Namespace, started_wall: float) -> None:
        self.args = args
        self.base: str = args.url
        self.session = make_session(args.api_key)
        self.started_wall = started_wall
        self._by_prompt: dict[str, str] | None = None

    def settle(self, result: JobResult) -> None:
        if result.no_answer is not None:
            self._settle_unanswered(result)
        elif result.plan.sync:
            self._cross_check(result)

    def _settle_unanswered(self, result: JobResult) -> None:
        what = f"{result.plan.route} got no HTTP answer ({result.no_answer})"
        task_id = self.find_by_prompt(result.plan.prompt)
        if task_id is None:
            result.outcome = "lost"
            result.detail = f"{what}, and no job with its prompt is in GET /jobs"
            return
        result.task_id = task_id
        view, waited = follow_job(self.session, self.base, result, time.monotonic() + self.args.job_timeout)
        settle_from_view(result, view, waited)
        found = f"found by its prompt as job {task_id}, {view.get('status') if view else 'then 404'}"
        result.detail = f"{what}; {found}" + (f" ({result.detail})" if result.detail else "")

    def _cross_check(self, result: JobResult) -> None:
        claim = result.claim or "failed"
        if result.task_id is None:  # refused or failed before a job existed (e.g. 400): nothing to look up
            result.outcome = claim
            return
        view, waited = follow_job(self.session, self.base, result, time.monotonic() + SETTLE_S)
        claimed = f"{claim}: {result.reason}" if result.reason else claim
        said = f"{result.plan.route} answered {result.http_status} ({claimed})"
        if view is None:
            if claim == "refused":
                result.outcome = "refused"  # refused at submission: the job was never kept
            else:
                result.outcome = "lost"
                result.detail = f"{said} with task_id {result.task_id}, but GET /jobs/{result.task_id} answers 404"
            return
        expected = "failed" if claim == "refused" else claim  # a 503 after acceptance: the job failed
        found, found_reason = view.get("status"), (view.get("error") or {}).get("type")
        result.outcome = expected
        if found != expected or (expected == "failed" and found_reason != result.reason):
            found_text = f"{found}{f': {found_reason}' if found_reason else ''}"
            if found not in TERMINAL:
                found_text += f" after {waited:.1f} s"
            result.mismatch = f"{said} but GET /jobs/{result.task_id} says {found_text}"

    def find_by_prompt(self, prompt: str) -> str | None:
        if self._by_prompt is None:
            self._by_prompt = self._index_recent_jobs()
        return self._by_prompt.get(prompt)

    def _index_recent_jobs(self, page: int = 500, max_pages: int = 40) -> dict[str, str]:
        """prompt → task_id of the jobs submitted since shortly before the run (GET /jobs is newest first)."""
        found: dict[str, str] = {}
        for number in range(max_pages):
            try:
                code, body = request_json(
                    self.session,
                    "GET",
                    f"{self.base}/jobs",
                    timeout=LOOKUP_TIMEOUT_S * 3,
                    expect_ok=False,
                    params={"limit": page, "offset": number * page},
                )
            except ToolError:
                break
            jobs = body.get("jobs") if code == 200 and isinstance(body, dict) else None
            if not jobs:
                break
            for job in jobs:
                prompt = (job.get("params") or {}).get("prompt")
                if isinstance(prompt, str) and job.get("task_id"):
                    found.setdefault(prompt, str(job["task_id"]))
            oldest = min(float(job.get("submitted_at") or 0) for job in jobs)
            if oldest < self.started_wall - 60:
                break
        return found


# --- the killer -------------------------------------------------------------------------------------------------


class KillGuard:
    """SIGKILL only a worker of the server under test: a local URL, and a child of the process on its port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if not is_local_host(host):
            raise ToolError(
                f"--kill-every needs the server on this machine, but {host!r} is not a local address "
                "(use --kill-every 0 to send the load without kills)"
            )
        self.server = listening_process(self.port)

    def check(self, pid: int) -> None:
        if not self.server.is_running() or listens_on(self.server, self.port) is False:
            raise ToolError(f"the server process {self.server.pid} no longer listens on port {self.port}")
        try:
            api_process = api_process_of(psutil.Process(pid))
        except psutil.NoSuchProcess:
            raise ToolError(f"pid {pid} does not exist (already gone, or not on this machine)") from None
        if api_process is None or api_process.pid != self.server.pid:
            owner = api_process.pid if api_process else None
            raise ToolError(
                f"pid {pid} is not a worker of the server process {self.server.pid} (it belongs to {owner})"
            )


def is_local_host(host: str) -> bool:
    try:
        addresses = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host!r}: {exc}") from None
    local = {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs}
    return any(
        ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(a).is_unspecified or a in local for a in addresses
    )


def listening_process(port: int) -> psutil.Process:
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        raise ToolError(
            "not allowed to list this machine's sockets, so the server's workers cannot be checked"
        ) from None
    listeners = [c for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    pids = {c.pid for c in listeners}
    if not listeners:
        raise ToolError(f"no process listens on port {port} here; --kill-every needs the server on this machine")
    if None in pids:
        raise ToolError(f"cannot see which process listens on port {port} (another user's server?); not killing")
    if len(pids) > 1:
        raise ToolError(f"several processes listen on port {port} ({sorted(p for p in pids if p)}); not killing")
    pid = pids.pop()
    assert pid is not None
    return psutil.Process(pid)


@dataclass
class Kill:
    number: int
    at_s: float  # since the start of the load
    killed_at: float  # monotonic
    slot: int
    pid: int
    state: str  # ready | busy, as /status said just before
    job: str | None
    outcome: str = "recovering"  # recovering | recovered | not sent
    new_pid: int | None = None
    recovery_s: float | None = None
    note: str = ""

    @property
    def target(self) -> str:
        return f"slot {self.slot}"


class Killer(threading.Thread):
    """Polls /status; kills a random ready-or-busy worker every kill_every seconds; times each recovery."""

    def __init__(
        self, base: str, api_key: str | None, kill_every: float, guard: KillGuard | None, seed: int, started: float
    ) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.base = base
        self.session = make_session(api_key)
        self.kill_every = kill_every
        self.guard = guard
        self.rng = random.Random(seed + 1)
        self.started = started
        self.kills: list[Kill] = []
        self.killing = threading.Event()  # set while the load runs
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.latest: dict[str, Any] | None = None
        self.latest_at = 0.0
        self.status_errors = 0
        self.last_status_error = ""
        self.skipped_ticks = 0  # kill times at which no worker could be killed
        self.problem_of: Callable[[dict[str, Any]], str | None] = pool_problem  # what full strength means
        self.max_kills = 0  # stop killing after this many kills sent; 0: no limit

    def run(self) -> None:
        next_kill = self.started + self.kill_every
        first = True
        while not self.stopped.is_set():
            try:
                _, status = request_json(self.session, "GET", f"{self.base}/status", timeout=LOOKUP_TIMEOUT_S)
            except ToolError as exc:
                self.status_errors += 1
                self.last_status_error = str(exc)
                self.stopped.wait(0.2)
                continue
            now = time.monotonic()
            workers = [w for w in status.get("workers") or [] if isinstance(w, dict)]
            with self.lock:
                self.latest, self.latest_at = status, now
                self._track_recoveries(workers, now)
            if self.kill_every > 0 and self.killing.is_set() and not self.done_killing():
                if first and any(w.get("state") == "busy" for w in workers):
                    next_kill = min(next_kill, now)  # the first kill hits a running job
                if now >= next_kill:
                    first = False
                    self._kill_one(workers, now)
                    next_kill = max(next_kill + self.kill_every, now + self.kill_every / 2)
            self.stopped.wait(STATUS_INTERVAL_S)

    def done_killing(self) -> bool:
        return 0 < self.max_kills <= self.kills_sent()

    def kills_sent(self) -> int:
        return sum(k.outcome != "not sent" for k in self.kills)

    def snapshot(self) -> tuple[dict[str, Any] | None, float, list[Kill]]:
        with self.lock:
            return self.latest, self.latest_at, [k for k in self.kills if k.outcome == "recovering"]

    def _track_recoveries(self, workers: list[dict[str, Any]], now: float) -> None:
        by_slot = {w.get("slot"): w for w in workers}
        for kill in self.kills:
            if kill.outcome != "recovering":
                continue
            worker = by_slot.get(kill.slot) or {}
            pid = worker.get("pid")
            if pid and pid != kill.pid and worker.get("state") in ("ready", "busy"):
                kill.outcome, kill.new_pid, kill.recovery_s = "recovered", int(pid), now - kill.killed_at
                say(f"  slot {kill.slot} ready again as pid {pid}, {kill.recovery_s:.2f} s after kill {kill.number}")
            elif worker.get("budget_spent") and not kill.note:
                # Not final: the slot retries every restart_backoff_max_s, so the recovery just takes longer.
                kill.note = f"restart budget spent ({worker.get('last_error')}); the slot retries more slowly"
                say(f"  slot {kill.slot}: {kill.note}")

    def _kill_one(self, workers: list[dict[str, Any]], now: float) -> None:
        with self.lock:
            recovering = {k.slot for k in self.kills if k.outcome == "recovering"}
        candidates = [
            w
            for w in workers
            if w.get("state") in ("ready", "busy")
            and w.get("pid")
            and not w.get("budget_spent")
            and w["slot"] not in recovering
        ]
        if not candidates:
            self.skipped_ticks += 1
            return
        victim = self.rng.choice(candidates)
        pid = int(victim["pid"])
        kill = Kill(
            number=len(self.kills) + 1,
            at_s=now - self.started,
            killed_at=now,
            slot=int(victim["slot"]),
            pid=pid,
            state=str(victim["state"]),
            job=victim.get("current_job"),
        )
        try:
            assert self.guard is not None
            self.guard.check(pid)
            os.kill(pid, signal.SIGKILL)
            kill.killed_at = time.monotonic()
            kill.at_s = kill.killed_at - self.started
        except (ToolError, OSError) as exc:
            kill.outcome, kill.note = "not sent", str(exc)
        with self.lock:
            self.kills.append(kill)
        running = f", job {kill.job}" if kill.job else ""
        if kill.outcome == "not sent":
            say(f"kill {kill.number}: slot {kill.slot} pid {pid} NOT killed: {kill.note}")
        else:
            say(f"kill {kill.number} at {kill.at_s:.1f} s: slot {kill.slot} pid {pid} ({kill.state}{running})")


@dataclass
class NodeKill:
    number: int
    at_s: float  # since the start of the load
    killed_at: float  # monotonic
    node: str  # its node id
    pid: int  # the node's own process (its process group's id)
    worker_pids: list[int]  # its workers' pids, as the API node's /status said just before
    jobs: list[str]  # the jobs it held (claimed, not yet reported ended), as its own /status said just before
    outcome: str = "recovering"  # recovering | recovered | not sent
    new_pid: int | None = None  # the restarted node's process
    recovery_s: float | None = None
    note: str = ""

    @property
    def target(self) -> str:
        return f"node {self.node}"


class NodeKiller(Killer):
    """Kills whole worker nodes of the tool's own cluster (SIGKILL to the process group) and restarts each at once;
    a node has recovered when the API node's /status lists it with every worker ready or busy under a new pid."""

    def __init__(
        self, base: str, api_key: str | None, kill_every: float, cluster: Cluster, seed: int, started: float
    ) -> None:
        super().__init__(base, api_key, kill_every, None, seed, started)
        self.cluster = cluster
        self.problem_of = cluster.problem
        self.node_kills: list[NodeKill] = []
        self.node_restarts = 0

    def kills_sent(self) -> int:
        return sum(k.outcome != "not sent" for k in self.node_kills)

    def snapshot(self) -> tuple[dict[str, Any] | None, float, list[NodeKill]]:  # type: ignore[override]
        with self.lock:
            return self.latest, self.latest_at, [k for k in self.node_kills if k.outcome == "recovering"]

    def _node(self, node_id: str) -> Node:
        return next(node for node in self.cluster.nodes if node.node_id == node_id)

    def _track_recoveries(self, workers: list[dict[str, Any]], now: float) -> None:
        for kill in self.node_kills:
            if kill.outcome != "recovering":
                continue
            node = self._node(kill.node)
            if node.process is not None and node.process.poll() is not None and not kill.note:
                kill.note = f"the restarted node exited with {node.process.returncode} (see {node.log_path})"
                say(f"  node {kill.node}: {kill.note}")
            own = [w for w in workers if w.get("node") == kill.node]
            pids = [w.get("pid") for w in own]
            if (
                len(own) == self.cluster.workers_per_node
                and all(w.get("state") in ("ready", "busy") for w in own)
                and all(pids)
                and not set(pids) & set(kill.worker_pids)
            ):
                kill.outcome, kill.new_pid, kill.recovery_s = "recovered", node.pid, now - kill.killed_at
                say(
                    f"  node {kill.node} back as pid {node.pid} (workers {', '.join(str(p) for p in pids)}), "
                    f"{kill.recovery_s:.2f} s after kill {kill.number}"
                )

    def _kill_one(self, workers: list[dict[str, Any]], now: float) -> None:
        with self.lock:
            recovering = {k.node for k in self.node_kills if k.outcome == "recovering"}
        candidates = []
        for node in self.cluster.nodes:
            own = [w for w in workers if w.get("node") == node.node_id]
            up = own and all(w.get("state") in ("ready", "busy") and w.get("pid") for w in own)
            if up and node.node_id not in recovering and node.pid is not None:
                candidates.append((node, own))
        if not candidates:
            self.skipped_ticks += 1
            return
        node, own = self.rng.choice(candidates)
        try:  # the node's own view is current; the API node's lags by up to two reports
            _, body = request_json(self.session, "GET", f"{node.url}/status", timeout=2)
            held = [str(job) for job in (body.get("node") or {}).get("held_jobs") or []]
        except ToolError:
            held = [str(w["current_job"]) for w in own if w.get("current_job")]
        kill = NodeKill(
            number=len(self.node_kills) + 1,
            at_s=now - self.started,
            killed_at=now,
            node=node.node_id,
            pid=node.pid or 0,
            worker_pids=[int(w["pid"]) for w in own],
            jobs=held,
        )
        with self.cluster.lock:  # never a launch after the cluster's stop began
            if self.cluster.stopping:
                return
            try:
                kill.pid = node.kill()
                kill.killed_at = time.monotonic()
                kill.at_s = kill.killed_at - self.started
            except (ServerError, OSError) as exc:
                kill.outcome, kill.note = "not sent", str(exc)
            else:
                try:
                    node.launch()  # at once, as an orchestrator restarts a crashed container
                    self.node_restarts += 1
                except OSError as exc:  # it stays down: the run ends short of full strength
                    kill.note = f"could not start it again: {exc}"
        with self.lock:
            self.node_kills.append(kill)
        running = f", holding {', '.join(job[:8] for job in kill.jobs)}" if kill.jobs else ", holding no job"
        if kill.outcome == "not sent":
            say(f"kill {kill.number}: node {kill.node} pid {kill.pid} NOT killed: {kill.note}")
        else:
            say(
                f"kill {kill.number} at {kill.at_s:.1f} s: node {kill.node} pid {kill.pid} and its process group "
                f"(workers {', '.join(str(p) for p in kill.worker_pids)}{running}); restarted as pid {node.pid}"
            )


# --- pool strength ----------------------------------------------------------------------------------------------


def pool_problem(status: dict[str, Any]) -> str | None:
    """None at full strength (every worker ready, all alive); else what is missing."""
    workers = [w for w in status.get("workers") or [] if isinstance(w, dict)]
    if not workers:
        return "/status lists no workers"
    alive = (status.get("concurrent_manager") or {}).get("alive_processes")
    not_ready = [
        f"slot {w.get('slot')} {w.get('state')}" + (" (restart budget spent)" if w.get("budget_spent") else "")
        for w in workers
        if w.get("state") != "ready"
    ]
    if not_ready:
        return ", ".join(not_ready)
    if alive != len(workers):
        return f"alive_processes {alive} of {len(workers)} workers"
    return None


def wait_full_strength(
    session: requests.Session,
    base: str,
    timeout: float,
    problem_of: Callable[[dict[str, Any]], str | None] = pool_problem,
) -> tuple[dict[str, Any], str | None]:
    """Poll /status until full strength or timeout → (last status, problem or None). ToolError when unreachable."""
    deadline = time.monotonic() + timeout
    while True:
        _, status = request_json(session, "GET", f"{base}/status", timeout=LOOKUP_TIMEOUT_S)
        problem = problem_of(status)
        if problem is None or time.monotonic() >= deadline:
            return status, problem
        time.sleep(0.1)


def wait_recovered(killer: Killer, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """After the load: until full strength with every kill recovered, /status has not answered for 30 s, or the
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status, at, recovering = killer.snapshot()
        fresh = status is not None and time.monotonic() - at < 5
        problem = killer.problem_of(status) if status is not None else "no /status answer"
        if not fresh:
            problem = f"/status does not answer ({killer.last_status_error or 'no answer yet'})"
        elif problem is None and recovering:
            problem = ", ".join(f"{k.target} not back since kill {k.number}" for k in recovering)
        silent_for = time.monotonic() - at
        if problem is None or silent_for > 30 or time.monotonic() >= deadline:
            return status, problem
        time.sleep(STATUS_INTERVAL_S)


# --- reporting --------------------------------------------------------------------------------------------------


def count_row(label: str, results: list[JobResult]) -> list[str]:
    counts = Counter(r.outcome for r in results)
    times = sorted(r.seconds for r in results if r.seconds is not None and r.outcome == "completed")
    p50 = f"{times[len(times) // 2]:.2f}" if times else "-"
    return [label, str(len(results)), *(str(counts[o]) for o in OUTCOMES), p50]


def jobs_table(results: list[JobResult]) -> Table:
    table = Table(title="jobs (p50 s: client time of the completed ones)", title_justify="left", pad_edge=False)
    table.add_column("route / mode", no_wrap=True)
    for name in ("sent", *OUTCOMES, "p50 s"):
        table.add_column(name, justify="right")
    for route in ROUTES:
        chosen = [r for r in results if r.plan.route == route]
        if chosen:
            table.add_row(*count_row(route, chosen))
    table.add_section()
    for mode in MODES:
        chosen = [r for r in results if r.plan.mode == mode]
        if chosen:
            table.add_row(*count_row(mode, chosen))
    table.add_section()
    table.add_row(*count_row("all", results), style="bold")
    return table


def reasons_table(results: list[JobResult]) -> Table | None:
    groups: dict[tuple[str, str], list[JobResult]] = {}
    for r in results:
        if r.outcome in ("failed", "refused"):
            groups.setdefault((r.outcome, r.reason or "unknown"), []).append(r)
    if not groups:
        return None
    table = Table(title="failures and refusals", title_justify="left")
    table.add_column("outcome", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("jobs (#, route, task id)", overflow="fold")
    for (outcome, reason), chosen in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        examples = ", ".join(f"#{r.plan.index} {r.plan.route} {r.task_id or '-'}" for r in chosen[:3])
        table.add_row(outcome, reason, str(len(chosen)), examples + (", ..." if len(chosen) > 3 else ""))
    return table


def kills_table(kills: list[Kill]) -> Table:
    """One row per kill; "was" is the worker's state and job in the last /status poll before the kill (up to one
    poll old, so a short job may already have given way to the next one: the server log names the re-queued job)."""
    table = Table(title="kills", title_justify="left")
    for name in ("#", "at s", "slot", "pid", "was", "outcome", "new pid", "recovery s"):
        table.add_column(name, justify="left" if name in ("was", "outcome") else "right", no_wrap=True)
    for k in kills:
        table.add_row(
            str(k.number),
            f"{k.at_s:.1f}",
            str(k.slot),
            str(k.pid),
            f"{k.state} {k.job[:8]}" if k.job else k.state,
            k.outcome,
            str(k.new_pid or "-"),
            f"{k.recovery_s:.2f}" if k.recovery_s is not None else "-",
        )
    return table


def pool_table(
    before: dict[str, Any], after: dict[str, Any] | None, problem: str | None, killer: Killer, results: list[JobResult]
) -> Table:
    cancels = Counter(r.cancel for r in results if r.cancel is not None)
    table = Table(title="pool and run", title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    kills = killer.kills
    recoveries = [k.recovery_s for k in kills if k.recovery_s is not None]
    restarts = restarts_during(before, after)
    workers = len(before.get("workers") or [])
    table.add_row("workers", str(workers))
    table.add_row(
        "kills sent", f"{sum(k.outcome != 'not sent' for k in kills)} ({killer.skipped_ticks} kill times skipped)"
    )
    table.add_row("recovered", f"{len(recoveries)} of {sum(k.outcome != 'not sent' for k in kills)}")
    if recoveries:
        ordered = sorted(recoveries)
        table.add_row(
            "recovery s (min / p50 / max)", f"{ordered[0]:.2f} / {ordered[len(ordered) // 2]:.2f} / {ordered[-1]:.2f}"
        )
    table.add_row(
        "total_restarts", f"{total_restarts(before)} -> {total_restarts(after) if after else '?'} (+{restarts})"
    )
    if after is not None:
        manager = after.get("concurrent_manager") or {}
        table.add_row("alive / dead processes", f"{manager.get('alive_processes')} / {manager.get('dead_processes')}")
        table.add_row(
            "worker states", ", ".join(f"{w.get('slot')}:{w.get('state')}" for w in after.get("workers") or [])
        )
    table.add_row("full strength", "yes" if problem is None else escape(f"NO: {problem}"))
    unanswered = [r for r in results if r.no_answer is not None]
    if unanswered:
        found = sum(r.outcome != "lost" for r in unanswered)
        table.add_row("no HTTP answer", f"{len(unanswered)} submissions ({found} found afterwards by their prompt)")
    table.add_row("cancel requests", ", ".join(f"{k}: {v}" for k, v in sorted(cancels.items())) or "none")
    if killer.status_errors:
        table.add_row("/status errors", escape(f"{killer.status_errors} (last: {killer.last_status_error})"))
    return table


def node_kills_table(kills: list[NodeKill]) -> Table:
    """One row per node kill; "held" is the jobs the node held (claimed and not reported ended) as its own /status
    said just before the kill: these come back through their leases."""
    table = Table(title="node kills", title_justify="left")
    for name in ("#", "at s", "node", "pid", "held", "outcome", "new pid", "recovery s"):
        table.add_column(name, justify="left" if name in ("node", "held", "outcome") else "right", no_wrap=True)
    for k in kills:
        table.add_row(
            str(k.number),
            f"{k.at_s:.1f}",
            k.node,
            str(k.pid),
            ", ".join(job[:8] for job in k.jobs) or "nothing",
            k.outcome,
            str(k.new_pid or "-"),
            f"{k.recovery_s:.2f}" if k.recovery_s is not None else "-",
        )
    return table


def cluster_table(
    cluster: Cluster, after: dict[str, Any] | None, problem: str | None, killer: Killer, results: list[JobResult]
) -> Table:
    cancels = Counter(r.cancel for r in results if r.cancel is not None)
    table = Table(title="cluster and run", title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row(
        "worker nodes", f"{len(cluster.nodes)} x {cluster.workers_per_node} CPU worker(s), lease {cluster.lease_s:g} s"
    )
    if isinstance(killer, NodeKiller):
        kills = killer.node_kills
        sent = sum(k.outcome != "not sent" for k in kills)
        recoveries = sorted(k.recovery_s for k in kills if k.recovery_s is not None)
        table.add_row("node kills sent", f"{sent} ({killer.skipped_ticks} kill times skipped: no node up)")
        table.add_row("node restarts", str(killer.node_restarts))
        by_task = {r.task_id: r for r in results if r.task_id}
        held = [by_task.get(job) for k in kills for job in k.jobs]
        fates = Counter(
            "not this run's" if r is None else f"{r.outcome}: {r.reason}" if r.reason else r.outcome for r in held
        )
        table.add_row(
            "jobs held by killed nodes",
            f"{len(held)}, now " + ", ".join(f"{fate} {n}" for fate, n in sorted(fates.items())) if held else "none",
        )
        table.add_row("recovered", f"{len(recoveries)} of {sent}")
        if recoveries:
            table.add_row(
                "recovery s (min / p50 / max)",
                f"{recoveries[0]:.2f} / {recoveries[len(recoveries) // 2]:.2f} / {recoveries[-1]:.2f}",
            )
    if after is not None:
        table.add_row("nodes listed", ", ".join(str(n.get("node_id")) for n in after.get("nodes") or []) or "none")
        table.add_row(
            "worker states",
            ", ".join(f"{w.get('node')}/{w.get('slot')}:{w.get('state')}" for w in after.get("workers") or []),
        )
    table.add_row("full strength", "yes" if problem is None else escape(f"NO: {problem}"))
    unanswered = [r for r in results if r.no_answer is not None]
    if unanswered:
        found = sum(r.outcome != "lost" for r in unanswered)
        table.add_row("no HTTP answer", f"{len(unanswered)} submissions ({found} found afterwards by their prompt)")
    table.add_row("cancel requests", ", ".join(f"{k}: {v}" for k, v in sorted(cancels.items())) or "none")
    if killer.status_errors:
        table.add_row("/status errors", escape(f"{killer.status_errors} (last: {killer.last_status_error})"))
    return table


def total_restarts(status: dict[str, Any] | None) -> int:
    return int(((status or {}).get("concurrent_manager") or {}).get("total_restarts") or 0)


def restarts_during(before: dict[str, Any], after: dict[str, Any] | None) -> int:
    return total_restarts(after) - total_restarts(before) if after is not None else 0


def last_line(results: list[JobResult], restarts: int, kills: list[Kill] | list[NodeKill]) -> str:
    counts = Counter(r.outcome for r in results)
    reasons = Counter(r.reason or "unknown" for r in results if r.outcome == "failed")
    failed = f"failed {counts['failed']}"
    if reasons:
        failed += " (" + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) + ")"
    recoveries = [k.recovery_s for k in kills if k.recovery_s is not None]
    longest = max(recoveries, default=0.0)
    return (
        f"jobs sent {len(results)}, completed {counts['completed']}, {failed}, canceled {counts['canceled']}, "
        f"refused {counts['refused']}, lost {counts['lost']}, restarts {restarts}, longest recovery {longest:.2f}s"
    )


def write_report(path: Path, results: list[JobResult], kills: list[Kill] | list[NodeKill]) -> None:
    with path.open("w") as out:
        for r in results:
            out.write(json.dumps({"kind": "job", **asdict(r)}) + "\n")
        for k in kills:
            out.write(json.dumps({"kind": "kill", **asdict(k)}) + "\n")


# --- command line -----------------------------------------------------------------------------------------------


def choices(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        unknown = [p for p in picked if p not in allowed]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
        return picked

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chaos test of a running GenServe: send a mixed load (every mode, JSON and form-data, sync\n"
        "and async, priorities, cancels) while SIGKILLing a random worker every few seconds, then account for\n"
        "every job (completed, failed, canceled, refused or LOST) and check that the pool gets back to full\n"
        "strength. The last output line sums it up: 'jobs sent N, completed C, failed F (reason: count, ...),\n"
        "canceled X, refused R, lost L, restarts K, longest recovery S.SSs'. With --cluster --kill-nodes it\n"
        "starts a Redis cluster of its own and SIGKILLs (and restarts) whole worker nodes instead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser)
    parser.add_argument("--jobs", type=int, default=100, metavar="N", help="jobs to send (default %(default)s)")
    parser.add_argument(
        "--kill-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="SIGKILL a random ready or busy worker this often while the load runs; the first kill comes when a "
        "worker is first seen busy; 0 disables the kills (needed for a server on another machine) "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-kills",
        type=int,
        default=0,
        metavar="N",
        help="stop killing after N kills (workers, or nodes with --kill-nodes); 0: no limit (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, metavar="N", help="jobs in flight at once (default %(default)s)"
    )
    parser.add_argument(
        "--cancel-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of the async jobs that get POST /jobs/{id}/cancel (default %(default)s)",
    )
    parser.add_argument(
        "--cancel-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a cancel is sent after a random delay of 0 to this many seconds after submission (default %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=128,
        metavar="PX",
        help=f"width and height of every image; a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}-{MAX_SIZE} "
        "(default %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=4, metavar="N", help="num_inference_steps (default %(default)s)")
    parser.add_argument(
        "--priority-spread",
        type=int,
        default=2,
        metavar="K",
        help="priorities are drawn from -K..K; lower runs first (default %(default)s)",
    )
    parser.add_argument(
        "--modes",
        type=choices(MODES),
        default=MODES,
        metavar="LIST",
        help=f"comma-separated modes to mix (default: {','.join(MODES)}); modes the server does not serve are left out",
    )
    parser.add_argument(
        "--routes",
        type=choices(ROUTES),
        default=ROUTES,
        metavar="LIST",
        help=f"comma-separated routes to mix (default: {','.join(ROUTES)}): generate-json = POST /generate, "
        "generate-form = POST /generate/img2img, jobs-json = POST /jobs, jobs-form = POST /jobs/form",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1234,
        metavar="N",
        help="seed of the plan and of the kill choices (default %(default)s)",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="an async job (or a sync one found after getting no answer) that has not ended this long after its "
        "submission counts as lost (default %(default)s; more than the server's queue.task_timeout_s)",
    )
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long the pool may take to be back to full strength, before the run and after it "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write every job and kill as JSON lines to FILE, for digging into a failure",
    )
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    check_cluster_arguments(parser, args)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.kill_every < 0:
        parser.error("--kill-every must not be negative (0 disables the kills)")
    if args.max_kills < 0:
        parser.error("--max-kills must not be negative (0: no limit)")
    if not 0 <= args.cancel_fraction <= 1:
        parser.error("--cancel-fraction must be between 0 and 1")
    if args.cancel_delay < 0:
        parser.error("--cancel-delay must not be negative")
    if not MIN_SIZE <= args.size <= MAX_SIZE or args.size % SIZE_MULTIPLE:
        parser.error(f"--size must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}, got {args.size}")
    if not 1 <= args.steps <= 100:
        parser.error("--steps must be between 1 and 100")
    if args.priority_spread < 0:
        parser.error("--priority-spread must not be negative")
    if args.job_timeout <= 0 or args.recovery_timeout <= 0:
        parser.error("--job-timeout and --recovery-timeout must be positive")
    args.url = args.url.rstrip("/")
    return args


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster mode (starts a Redis, an API node and worker nodes of its own on this machine)"
    )
    group.add_argument(
        "--cluster",
        action="store_true",
        help="start a cluster of its own (cluster.backend redis: a redis-server on a free port, one API node, "
        "--nodes worker nodes, the embedded model on the CPU) and send the load to its API node instead of --url",
    )
    group.add_argument(
        "--kill-nodes",
        action="store_true",
        help="with --cluster: every --kill-every seconds SIGKILL a whole worker node (its process group: node, "
        "forkserver, workers) and restart it at once, instead of killing single workers",
    )
    group.add_argument(
        "--nodes", type=int, default=2, metavar="N", help="worker nodes of --cluster (default %(default)s)"
    )
    group.add_argument(
        "--node-workers",
        type=int,
        default=1,
        metavar="N",
        help="CPU workers of each worker node, one torch thread each (default %(default)s)",
    )
    group.add_argument(
        "--lease",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="the cluster's cluster.lease_s: how soon a killed node's jobs go back to the queue (default %(default)s)",
    )
    group.add_argument(
        "--cluster-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the cluster's configs, logs, Redis folder and results in DIR (default: a temporary folder, "
        "removed at exit)",
    )
    add_embedded_cache_argument(group)  # type: ignore[arg-type]


def check_cluster_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kill_nodes and not args.cluster:
        parser.error("--kill-nodes needs --cluster: the tool kills and restarts only nodes it started itself")
    if not args.cluster:
        return
    if args.url != DEFAULT_URL:
        parser.error("--cluster sends the load to the API node it starts: leave --url out")
    if args.kill_every > 0 and not args.kill_nodes:
        parser.error(
            "--cluster kills whole worker nodes (add --kill-nodes) or nothing (--kill-every 0); "
            "killing single workers is for a one-machine server at --url"
        )
    if args.nodes < 1 or args.node_workers < 1:
        parser.error("--nodes and --node-workers must be at least 1")
    if args.lease < 0.5:
        parser.error("--lease must be at least 0.5 (cluster.lease_s)")


# --- main -------------------------------------------------------------------------------------------------------


def served_modes(args: argparse.Namespace, status: dict[str, Any]) -> tuple[str, ...]:
    served = (status.get("model") or {}).get("modes")
    if not isinstance(served, list):
        return tuple(args.modes)
    modes = tuple(m for m in args.modes if m in served)
    left_out = [m for m in args.modes if m not in served]
    if left_out:
        say(f"note: the server does not serve {', '.join(left_out)}; left out of the mix")
    return modes


def provisional(result: JobResult) -> str:
    """A job's state as the load sees it, before the accounting settles sync jobs and unanswered ones."""
    if result.no_answer is not None:
        return "no answer"
    return result.claim or result.outcome if result.plan.sync else result.outcome


def send_load(load: Load, plans: list[JobPlan], concurrency: int) -> list[JobResult]:
    results: list[JobResult] = []
    step = max(1, len(plans) // 10)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chaos-job") as pool:
        futures = [pool.submit(load.run, plan) for plan in plans]
        for done, future in enumerate(as_completed(futures), start=1):
            results.append(future.result())
            if done % step == 0 or done == len(plans):
                counts = Counter(provisional(r) for r in results)
                summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                say(f"[{done}/{len(plans)} jobs back] {summary}")
    return sorted(results, key=lambda r: r.plan.index)


def print_header(args: argparse.Namespace, status: dict[str, Any], modes: tuple[str, ...], run_id: str) -> None:
    workers = status.get("workers") or []
    model = status.get("model") or {}
    embedded = " (embedded random-weight test model)" if model.get("embedded_test_model") else ""
    kills = f"every {args.kill_every:g} s" if args.kill_every > 0 else "off"
    if args.kill_every > 0 and args.kill_nodes:
        kills += " a whole worker node (SIGKILL to its process group), restarted at once"
    if args.kill_every > 0 and args.max_kills:
        kills += f", at most {args.max_kills}"
    say(f"GenServe chaos run {run_id} against {args.url}")
    say(
        f"  server:  {len(workers)} workers [{', '.join(str(w.get('device')) for w in workers)}], "
        f"model {model.get('model_id', '?')}{embedded}, total_restarts {total_restarts(status)}"
    )
    say(
        f"  load:    {args.jobs} jobs, {args.concurrency} in flight, {args.size}x{args.size}, {args.steps} steps, "
        f"modes {','.join(modes)}, routes {','.join(args.routes)}, priorities -{args.priority_spread}.."
        f"{args.priority_spread}, cancel fraction {args.cancel_fraction:g} of async jobs, seed {args.seed}"
    )
    say(f"  kills:   {kills}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cluster:
        return run_with_cluster(args)
    return run(args)


def run(args: argparse.Namespace, cluster: Cluster | None = None) -> int:
    """The chaos run against args.url: a one-machine server, or the API node of the tool's own cluster."""
    session = make_session(args.api_key)
    problem_of = cluster.problem if cluster is not None else pool_problem
    try:
        request_json(session, "GET", f"{args.url}/status", timeout=LOOKUP_TIMEOUT_S)
        guard = KillGuard(args.url) if args.kill_every > 0 and cluster is None else None
        before, problem = wait_full_strength(session, args.url, args.recovery_timeout, problem_of)
    except ToolError as exc:
        fail(str(exc), 2)
    if problem is not None:
        fail(f"the pool is not at full strength before the run: {problem}", 2)
    modes = served_modes(args, before)
    if not modes:
        fail("the server serves none of the --modes asked", 2)

    run_id = uuid.uuid4().hex[:8]
    plans = make_plan(args, modes, run_id)
    print_header(args, before, modes, run_id)
    load = Load(args, make_images(args.size, args.seed))
    started_wall, started = time.time(), time.monotonic()
    killer: Killer
    if cluster is not None and args.kill_nodes:
        killer = NodeKiller(args.url, args.api_key, args.kill_every, cluster, args.seed, started)
    else:
        killer = Killer(args.url, args.api_key, args.kill_every, guard, args.seed, started)
        killer.problem_of = problem_of
    killer.max_kills = args.max_kills
    killer.killing.set()
    killer.start()
    try:
        results = send_load(load, plans, args.concurrency)
        killer.killing.clear()
        say(f"load done in {time.monotonic() - started:.1f} s; checking every job")
        accountant = Accountant(args, started_wall)
        for result in results:
            accountant.settle(result)
        after, problem = wait_recovered(killer, args.recovery_timeout)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    finally:
        killer.stopped.set()
        killer.join(timeout=LOOKUP_TIMEOUT_S + 1)  # before a cluster of its own is stopped: no restart after

    console.print()
    console.print(jobs_table(results))
    reasons = reasons_table(results)
    if reasons is not None:
        console.print(reasons)
    kills: list[Kill] | list[NodeKill] = killer.kills
    if isinstance(killer, NodeKiller):
        kills = killer.node_kills
        if kills:
            console.print(node_kills_table(killer.node_kills))
    elif killer.kills:
        console.print(kills_table(killer.kills))
    if cluster is not None:
        console.print(cluster_table(cluster, after, problem, killer, results))
    else:
        console.print(pool_table(before, after, problem, killer, results))
    for k in kills:
        if k.note:
            say(f"kill {k.number} ({k.outcome}): {k.note}")
    for r in results:
        if r.outcome == "lost":
            say(f"LOST job #{r.plan.index} ({r.plan.route}, {r.plan.mode}, task {r.task_id or '-'}): {r.detail}")
        elif r.no_answer is not None:
            say(f"note: job #{r.plan.index}: {r.detail}")
        if r.mismatch:
            say(f"MISMATCH job #{r.plan.index} ({r.plan.mode}): {r.mismatch}")
    if args.report is not None:
        try:
            write_report(args.report, results, kills)
            say(f"every job and kill written to {args.report}")
        except OSError as exc:
            say(f"could not write --report {args.report}: {exc}")
    lost = sum(r.outcome == "lost" for r in results)
    mismatches = sum(r.mismatch is not None for r in results)
    if problem is not None:
        say(f"pool NOT back to full strength within {args.recovery_timeout:g} s: {problem}")
    restarts = killer.node_restarts if isinstance(killer, NodeKiller) else restarts_during(before, after)
    say(last_line(results, restarts, kills))
    return 0 if lost == 0 and mismatches == 0 and problem is None else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the cluster of its own is stopped on the way out


def cluster_sections(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config sections of the worker nodes and of the API node."""
    model = {"embedded_cache_dir": str(args.embedded_cache), "modes": list(args.modes)}
    queue = {"max_size": max(100, 2 * args.jobs)}
    node = {
        "model": model,
        "queue": queue,
        "workers": {"cpu_workers": args.node_workers, "cpu_threads": 1, "restart_backoff_s": 0.2},
    }
    return node, {"model": model, "queue": queue}


def run_with_cluster(args: argparse.Namespace) -> int:
    """Start the cluster, run against its API node, stop it whatever happens (Ctrl-C and SIGTERM included)."""
    signal.signal(signal.SIGTERM, _interrupt)
    node_config, api_config = cluster_sections(args)
    say(
        f"starting a cluster: redis-server, one API node, {args.nodes} worker node(s) x {args.node_workers} CPU "
        f"worker(s), modes {','.join(args.modes)}, lease {args.lease:g} s"
        + (f"; configs and logs in {args.cluster_dir}" if args.cluster_dir else "")
    )
    began = time.monotonic()
    try:
        with own_cluster(
            node_config, args.nodes, args.recovery_timeout, api_config, lease_s=args.lease, keep=args.cluster_dir
        ) as cluster:
            assert cluster.api is not None
            args.url = cluster.api.url
            say(
                f"cluster up in {time.monotonic() - began:.1f} s: Redis {cluster.redis.url} "
                f"(redis-server {cluster.redis.version()}), API node {cluster.api.url}, worker nodes "
                + ", ".join(f"{n.node_id} (pid {n.pid})" for n in cluster.nodes)
            )
            return run(args, cluster)
    except ServerError as exc:
        fail(f"the cluster did not start: {exc}", 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)


if __name__ == "__main__":
    raise SystemExit(main())
