#!/usr/bin/env bash
# Download into .whl/ the wheels that tools/gpu_check.sh installs on a GPU box without network access.
#
# Run it HERE (a machine with network access), from any directory, before copying the repo to the GPU box:
#     tools/gpu_wheels.sh
# The box runs Python 3.12 (cp312, manylinux x86_64) with torch 2.11+cu130, transformers 5.17, accelerate 1.15,
# huggingface_hub 1.33, safetensors 0.8, numpy, pillow, psutil, pyyaml, requests, httpx, uvloop, anyio, h11, click,
# annotated-doc, packaging and sentencepiece already installed. It lacks the server's own stack (diffusers, FastAPI,
# pydantic, uvicorn) and the quantisation libraries. Only those travel, one pinned version each, with --no-deps:
# every Requires-Dist of these wheels is either in this list or already on the box (each line says which).
#
# Everything that travels (the working tree plus .whl/) must stay under 64 MiB; the script prints the total and
# fails when it is over.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
LIMIT_MIB=64

# name==version   # why this version, and what its Requires-Dist needs from the box
WHEELS=(
    diffusers==0.42.1            # what GenServe is tested with; huggingface-hub>=1.32 (box 1.33), safetensors>=0.8;
                                 # its importlib_metadata is imported only on Python < 3.8
    torchao==0.17.0              # the release for torch 2.11 (0.16 is 2.10's; its kernels load with torch>=2.11)
    bitsandbytes==0.50.2         # nf4; ships libbitsandbytes_cuda130.so for torch+cu130; torch>=2.4, numpy, packaging
    fastapi==0.165.0             # starlette, pydantic, typing-inspection, opentelemetry-api (here); anyio, annotated-doc
    starlette==1.10.0            # anyio>=4 (box)
    pydantic==2.14.4             # pins pydantic-core==2.50.5; annotated-types, typing-inspection (here)
    pydantic-core==2.50.5        # compiled, cp312
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0    # the box has one, but pydantic 2.14 needs >=4.16 and 45 kB buys certainty
    opentelemetry-api==1.45.2    # imported by fastapi's applications module; needs only typing-extensions
    uvicorn==0.54.0              # click, h11 (box)
    httptools==0.9.0             # compiled, cp312: genserve/edge.py builds on uvicorn's httptools protocol
    python-multipart==0.0.34     # form-data routes
)

rm -rf .whl
mkdir -p .whl
# pip matches manylinux_2_N tags exactly, so name every N these wheels are published for.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any \
    -d .whl "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true

# Exactly one wheel per name: two versions of one package stop the whole install on the box.
missing=0
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    file_prefix=$(echo "$name" | tr '-' '_')
    count=$(find .whl -maxdepth 1 -iname "${file_prefix}-*.whl" | wc -l)
    if [ "$count" -ne 1 ]; then
        echo "gpu_wheels: expected one wheel of $name in .whl/, found $count" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1

echo "wheels in .whl/:"
ls -l .whl | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
wheels_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
# What travels: tracked files plus untracked files git does not ignore, plus .whl/.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
    | awk '$2 == "total" {sum += $1} END {print sum + 0}')
total_bytes=$((wheels_bytes + tree_bytes))
awk -v w="$wheels_bytes" -v t="$tree_bytes" -v a="$total_bytes" -v l="$LIMIT_MIB" 'BEGIN {
    printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB (limit %d MiB)\n", w / 1048576, t / 1048576, a / 1048576, l
}'
if [ "$total_bytes" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels: over the ${LIMIT_MIB} MiB limit: drop a wheel or shrink the tree" >&2
    exit 1
fi
