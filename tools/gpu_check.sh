#!/usr/bin/env bash
# GenServe's GPU check and GPU benchmark, in one command, from the repository root of a GPU box. Both serve a
# full-size random-weight FLUX.1-dev family that the first of them builds on the card (~32 GiB of disk under /tmp,
# --model-dir elsewhere; ~2 minutes) and the other reuses.
#
#     tools/gpu_check.sh                # the memory check (tools/gpu_check.py: planned vs peak memory per strategy);
#                                       # about 8 minutes on one H100/H200
#     tools/gpu_check.sh --bench        # the check, then the speed benchmark (tools/bench_gpu.py: eager, compile,
#                                       # compile + fused QKV + best attention, + fp8; 1024², 28 steps) on the same
#                                       # family: about 8 + 7 minutes
#     tools/gpu_check.sh --bench-only   # the benchmark alone, the family built first unless it is there: fits one
#                                       # 10-minute call (budget 520 s)
#     tools/gpu_check.sh --tiny [--bench | --bench-only]   # the CPU rehearsals (PYTHON=.venv/bin/python on a
#                                       # development machine): a few minutes each
#     BENCH=1 / BENCH=only tools/gpu_check.sh ...          # the same as --bench / --bench-only
#
# Reports and server logs go to ${OUT:-/tmp/gpu_check} (gpu_check.md/.json) and $OUT/bench (bench_gpu.md/.json, and
# the compile cache: a rerun with the same OUT loads compiled kernels instead of compiling); the log of everything
# to $OUT/gpu_check.log. --tiny and --model-dir DIR go to both stages; other arguments go to the stage that runs
# first: gpu_check.py (--strategies, --budget-s, --rebuild), or with --bench-only bench_gpu.py (--variants, --runs,
# --budget-s, --cold-cache, --rebuild). BENCH_ARGS="--variants eager,fp8" adds arguments to the benchmark after the
# check.
#
# A box without network access gets the packages it lacks as wheels in .whl/ (made by tools/gpu_wheels.sh on a
# machine with network access): they are installed into /tmp/site, ahead of the box's own packages on PYTHONPATH.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH=${BENCH:-}
shared=()  # to both stages
rest=()    # to the first stage
while [ $# -gt 0 ]; do
    case "$1" in
        --bench) BENCH=1 ;;
        --bench-only) BENCH=only ;;
        --tiny | --model-dir=*) shared+=("$1") ;;
        --model-dir) shared+=("$1" "${2:?--model-dir needs a folder}"); shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
case "$BENCH" in
    "" | 0 | no) BENCH="" ;;
    only) ;;
    *) BENCH=1 ;;
esac
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
    status=0
    if [ "$BENCH" != only ]; then
        echo "== check"
        "$PYTHON" tools/gpu_check.py --out "$OUT" ${shared[@]+"${shared[@]}"} ${rest[@]+"${rest[@]}"}
        status=$?
    fi
    if [ "$BENCH" = only ]; then
        bench_args=(${rest[@]+"${rest[@]}"})
    else
        read -r -a bench_args <<<"${BENCH_ARGS:-}"
    fi
    if [ -n "$BENCH" ] && [ "$status" -eq 2 ]; then
        echo "== bench: not run, the check could measure nothing (see above)"
    elif [ -n "$BENCH" ]; then
        echo "== bench"
        "$PYTHON" tools/bench_gpu.py --out "$OUT/bench" ${shared[@]+"${shared[@]}"} ${bench_args[@]+"${bench_args[@]}"}
        bench_status=$?
        [ "$status" -ne 0 ] || status=$bench_status
    fi
    exit "$status"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
