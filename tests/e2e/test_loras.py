"""The LoRA catalogue over HTTP against one real server with API keys on (admin, generate+read, read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ServerFactory
from tests.server import GenServeProcess

ADMIN = "admin-lora-key-000001"
USER = "user-lora-key-0000001"  # generate + read
READER = "reader-lora-key-00001"  # read only
MAX_UPLOAD_MB = 0.05  # ~52 KB: the embedded LoRAs are 5-8 KB
MAX_REQUEST_MB = 0.02  # ~20 KB: a LoRA upload may be larger than any other request (its own cap)


@pytest.fixture(scope="module")
def served(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> GenServeProcess:
    loras = tmp_path_factory.mktemp("loras")
    return start_server(
        {"loras": {"dir": str(loras), "max_upload_mb": MAX_UPLOAD_MB}, "server": {"max_request_mb": MAX_REQUEST_MB}},
        env={"GENSERVE_API_KEYS": f"ops:{ADMIN}:admin;user:{USER}:generate,read;reader:{READER}:read"},
        in_process=True,
    )


@pytest.fixture(scope="module")
def style_bytes(embedded_cache: Path, served: GenServeProcess) -> bytes:
    paths = list(embedded_cache.glob("flux-embedded-v*/loras/embedded-style.safetensors"))
    assert len(paths) == 1, paths
    return paths[0].read_bytes()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def listing(server: GenServeProcess, key: str = READER) -> dict[str, Any]:
    response = requests.get(f"{server.url}/loras", headers=bearer(key), timeout=120)
    assert response.status_code == 200, response.text
    return {lora["name"]: lora for lora in response.json()["loras"]}


def upload(
    server: GenServeProcess,
    data: bytes,
    filename: str = "upload.safetensors",
    key: str = ADMIN,
    **fields: str,
) -> requests.Response:
    return requests.post(
        f"{server.url}/loras",
        files={"file": (filename, data, "application/octet-stream")},
        data=fields,
        headers=bearer(key),
        timeout=60,
    )


def test_the_embedded_loras_are_listed(served: GenServeProcess) -> None:
    loras = listing(served)
    assert {"embedded-style", "embedded-detail"} <= set(loras)
    style = loras["embedded-style"]
    assert style["rank"] == 4 and style["format"] == "diffusers" and style["embedded"] is True
    assert style["fits"] == {"transformer": True, "fill": True}
    assert style["target_module_count"] == 4 == len(style["target_modules"])
    assert "transformer_blocks.0.attn.to_q" in style["target_modules"]
    assert loras["embedded-detail"]["target_module_count"] == 5


def test_upload_list_conflict_overwrite_delete(served: GenServeProcess, style_bytes: bytes) -> None:
    added = upload(served, style_bytes, filename="my-style.safetensors")
    assert added.status_code == 201, added.text
    assert added.json()["name"] == "my-style" and added.json()["embedded"] is False
    assert added.json()["bytes"] == len(style_bytes)
    assert "my-style" in listing(served)
    one = requests.get(f"{served.url}/loras/my-style", headers=bearer(READER), timeout=10)
    assert one.status_code == 200 and one.json()["rank"] == 4

    again = upload(served, style_bytes, filename="my-style.safetensors")
    assert again.status_code == 409 and "already exists" in again.json()["error"]
    replaced = upload(served, style_bytes, name="my-style", overwrite="true")
    assert replaced.status_code == 201, replaced.text

    gone = requests.delete(f"{served.url}/loras/my-style", headers=bearer(ADMIN), timeout=10)
    assert gone.status_code == 204 and gone.content == b""
    assert "my-style" not in listing(served)
    missing = requests.delete(f"{served.url}/loras/my-style", headers=bearer(ADMIN), timeout=10)
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_garbage_is_400_with_a_clear_message(served: GenServeProcess) -> None:
    response = upload(served, b"this is not a safetensors file at all", name="garbage")
    assert response.status_code == 400
    assert "not a safetensors file" in response.json()["error"]
    assert "garbage" not in listing(served)


def test_a_pickle_file_name_is_refused(served: GenServeProcess, style_bytes: bytes) -> None:
    response = upload(served, style_bytes, filename="style.ckpt")
    assert response.status_code == 400 and ".safetensors" in response.json()["error"]


def test_oversize_is_413(served: GenServeProcess) -> None:
    response = upload(served, b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 * 2), name="huge")
    assert response.status_code == 413 and response.json()["error_type"] == "payload_too_large"


def test_a_lora_larger_than_the_request_cap_uploads_under_its_own_cap(
    served: GenServeProcess, style_bytes: bytes
) -> None:
    from safetensors.torch import load, save

    # The same LoRA, its header padded with metadata: ~30 KB, over server.max_request_mb, within loras.max_upload_mb.
    padded = save(load(style_bytes), metadata={"padding": "x" * 30_000})
    assert MAX_REQUEST_MB * 2**20 < len(padded) < MAX_UPLOAD_MB * 2**20
    response = upload(served, padded, name="padded")
    assert response.status_code == 201, response.text
    generate = requests.post(f"{served.url}/generate", json={"prompt": "x" * 30_000}, headers=bearer(USER), timeout=30)
    assert generate.status_code == 413 and "server.max_request_mb" in generate.json()["error"]
    assert requests.delete(f"{served.url}/loras/padded", headers=bearer(ADMIN), timeout=10).status_code == 204


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "with space"])
def test_a_bad_name_is_400(served: GenServeProcess, style_bytes: bytes, name: str) -> None:
    response = upload(served, style_bytes, name=name)
    assert response.status_code == 400 and "invalid LoRA name" in response.json()["error"]


def test_changing_the_catalogue_needs_admin(served: GenServeProcess, style_bytes: bytes) -> None:
    assert requests.get(f"{served.url}/loras", timeout=10).status_code == 401
    for key in (USER, READER):
        refused = upload(served, style_bytes, name="not-admin", key=key)
        assert refused.status_code == 403 and refused.json()["error_type"] == "forbidden"
        deleted = requests.delete(f"{served.url}/loras/embedded-style", headers=bearer(key), timeout=10)
        assert deleted.status_code == 403
    assert "not-admin" not in listing(served, USER)
