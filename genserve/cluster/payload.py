"""A job as it travels through the cluster queue: everything a worker node needs to run it, as JSON.

The API node that accepted a job packs it (``pack``); the worker node that claims it unpacks it into a live ``Job``
of its own (``unpack``), writing the input pixels into its own inputs folder and pointing the output at its own
result store. JSON rather than pickle: a payload comes out of Redis, and unpickling whatever is in Redis would hand
anyone who can write to it code execution on every GPU node.

Deadlines travel as wall-clock instants (``deadline_at``): a monotonic clock means nothing on another machine, so
nodes must keep their clocks in step (NTP) for deadlines to hold to the second.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from genserve.jobs import Job, Schedule
from genserve.messages import ImageFile, JobRequest, LoraUse

INPUT_FIELDS = ("input_image", "mask_image", "control_image")
VERSION = 1


@dataclass(frozen=True)
class Unpacked:
    """A claimed job, ready for the node's supervisor, and when it must have ended (wall clock)."""

    job: Job
    deadline_at: float


def pack(job: Job) -> bytes:
    """The job's request, schedule and input pixels (read from the files the API node wrote) as JSON bytes."""
    request = asdict(job.request)
    inputs: dict[str, Any] = {}
    for name in INPUT_FIELDS:
        image: ImageFile | None = getattr(job.request, name)
        request[name] = None
        if image is not None:
            inputs[name] = {
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "data": base64.b64encode(Path(image.path).read_bytes()).decode("ascii"),
            }
    request["output_path"] = ""  # each node writes into its own result store
    body = {
        "version": VERSION,
        "request": request,
        "inputs": inputs,
        "priority": job.priority,
        "timeout_s": job.schedule.timeout_s,
        "deadline_at": job.submitted_at + job.schedule.timeout_s,
        "group": job.schedule.group,
        "submitted_at": job.submitted_at,
        "model_id": job.model_id,
        "params": job.params,
        "owner": job.owner,
        "request_id": job.request_id,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def unpack(payload: bytes, *, input_dir: Path, output_path: Path, attempts: int) -> Unpacked:
    """A live job for this node from a claimed payload: inputs written under ``input_dir``, output at
    ``output_path``, ``attempts`` earlier runs counted (so a job that already lost a node fails on its next loss)."""
    body = json.loads(payload)
    if body.get("version") != VERSION:
        raise ValueError(f"job payload version {body.get('version')!r}; this node reads version {VERSION}")
    fields = dict(body["request"])
    fields["loras"] = tuple(LoraUse(**lora) for lora in fields.get("loras") or ())
    fields["output_path"] = str(output_path)
    for name, image in body["inputs"].items():
        input_dir.mkdir(parents=True, exist_ok=True)
        path = input_dir / f"{name}.raw"
        path.write_bytes(base64.b64decode(image["data"]))
        fields[name] = ImageFile(path=str(path), width=image["width"], height=image["height"], mode=image["mode"])
    request = JobRequest(**fields)
    deadline_at = float(body["deadline_at"])
    schedule = Schedule(
        priority=int(body["priority"]),
        timeout_s=float(body["timeout_s"]),
        # The wall-clock deadline on this node's monotonic clock.
        deadline=time.monotonic() + (deadline_at - time.time()),
        attempts=attempts,
        group=body.get("group"),
    )
    job = Job(
        request=request,
        schedule=schedule,
        model_id=body["model_id"],
        params=body["params"],
        submitted_at=float(body["submitted_at"]),
        owner=body.get("owner"),
        request_id=body.get("request_id"),
    )
    return Unpacked(job=job, deadline_at=deadline_at)
