"""The hot path on one device: world-1 ``parallel_attention`` against one SDPA call.

For each shape (tokens + joint text, heads x head_dim) in bf16 with the log-sum-exp path:
the kernel ``auto`` chose (and every measured kernel's probe time, from its log line), the
median time of ``sf_attn.parallel_attention(q, k, v, joint=...)`` on a world of one, and of
one ``F.scaled_dot_product_attention`` over the concatenated [text, image] sequence, timed
alternately in one run; the ratio sdpa/ours is the engine's overhead (goal >= 0.95 on a GPU),
also with text and image as two views of one projected stream (what the model processors
pass). Then one rank's compute of a blocked Ring and of Torus at P = 8/16/32 ranks (8 per
machine), kernel by kernel with the merges, against one call over the same rows and keys
(goal >= 0.9); and the merge kernel's bandwidth against a device copy of the same bytes.

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

            streams = [x.clone() for x in (fq, fk, fv)]  # [B, H, T + S, D] in [B, S, H, D] memory
            views = [x.transpose(1, 2) for x in streams]

            def ours_views() -> Any:
                vq, vk, vv = (x[:, text:] for x in views)
                tq_, tk_, tv_ = (x[:, :text] for x in views)
                return sf_attn.parallel_attention(
                    vq, vk, vv, ctx=ctx, joint=(tq_, tk_, tv_), seq_len=img
                )

            out, text_out = ours()  # warm-up (and the kernel probe)
            ref = sdpa().transpose(1, 2)
            err = max(
                float((out.float() - ref[:, text:].float()).abs().max()),
                float((text_out.float() - ref[:, :text].float()).abs().max()),
            )
            sdpa()
            ours_views()
            a, b, c = [], [], []
            for _ in range(reps):  # alternate, so drift hits all alike
                a.append(_median_ms(ours, device, 1))
                b.append(_median_ms(sdpa, device, 1))
                c.append(_median_ms(ours_views, device, 1))
            ours_ms, sdpa_ms = statistics.median(a), statistics.median(b)
            views_ms = statistics.median(c)
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
                    views_ms=views_ms,
                    ratio_views=sdpa_ms / views_ms,
                    max_abs_err=err,
                )
            )
            print(
                f"{name:<12} {img}+{text} x {heads}x{dim}: kernel {kernel}, ours {ours_ms:.3f} ms, "
                f"sdpa {sdpa_ms:.3f} ms, sdpa/ours {sdpa_ms / ours_ms:.2f} "
                f"(views {sdpa_ms / views_ms:.2f}), max err {err:.1e}",
                flush=True,
            )
    finally:
        ctx.close()
    return rows


def blocked(
    device: torch.device, dtype: torch.dtype, reps: int, small: bool
) -> list[dict[str, Any]]:
    """One rank's attention compute under a blocked Ring and under Torus at P ranks (8 per
    machine), kernel by kernel with the merges, against one call over the same rows and keys
    (Flux 2048px: 16384 tokens x 24 heads x 128; small: 2048 x 8 x 64)."""
    from sf_attn.backends import attention_with_lse
    from sf_attn.joint import Accumulator

    seq, heads, dim = (2048, 8, 64) if small else (16384, 24, 128)
    rows = []
    for p in (8, 16, 32):
        gpus = 8
        n, p_r = max(1, p // gpus), min(p, gpus)  # torus group (machines), ring (a machine)
        chunk = seq // p
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device, dtype)

        # Ring: this rank's rows against P key blocks.
        q, k, v = rand(1, chunk, heads, dim), rand(1, seq, heads, dim), rand(1, seq, heads, dim)

        def ring() -> Any:
            acc = Accumulator()
            for b in range(p):
                blk = slice(b * chunk, (b + 1) * chunk)
                acc.add(*attention_with_lse(q, k[:, blk], v[:, blk]))
            return acc.result(dtype)

        def ring_one() -> Any:
            return attention_with_lse(q, k, v)[0]

        # Torus: head group t (heads / N), every torus member's rows (N chunks); blocks:
        # own, ring peers, one gathered stage per member (Note [Torus schedule]).
        h_t = max(1, heads // n)
        tq, tk, tv = rand(1, n * chunk, h_t, dim), rand(1, seq, h_t, dim), rand(1, seq, h_t, dim)
        stage = p_r * chunk  # a stage's gathered keys

        def torus() -> Any:
            acc_l, acc_r = Accumulator(), Accumulator()
            local, remote = tq[:, (n - 1) * chunk :], tq[:, : (n - 1) * chunk]
            acc_l.add(*attention_with_lse(local, tk[:, :chunk], tv[:, :chunk]))
            if p_r > 1:
                acc_l.add(*attention_with_lse(local, tk[:, chunk:stage], tv[:, chunk:stage]))
            for j in range(1, n):
                blk = slice(j * stage, (j + 1) * stage)
                if j < n - 1:
                    o, lse = attention_with_lse(tq, tk[:, blk], tv[:, blk])
                    acc_r.add(o[:, : (n - 1) * chunk], lse[:, :, : (n - 1) * chunk])
                    acc_l.add(o[:, (n - 1) * chunk :], lse[:, :, (n - 1) * chunk :])
                else:
                    keys = torch.cat([tk[:, :stage], tk[:, blk]], 1)
                    values = torch.cat([tv[:, :stage], tv[:, blk]], 1)
                    acc_r.add(*attention_with_lse(remote, keys, values))
                    acc_l.add(*attention_with_lse(local, tk[:, blk], tv[:, blk]))
            return acc_l.result(dtype)

        def torus_one() -> Any:
            return attention_with_lse(tq, tk, tv)[0]

        for fn in (ring, ring_one, torus, torus_one):
            fn()
        times: dict[str, list[float]] = {"ring": [], "ring_one": [], "torus": [], "torus_one": []}
        for _ in range(reps):
            for name, fn in (("ring", ring), ("ring_one", ring_one), ("torus", torus)):
                times[name].append(_median_ms(fn, device, 1))
            times["torus_one"].append(_median_ms(torus_one, device, 1))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = dict(
            p=p,
            ring_ms=med["ring"],
            ring_one_ms=med["ring_one"],
            ring_efficiency=med["ring_one"] / med["ring"],
            torus_ms=med["torus"],
            torus_one_ms=med["torus_one"],
            torus_efficiency=med["torus_one"] / med["torus"],
        )
        rows.append(row)
        print(
            f"P={p:<3} ring {row['ring_efficiency']:.2f} of one call ({p} kernels), torus "
            f"{row['torus_efficiency']:.2f} (N={n}, ring {p_r})",
            flush=True,
        )
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
        "blocked": blocked(device, DTYPES[args.dtype], args.reps, args.small),
        "merge": merge_bandwidth(device, args.reps, args.small),
        "command": " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
