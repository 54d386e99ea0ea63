"""The attention hot path on CPU ranks, for before/after tables: every strategy with joint
text, medians of the slowest rank, and the world-1 ratio against one SDPA call.

Runs against whichever StreamFusion is importable, so the same command times an older
checkout (``PYTHONPATH=<old>/packages/sf-attn/src:<old>/packages/sf-comm/src``); a
checkout without sharded text gets the replicated rows only::

    .venv/bin/python tools/hotpath_cpu.py strategies --topology 2x2 --img 2048 --text 512
    .venv/bin/python tools/hotpath_cpu.py world1
    .venv/bin/python tools/hotpath_cpu.py torus-sim   # simulated, no ranks
    .venv/bin/python tools/hotpath_cpu.py models --img 1024 --text 512   # Flux, text layouts

Prints one JSON object: ``{"<strategy>/<layout>": median seconds, ...}`` or, for world1,
``{"<shape>": {"ours_s", "sdpa_s", "cat_sdpa_s", "sdpa/ours", "cat_sdpa/ours"}}`` (sdpa: one
call on the pre-concatenated sequence; cat_sdpa: the concatenation a model does, then the call). Rounds alternate the configurations so
drift hits them alike.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

STRATEGIES = ("usp", "tas", "torus", "ulysses", "ring")
WORLD1_SHAPES = ((4096, 512, 24, 64), (1024, 77, 8, 64))


def _has_sharded_text() -> bool:
    import sf_attn

    return "text" in inspect.signature(sf_attn.parallel_attention).parameters


def timed(
    ctx: Any, strategy: str, layout: str, shape: tuple[int, int, int, int], iters: int
) -> list[float]:
    """Per-call seconds of the slowest rank, ``iters`` calls after one warm-up."""
    import sf_attn

    img, text, heads, dim = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (sf_attn.shard(torch.randn(1, img, heads, dim, generator=g), ctx) for _ in range(3))
    tq, tk, tv = (torch.randn(1, text, heads, dim, generator=g) for _ in range(3))
    extra: dict[str, Any] = {}
    if layout == "sharded":
        tq, tk, tv = (sf_attn.shard(t, ctx) for t in (tq, tk, tv))
        extra = {"text": "sharded", "text_len": text}

    def call() -> Any:
        return sf_attn.parallel_attention(
            q, k, v, ctx=ctx, strategy=strategy, joint=(tq, tk, tv), seq_len=img, **extra
        )

    call()
    times = []
    for _ in range(iters):
        ctx.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return [float(x) for x in worst]


def strategies(args: argparse.Namespace) -> dict[str, float]:
    from sf_comm.launch import RankPool

    machines, gpus = (int(x) for x in args.topology.split("x"))
    layouts = ["replicated"] + (["sharded"] if _has_sharded_text() else [])
    shape = (args.img, args.text, args.heads, args.dim)
    samples: dict[str, list[float]] = {}
    env = {"SF_TOPOLOGY": args.topology, "SF_TIMEOUT": "300"}
    with RankPool(machines * gpus, env=env) as pool:
        for _ in range(args.rounds):
            for layout in layouts:
                for strategy in STRATEGIES:
                    got = pool.run(
                        timed,
                        strategy,
                        layout,
                        shape,
                        args.iters,
                        topology=args.topology,
                        transport="shm",
                        timeout=900,
                    )[0]
                    samples.setdefault(f"{strategy}/{layout}", []).extend(got)
    return {key: statistics.median(v) for key, v in samples.items()}


def world1(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import sf_attn
    import sf_comm

    ctx = sf_comm.init(topology="1x1", transport="shm")
    out: dict[str, dict[str, float]] = {}
    try:
        for img, text, heads, dim in WORLD1_SHAPES:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, img, heads, dim, generator=g) for _ in range(3))
            tq, tk, tv = (torch.randn(1, text, heads, dim, generator=g) for _ in range(3))

            def ours() -> Any:
                joint = (tq, tk, tv)
                return sf_attn.parallel_attention(q, k, v, ctx=ctx, joint=joint, seq_len=img)

            full = [torch.cat([t, x], 1).transpose(1, 2) for t, x in ((tq, q), (tk, k), (tv, v))]

            def sdpa() -> Any:  # one SDPA call on the concatenated sequence
                return F.scaled_dot_product_attention(full[0], full[1], full[2])

            def cat_sdpa() -> Any:  # the stock model path: concatenate, then SDPA (as diffusers)
                fq, fk, fv = (
                    torch.cat([t, x], 1).transpose(1, 2) for t, x in ((tq, q), (tk, k), (tv, v))
                )
                return F.scaled_dot_product_attention(fq, fk, fv)

            streams = [s.clone() for s in full]  # [B, H, T + S, D] -> views as a processor cuts
            views = [s.transpose(1, 2) for s in streams]
            vq, vk, vv = (s[:, text:] for s in views)
            vjoint = tuple(s[:, :text] for s in views)

            def ours_views() -> Any:  # the model path: text and image are views of one stream
                return sf_attn.parallel_attention(
                    vq, vk, vv, ctx=ctx, joint=(vjoint[0], vjoint[1], vjoint[2]), seq_len=img
                )

            calls = {
                "ours_s": ours,
                "ours_views_s": ours_views,
                "sdpa_s": sdpa,
                "cat_sdpa_s": cat_sdpa,
            }
            times: dict[str, list[float]] = {name: [] for name in calls}
            for fn in calls.values():
                fn()
            for _ in range(args.reps):
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) for name, v in times.items()}
            med["sdpa/ours"] = med["sdpa_s"] / med["ours_s"]
            med["cat_sdpa/ours"] = med["cat_sdpa_s"] / med["ours_s"]
            med["sdpa/ours_views"] = med["sdpa_s"] / med["ours_views_s"]
            out[f"{img}+{text} {heads}x{dim}"] = med
    finally:
        ctx.close()
    return out


SIM_CASES = {  # (image/video tokens, text tokens, heads, head_dim)
    "Flux 3072px": (36864, 512, 24, 128),
    "Flux 4096px": (65536, 512, 24, 128),
    "CogVideoX 20s": (55350, 226, 48, 64),
}


def torus_sim(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One simulated Torus layer on p4de machines (rank 0): latency, compute busy against the
    useful attention time (the rank's share of the FLOPs at the device rate), inter-machine
    link busy and idle, attention kernels."""
    import sf_attn
    import sf_comm

    out = {}
    for name, (seq, text, heads, dim) in SIM_CASES.items():
        for machines in (2, 4):
            topo = sf_comm.Topology.preset("p4de", machines=machines)
            r = sf_attn.simulate(
                "torus", topo, seq_len=seq, heads=heads, head_dim=dim, text_len=text
            )
            total = seq + text
            busy = r.breakdown.get("inter", 0.0)
            out[f"{name}, {machines} machines"] = {
                "latency_ms": r.latency_s * 1e3,
                "compute_ms": r.breakdown["compute"] * 1e3,
                "useful_ms": 4e3
                * total
                * total
                * heads
                * dim
                / topo.world_size
                / topo.device_flops,
                "inter_busy_ms": busy * 1e3,
                "inter_idle_ms": (r.latency_s - busy) * 1e3,
                "kernels": sum(1 for e in r.events if e.track == "compute" and e.name == "attn"),
            }
    return out


def flux_step(ctx: Any, layout: Any, img: int, text: int, iters: int) -> list[float]:
    """Seconds per forward (slowest rank) of a random-weight Flux (2 dual + 2 single blocks,
    8 heads x 64) on ``img`` image and ``text`` prompt tokens, parallelized with ``layout``."""
    from diffusers import FluxTransformer2DModel

    from sf_models import parallelize

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=256,
        pooled_projection_dim=64,
        axes_dims_rope=(16, 24, 24),
    )
    model.eval()
    g = torch.Generator().manual_seed(1)
    side = int(img**0.5)
    img_ids = torch.stack(
        torch.meshgrid(
            torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"
        ),
        -1,
    ).reshape(-1, 3)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 16, generator=g),
        encoder_hidden_states=torch.randn(1, text, 256, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
    )
    sp = parallelize(model, ctx=ctx, strategy="usp", text=layout)
    times = []
    with torch.no_grad():
        sp(**inputs)
        for _ in range(iters):
            ctx.barrier()
            t0 = time.perf_counter()
            sp(**inputs)
            times.append(time.perf_counter() - t0)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return [float(x) for x in worst]


def models(args: argparse.Namespace) -> dict[str, float]:
    """Flux forward, text replicated vs sharded, side by side (median seconds, ratio)."""
    from sf_comm.launch import RankPool

    machines, gpus = (int(x) for x in args.topology.split("x"))
    samples: dict[str, list[float]] = {}
    env = {"SF_TOPOLOGY": args.topology, "SF_TIMEOUT": "300"}
    with RankPool(machines * gpus, env=env) as pool:
        for _ in range(args.rounds):
            for layout in ("replicated", "sharded"):
                got = pool.run(
                    flux_step,
                    layout,
                    args.img,
                    args.text,
                    args.iters,
                    topology=args.topology,
                    transport="shm",
                    timeout=900,
                )[0]
                samples.setdefault(layout, []).extend(got)
    med = {layout: statistics.median(v) for layout, v in samples.items()}
    return {**med, "replicated/sharded": med["replicated"] / med["sharded"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("strategies")
    s.add_argument("--topology", default="2x2")
    s.add_argument("--img", type=int, default=2048)
    s.add_argument("--text", type=int, default=512)
    s.add_argument("--heads", type=int, default=24)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--iters", type=int, default=3)
    w = sub.add_parser("world1")
    w.add_argument("--reps", type=int, default=9)
    w.add_argument("--threads", type=int, default=2)
    sub.add_parser("torus-sim")
    m = sub.add_parser("models")
    m.add_argument("--topology", default="2x2")
    m.add_argument("--img", type=int, default=1024, help="image tokens (a square number)")
    m.add_argument("--text", type=int, default=512)
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--iters", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "torus-sim":
        print(json.dumps(torus_sim(args)))
    elif args.what == "models":
        print(json.dumps(models(args)))
    elif args.what == "world1":
        torch.set_num_threads(args.threads)
        print(json.dumps(world1(args)))
    else:
        print(json.dumps(strategies(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
