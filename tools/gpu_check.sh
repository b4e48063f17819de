#!/usr/bin/env bash
# GenServe's GPU check, in one command, from the repository root of a GPU box (see tools/gpu_check.py for what it
# measures). About 7 minutes on one H100/H200; the model family takes ~32 GiB of disk under /tmp.
#
#     tools/gpu_check.sh                 # the check; report, log and server logs in ${OUT:-/tmp/gpu_check}
#     tools/gpu_check.sh --tiny          # the CPU rehearsal (PYTHON=.venv/bin/python on a development machine)
#
# A box without network access gets the packages it lacks as wheels in .whl/ (made by tools/gpu_wheels.sh on a
# machine with network access): they are installed into /tmp/site, ahead of the box's own packages on PYTHONPATH.
# Extra arguments go to tools/gpu_check.py (--strategies, --budget-s, --model-dir, --rebuild).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1  # every model file is local; the GPU box has no network to wait for
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The wheels are cp312 builds: install them only for a Python 3.12 (the box's), never into a development venv.
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        echo "not installing .whl/: its wheels are for Python 3.12, $PYTHON is $("$PYTHON" -V 2>&1)"
    fi
fi

{
    echo "== machine"
    nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
    echo "cpus $(nproc), $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM, " $7 " GiB available"}')"
    df -h /tmp "$OUT" 2>/dev/null | awk 'NR == 1 || !seen[$0]++'
    echo "== versions"
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0], sys.executable)
packages = ("torch diffusers transformers accelerate huggingface-hub safetensors tokenizers torchao bitsandbytes "
            "fastapi starlette pydantic pydantic-core uvicorn httptools python-multipart anyio h11 click "
            "annotated-doc typing-extensions numpy pillow nvidia-ml-py")
for name in packages.split():
    try:
        print(f"  {name:<18} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name:<18} MISSING")
try:
    import torch

    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
          torch.cuda.get_device_name(0) if cuda else "")
except Exception as exc:  # the check itself reports what this means
    print("torch import failed:", exc)
EOF
    echo "== check"
    "$PYTHON" tools/gpu_check.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
