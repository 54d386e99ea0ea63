"""The hot path on one device: world-1 ``parallel_attention`` against one SDPA call.

For each shape (tokens + joint text, heads x head_dim) in bf16 with the log-sum-exp path:
the kernel ``auto`` chose (and every measured kernel's probe time, from its log line), the
median time of ``sf_attn.parallel_attention(q, k, v, joint=...)`` on a world of one, and of
one ``F.scaled_dot_product_attention`` over the concatenated [text, image] sequence, timed
alternately in one run; the ratio sdpa/ours is the engine's overhead (goal >= 0.95 on a GPU).
Then the merge kernel's bandwidth against a device copy of the same bytes.

    python tools/gpu_hotpath.py --json results/gpu_hotpath.json            # on a GPU
    python tools/gpu_hotpath.py --device cpu --dtype fp32 --small          # plumbing check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
for sub in ("sf-comm", "sf-attn"):
    sys.path.insert(0, os.path.join(HERE, "..", "packages", sub, "src"))

import torch
import torch.nn.functional as F

import sf_attn
import sf_comm

SHAPES = {  # name: (image tokens, text tokens, heads, head_dim), from the table
    "flux-1024px": (4096, 512, 24, 128),
    "flux-2048px": (16384, 512, 24, 128),
    "cogvideox": (17550, 226, 48, 64),
}
SMALL = {"small": (1024, 77, 8, 64)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Any, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def world_one(shapes: dict[str, Any], device: torch.device, dtype: torch.dtype, reps: int) -> list:
    ctx = sf_comm.init(topology="1x1", transport="auto", device=device)
    rows = []
    try:
        for name, (img, text, heads, dim) in shapes.items():
            g = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(1, img, heads, dim, generator=g).to(device, dtype) for _ in range(3)
            )
            tq, tk, tv = (
                torch.randn(1, text, heads, dim, generator=g).to(device, dtype) for _ in range(3)
            )
            joint = (tq, tk, tv)
            fq, fk, fv = (torch.cat([t, x], 1).transpose(1, 2) for t, x in zip(joint, (q, k, v)))

            def ours() -> Any:
                return sf_attn.parallel_attention(
                    q,
                    k,
                    v,
                    ctx=ctx,
                    joint=joint,
                    seq_len=img,  # type: ignore[arg-type]
                )

            def sdpa() -> Any:
                return F.scaled_dot_product_attention(fq, fk, fv)

            out, text_out = ours()  # warm-up (and the kernel probe)
            ref = sdpa().transpose(1, 2)
            err = max(
                float((out.float() - ref[:, text:].float()).abs().max()),
                float((text_out.float() - ref[:, :text].float()).abs().max()),
            )
            sdpa()
            a, b = [], []
            for _ in range(reps):  # alternate, so drift hits both alike
                a.append(_median_ms(ours, device, 1))
                b.append(_median_ms(sdpa, device, 1))
            ours_ms, sdpa_ms = statistics.median(a), statistics.median(b)
            kernel = sf_attn.backends.choose_kernel(q, None).name
            rows.append(
                dict(
                    shape=name,
                    tokens=img,
                    text=text,
                    heads=heads,
                    head_dim=dim,
                    kernel=kernel,
                    parallel_attention_ms=ours_ms,
                    sdpa_ms=sdpa_ms,
                    ratio=sdpa_ms / ours_ms,
                    max_abs_err=err,
                )
            )
            print(
                f"{name:<12} {img}+{text} x {heads}x{dim}: kernel {kernel}, ours {ours_ms:.3f} ms, "
                f"sdpa {sdpa_ms:.3f} ms, sdpa/ours {sdpa_ms / ours_ms:.2f}, max err {err:.1e}",
                flush=True,
            )
    finally:
        ctx.close()
    return rows


def merge_bandwidth(device: torch.device, reps: int, small: bool) -> dict[str, float]:
    """The fused merge (acc += block, in place) against copying the same bytes."""
    rows, heads, dim = (4096, 8, 64) if small else (16896, 24, 128)
    acc = torch.zeros(1, rows, heads, dim, device=device)
    acc_lse = torch.zeros(1, heads, rows, device=device)
    o = torch.randn(1, rows, heads, dim, device=device).to(torch.bfloat16)
    lse = torch.randn(1, heads, rows, device=device)
    nbytes = 2 * acc.numel() * 4 + o.numel() * 2  # read acc and block, write acc
    merge_ms = _median_ms(lambda: sf_attn.merge_attention_(acc, acc_lse, o, lse), device, reps)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, reps)  # reads and writes nbytes
    out = dict(
        merge_ms=merge_ms,
        merge_gbs=nbytes / merge_ms / 1e6,
        copy_gbs=nbytes / copy_ms / 1e6,
    )
    out["merge_vs_copy"] = out["merge_gbs"] / out["copy_gbs"]
    print(
        f"merge {out['merge_gbs']:.0f} GB/s, copy {out['copy_gbs']:.0f} GB/s, "
        f"ratio {out['merge_vs_copy']:.2f}",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="one small shape (plumbing check)")
    parser.add_argument("--json", default=None, metavar="OUT.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the kernel choice lines
    device = torch.device(args.device)
    shapes = SMALL if args.small else SHAPES
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "world_one": world_one(shapes, device, DTYPES[args.dtype], args.reps),
        "merge": merge_bandwidth(device, args.reps, args.small),
        "command": " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
