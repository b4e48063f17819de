#!/usr/bin/env python3
"""What int8 weight-only quantisation costs and saves on the CPU: error against the unquantised model, memory, time.

Phase 1 (the service): two servers of the tool's own on the embedded model, one CPU worker each: ``pinned``
(fp32, as planned by default on a CPU) and ``int8`` (``memory.strategy: quantized``, ``auto_quantization: int8``:
the base, Fill and ControlNet transformers quantised by torchao through diffusers). Each runs the same text2img
jobs (same prompts and seeds). Reported: each component's weight bytes from the worker's memory plan (the plan's
estimates equal the allocated bytes: tests/unit/test_memory_plan.py), the median pipeline time, and the image
error of int8 against fp32 (mean and max absolute pixel difference out of 255, PSNR). The embedded model is tiny,
so its time is mostly the VAE: phase 1 shows the service path works and how far the images move, not the speed.

Phase 2 (a full-width block, in this process): one FLUX single-stream transformer block at FLUX.1-dev's real width
(3072, 24 heads) on the CPU, fp32 against the same block quantised int8 weight-only with torchao (the config
diffusers' TorchAoConfig applies). Reported: weight bytes, forward time (median of --repeats, after a warm-up) over
--tokens tokens, and the output's relative error. This is where int8's speed and memory on a CPU show.

Usage:
    .venv/bin/python tools/bench_quantization.py                 # both phases
    .venv/bin/python tools/bench_quantization.py --skip-block --jobs 5 --size 512 --steps 8
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from typing import Any

import numpy as np
import requests
from PIL import Image

from _server import ServerError, add_embedded_cache_argument, local_server

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"memory": {"strategy": "pinned"}},
    "int8": {"memory": {"strategy": "quantized", "auto_quantization": "int8"}},
}
PROMPTS = ("a lighthouse at dusk", "a bowl of ramen, studio light", "an old map of a coastline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="text2img jobs per server (phase 1)")
    parser.add_argument("--size", type=int, default=512, help="image width and height (phase 1)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (phase 1)")
    add_embedded_cache_argument(parser)
    parser.add_argument("--skip-block", action="store_true", help="skip phase 2")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens through the block (phase 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (phase 2)")
    return parser.parse_args(argv)


# --- phase 1: the service --------------------------------------------------------------------------------------


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = {
        **VARIANTS[name],
        "model": {"embedded_cache_dir": str(args.embedded_cache)},
        "workers": {"cpu_workers": 1, "max_restarts": 0, "on_budget_spent": "exit"},
    }
    print(f"phase 1: starting the {name} server", file=sys.stderr)
    with local_server(config, ready_timeout_s=600) as server:
        worker = server.status()["workers"][0]
        images, pipeline_s = [], []
        session = requests.Session()
        for index in range(args.jobs + 1):  # the first is a warm-up, not timed
            answer = session.post(
                f"{server.url}/generate",
                json={
                    "prompt": PROMPTS[index % len(PROMPTS)],
                    "width": args.size,
                    "height": args.size,
                    "num_inference_steps": args.steps,
                    "seed": 1000 + index,
                },
                timeout=600,
            )
            body = answer.json()
            if answer.status_code != 200 or not body.get("success"):
                raise ServerError(f"{name}: POST /generate answered {answer.status_code}: {body.get('error')}")
            image = Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))
            images.append(np.asarray(image.convert("RGB"), dtype=np.float64))
            if index:
                pipeline_s.append(float(body["timings"]["pipeline_s"]))
    return {"plan": worker["memory_plan"], "images": images, "pipeline_s": statistics.median(pipeline_s)}


def image_error(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    differences = [np.abs(a - b) for a, b in zip(reference, other, strict=True)]
    mse = float(np.mean([np.mean(d**2) for d in differences]))
    return {
        "mean_abs": float(np.mean([d.mean() for d in differences])),
        "max_abs": float(max(d.max() for d in differences)),
        "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
    }


def print_service(results: dict[str, dict[str, Any]], error: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\nphase 1: embedded model, {args.jobs} text2img jobs at {args.size}², {args.steps} steps, one CPU worker")
    names = [c["name"] for c in results["fp32"]["plan"]["components"]]
    print(f"  {'component':<16}{'fp32 bytes':>14}{'int8 bytes':>14}{'ratio':>8}")
    for name in names:
        fp32, int8 = (
            next(c for c in results[v]["plan"]["components"] if c["name"] == name)["bytes"] for v in ("fp32", "int8")
        )
        print(f"  {name:<16}{fp32:>14,.0f}{int8:>14,.0f}{int8 / fp32:>8.2f}")
    fp32_s, int8_s = results["fp32"]["pipeline_s"], results["int8"]["pipeline_s"]
    print(
        f"  pipeline time (median): fp32 {fp32_s * 1000:.0f} ms, int8 {int8_s * 1000:.0f} ms ({int8_s / fp32_s:.2f}x)"
    )
    print(
        f"  int8 vs fp32 image: mean |diff| {error['mean_abs']:.3f}/255, max {error['max_abs']:.0f}/255, "
        f"PSNR {error['psnr_db']:.1f} dB"
    )


# --- phase 2: one full-width block -----------------------------------------------------------------------------


def run_block(args: argparse.Namespace) -> dict[str, float]:
    from genserve.library_noise import quiet_library_noise

    quiet_library_noise()  # before diffusers (and with it torchao) is imported
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    print("phase 2: a full-width FLUX single-stream block", file=sys.stderr)
    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
    text_tokens = args.tokens // 4  # the rest are image tokens; the block sees them joined
    image = torch.randn(1, args.tokens - text_tokens, 3072)
    text = torch.randn(1, text_tokens, 3072)
    temb = torch.randn(1, 3072)
    rotary = (torch.ones(args.tokens, 128), torch.zeros(args.tokens, 128))

    def forward(module: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            text_out, image_out = module(image, text, temb, image_rotary_emb=rotary)
            return torch.cat([text_out, image_out], dim=1)

    def timed(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
        output = forward(module)  # warm-up
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            output = forward(module)
            times.append(time.perf_counter() - began)
        return output, statistics.median(times)

    def weight_bytes(module: torch.nn.Module) -> int:
        total = 0
        for tensor in module.parameters():
            flatten = getattr(tensor, "__tensor_flatten__", None)  # a quantised tensor: its inner tensors hold it
            inner = flatten()[0] if flatten is not None and type(tensor) is not torch.nn.Parameter else []
            parts = [getattr(tensor, name) for name in inner] or [tensor]
            total += sum(part.numel() * part.element_size() for part in parts)
        return total

    reference, fp32_s = timed(block)
    fp32_bytes = weight_bytes(block)
    quantize_(block, Int8WeightOnlyConfig())
    quantised, int8_s = timed(block)
    error = float((quantised - reference).norm() / reference.norm())
    return {
        "fp32_bytes": fp32_bytes,
        "int8_bytes": weight_bytes(block),
        "fp32_s": fp32_s,
        "int8_s": int8_s,
        "relative_error": error,
        "threads": float(torch.get_num_threads()),
    }


def print_block(figures: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\nphase 2: FLUX single-stream block, width 3072, {args.tokens} tokens, {figures['threads']:.0f} threads")
    print(
        f"  weights: fp32 {figures['fp32_bytes'] / 2**20:.0f} MiB, int8 {figures['int8_bytes'] / 2**20:.0f} MiB "
        f"({figures['int8_bytes'] / figures['fp32_bytes']:.2f}x)"
    )
    print(
        f"  forward (median of {args.repeats}): fp32 {figures['fp32_s'] * 1000:.0f} ms, "
        f"int8 {figures['int8_s'] * 1000:.0f} ms ({figures['int8_s'] / figures['fp32_s']:.2f}x)"
    )
    print(f"  output relative error (L2): {figures['relative_error']:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = {name: run_variant(name, args) for name in VARIANTS}
    except (ServerError, requests.RequestException) as exc:
        print(f"bench_quantization: {exc}", file=sys.stderr)
        return 1
    print_service(results, image_error(results["fp32"]["images"], results["int8"]["images"]), args)
    if not args.skip_block:
        print_block(run_block(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
