"""The ``streamfusion`` command.

streamfusion run                 the main job (see ``streamfusion run --help``)
streamfusion bench comm          shm (one-sided) vs gloo collectives, medians and ratios
streamfusion bench attention     every strategy on every transport, medians and ratios
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _world_and_topology(args: argparse.Namespace) -> tuple[int, str]:
    from sf_comm import Topology

    topo = Topology.parse(args.topology) if args.topology else None
    world = args.world or (topo.world_size if topo else 4)
    if topo is None:
        topo = Topology.parse("2x2") if world == 4 else Topology.parse(f"1x{world}")
    if topo.world_size != world:
        raise SystemExit(
            f"streamfusion: --topology {topo} has {topo.world_size} ranks but --world is {world}; "
            f"use a MACHINESxGPUS split whose product is {world}"
        )
    return world, str(topo)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "comm":
        from sf_comm import bench

        sizes = tuple(int(float(s) * 2**20) for s in args.sizes_mb.split(","))
        rows = bench.run(args.world or 4, sizes=sizes, iters=args.iters)
        print(
            f"collectives on {args.world or 4} CPU ranks, shm (one-sided) vs gloo (two-sided); "
            "median of the slowest rank per call"
        )
        print(bench.format_table(rows))
    else:
        from sf_attn import bench as abench

        world, topo = _world_and_topology(args)
        shape = (args.batch, args.seq, args.heads, args.head_dim)
        rows = abench.run(world, topo, shape, _DTYPES[args.dtype], iters=args.iters)
        print(
            f"attention {shape} {args.dtype} on {world} CPU ranks, topology {topo}; "
            "median of the slowest rank per call"
        )
        print(abench.format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import job

    world, topo = _world_and_topology(args)
    strategies = (
        ("ulysses", "ring", "usp", "tas", "torus", "auto")
        if args.strategy == "all"
        else (args.strategy,)
    )
    dtype = _DTYPES[args.dtype]
    print(
        f"streamfusion run: Flux-architecture DiT ({args.config or 'small config, random weights'}), "
        f"{args.height}x{args.width} px, {args.steps} steps, {args.dtype}; {world} CPU ranks, "
        f"emulated topology {topo}, transport {args.transport}"
    )
    cfg_scale = (
        args.cfg_scale if args.cfg_scale is not None else (3.5 if args.cfg_parallel else 1.0)
    )
    if cfg_scale > 1:
        print(
            f"true classifier-free guidance, scale {cfg_scale}"
            + (
                ": the two passes on the two halves of the ranks (CFG parallel)"
                if args.cfg_parallel
                else ""
            )
        )
    try:
        report = job.run(
            world=world,
            topology=topo,
            transport=args.transport,
            strategies=strategies,
            config=args.config,
            height=args.height,
            width=args.width,
            text=args.text,
            steps=args.steps,
            dtype=dtype,
            cfg_scale=cfg_scale,
            cfg_parallel=args.cfg_parallel,
            compile_inner=args.compile,
            out=args.out,
        )
    except ValueError as exc:
        print(f"streamfusion run: {exc}", file=sys.stderr)
        return 2
    name, p_u = report["plan"]
    sp_world = world // 2 if args.cfg_parallel else world
    print(
        f"{report['tokens']} image tokens + {report['text']} text tokens; plan for strategy=auto: "
        f"{name} (Ulysses degree {p_u}, Ring degree {sp_world // p_u})"
    )
    print(f"single process: {report['single_step_s'] * 1e3:.1f} ms/step")
    head = f"{'strategy':<9} {'ms/step':>9} {'vs 1 proc':>10} {'rel err':>9} {'MB/step sent by rank 0':>23}"
    print(head + "\n" + "-" * len(head))
    for strategy, row in report["strategies"].items():
        print(
            f"{strategy:<9} {row['step_s'] * 1e3:9.1f} {report['single_step_s'] / row['step_s']:9.2f}x "
            f"{row['rel_err']:9.1e} {row['bytes_sent_rank0_per_step'] / 1e6:23.1f}"
        )
    tol = 1e-4 if args.dtype == "fp32" else 3e-2
    worst = max(row["rel_err"] for row in report["strategies"].values())
    verdict = "OK" if worst <= tol else "MISMATCH"
    print(f"{verdict}: max relative error vs single process {worst:.1e} (tolerance {tol:g})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "run.json")
        with open(path, "w") as f:
            json.dump({"world": world, "topology": topo, **report}, f, indent=1)
        print(f"wrote {path}")
    return 0 if worst <= tol else 1


def _cmd_trace(args: argparse.Namespace) -> int:
    from sf_attn import tracerun

    shape = (args.batch, args.seq, args.heads, args.head_dim)
    topo = args.topology or "2x2"
    json_path, png_path = tracerun.run(
        strategy=args.strategy,
        topology=topo,
        transport=args.transport,
        shape=shape,
        dtype=_DTYPES[args.dtype],
        out=args.out,
        ulysses_degree=args.ulysses_degree,
    )
    print(
        f"traced {args.strategy} on {topo} ({args.transport}), {shape}: {json_path} (chrome://tracing "
        f"or ui.perfetto.dev), {png_path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, seq: int, heads: int) -> None:
        p.add_argument("--world", type=int, default=None, help="number of CPU ranks (default 4)")
        p.add_argument("--topology", default=None, help="MACHINESxGPUS to emulate (default 2x2)")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--seq", type=int, default=seq, help="global sequence length")
        p.add_argument("--heads", type=int, default=heads)
        p.add_argument("--head-dim", type=int, default=64)
        p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
        p.add_argument("--iters", type=int, default=5)

    run = sub.add_parser(
        "run", help="the main job: a DiT denoising on several ranks, checked against one"
    )
    run.add_argument("--world", type=int, default=None, help="number of CPU ranks (default 4)")
    run.add_argument("--topology", default=None, help="MACHINESxGPUS to emulate (default 2x2)")
    run.add_argument("--model", choices=["flux"], default="flux")
    run.add_argument(
        "--config", default=None, help="local from_pretrained directory of the transformer"
    )
    run.add_argument("--height", type=int, default=512)
    run.add_argument("--width", type=int, default=512)
    run.add_argument("--text", type=int, default=64, help="text tokens")
    run.add_argument("--steps", type=int, default=4)
    run.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    run.add_argument(
        "--strategy", default="all", help="ulysses, ring, usp, tas, torus, auto, or all"
    )
    run.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="true classifier-free guidance scale (> 1 runs a negative-prompt pass)",
    )
    run.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="INNER",
        help='run torch.compile(backend="streamfusion") with this inner backend (default '
        "inductor; minutes on CPU) instead of sf_models.parallelize",
    )
    run.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="run the two guidance passes on the two halves of the ranks (default scale 3.5)",
    )
    run.add_argument("--transport", default="shm", help="shm or gloo")
    run.add_argument("--out", default="out", help="directory for results")
    run.set_defaults(fn=_cmd_run)

    tr = sub.add_parser(
        "trace", help="trace one attention layer on every rank: Chrome JSON + timeline PNG"
    )
    common(tr, seq=4096, heads=8)
    tr.add_argument("--strategy", default="torus")
    tr.add_argument("--ulysses-degree", type=int, default=None)
    tr.add_argument("--transport", default="shm")
    tr.add_argument("--out", default="out")
    tr.set_defaults(fn=_cmd_trace)

    from .simulate_cmd import add_parser as add_simulate

    add_simulate(sub)

    bench = sub.add_parser("bench", help="side-by-side benchmarks")
    bench.add_argument("what", choices=["comm", "attention"])
    common(bench, seq=4096, heads=24)
    bench.add_argument("--sizes-mb", default="0.0625,1,16,64", help="comm: message sizes in MB")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
