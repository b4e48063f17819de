"""The LoRA catalogue over HTTP (API process): GET /loras, GET /loras/{name}, POST /loras, DELETE /loras/{name}.

Runs on the event loop; every catalogue call (disk, safetensors parsing, torch) goes to the thread pool. Reading
needs the ``read`` scope like /models (the app-wide authorize dependency); adding and deleting need ``admin`` when
API keys are on. An upload streams into a temp file in ``loras.dir`` (capped by ``loras.max_upload_mb``, refused by
a declared Content-Length before a byte is read) and is moved into place only once it parses and fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from genserve.auth import KeyRing, presented_key
from genserve.errors import BadRequest, Forbidden, PayloadTooLarge
from genserve.loras import SUFFIX, LoraCatalogue
from genserve.routes.intake import refuse_declared_oversize
from genserve.service import get_service

FORM_SLACK_BYTES = 64 * 1024  # multipart boundaries and the small text fields around the file
CHUNK_BYTES = 1024 * 1024


def catalogue(request: Request) -> LoraCatalogue:
    """The service's catalogue, the one requests' LoRAs are checked against."""
    return get_service(request).loras


async def require_admin(request: Request) -> None:
    """With API keys on, the key (already authenticated by authorize) must hold the admin scope."""
    keyring: KeyRing = request.app.state.keyring
    if not keyring.enabled:
        return
    presented = presented_key(request)
    key = keyring.identify(presented) if presented is not None else None
    if key is None or not key.allows("admin"):
        name = key.name if key is not None else "?"
        raise Forbidden(f"API key '{name}' lacks the 'admin' scope this route needs", code="insufficient_scope")


router = APIRouter()


@router.get("/loras", summary="The LoRA catalogue: every LoRA, its rank, format, targets and fit")
async def list_loras(request: Request) -> dict[str, Any]:
    infos = await run_in_threadpool(catalogue(request).list)
    return {"loras": [info.to_json() for info in infos]}


@router.get("/loras/{name}", summary="One LoRA of the catalogue")
async def get_lora(request: Request, name: str) -> dict[str, Any]:
    info = await run_in_threadpool(catalogue(request).get, name)
    return info.to_json()


def _flag(value: str | None, field: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"{field} must be true or false, not {value!r}", param=field)


def _copy_capped(source: Any, target: Path, max_bytes: int, too_large: PayloadTooLarge) -> None:
    """Copy an uploaded (spooled) file into the catalogue's temp file, stopping at the cap (thread pool)."""
    source.seek(0)
    written = 0
    with open(target, "wb") as handle:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > max_bytes:
                raise too_large
            handle.write(chunk)


@router.post(
    "/loras",
    status_code=201,
    dependencies=[Depends(require_admin)],
    summary="Add a LoRA (multipart: file, optional name and overwrite); admin scope",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "a .safetensors LoRA"},
                            "name": {"type": "string", "description": "catalogue name; default: the file's name"},
                            "overwrite": {"type": "boolean", "description": "replace an existing LoRA of that name"},
                        },
                    }
                }
            },
        }
    },
)
async def add_lora(request: Request) -> JSONResponse:
    loras = catalogue(request)
    refuse_declared_oversize(request, loras.max_upload_bytes + FORM_SLACK_BYTES, "loras.max_upload_mb")
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("send the LoRA as a multipart file field named 'file'", param="file")
        filename = Path(upload.filename or "").name
        if filename and not filename.endswith(SUFFIX):
            raise BadRequest(
                f"only {SUFFIX} LoRAs are accepted, not {filename!r} (pickled .ckpt/.pt/.bin files can run code)",
                param="file",
            )
        given = form.get("name")
        name = given if isinstance(given, str) and given.strip() else filename
        if not name:
            raise BadRequest("give the LoRA a name: a 'name' field, or a file name on the upload", param="name")
        overwrite_field = form.get("overwrite")
        overwrite = _flag(request.query_params.get("overwrite"), "overwrite") or _flag(
            overwrite_field if isinstance(overwrite_field, str) else None, "overwrite"
        )
        temp = await run_in_threadpool(loras.new_temp_file)
        try:
            await run_in_threadpool(_copy_capped, upload.file, temp, loras.max_upload_bytes, loras.too_large())
            info = await run_in_threadpool(lambda: loras.add_file(name.strip(), temp, overwrite=overwrite))
        finally:
            await run_in_threadpool(temp.unlink, True)
    finally:
        await form.close()
    return JSONResponse(info.to_json(), status_code=201)


@router.delete(
    "/loras/{name}",
    status_code=204,
    dependencies=[Depends(require_admin)],
    summary="Remove a LoRA from loras.dir; admin scope",
)
async def delete_lora(request: Request, name: str) -> Response:
    await run_in_threadpool(catalogue(request).remove, name)
    return Response(status_code=204)
