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
    from sf_attn import bench as abench
    from sf_attn.planner import choose_strategy
    from sf_comm import Topology

    world, topo = _world_and_topology(args)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    strategies = tuple(abench.STRATEGIES) if args.strategy == "all" else (args.strategy,)
    chosen, p_u = choose_strategy(Topology.parse(topo), heads=args.heads, seq_len=args.seq)
    print(
        f"streamfusion run: sequence-parallel attention {shape} {args.dtype}, {world} CPU ranks, "
        f"emulated topology {topo}, transport {args.transport}"
    )
    print(f"plan for strategy=auto: {chosen} (Ulysses degree {p_u}, Ring degree {world // p_u})")
    rows = abench.run(
        world,
        topo,
        shape,
        _DTYPES[args.dtype],
        strategies=strategies,
        transports=(args.transport,),
        iters=args.iters,
        rounds=1,
    )
    print(abench.format_table(rows))
    tol = 1e-4 if args.dtype == "fp32" else 5e-2
    worst = max(r["max_abs_err"] for r in rows)
    print(f"max |parallel - single process| over strategies: {worst:.2e} (tolerance {tol:g})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "run.json")
        with open(path, "w") as f:
            json.dump({"shape": shape, "world": world, "topology": topo, "rows": rows}, f, indent=1)
        print(f"wrote {path}")
    return 0 if worst <= tol else 1


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
        "run", help="the main job: a real sequence-parallel run, checked against one process"
    )
    common(run, seq=2048, heads=24)
    run.add_argument("--strategy", default="all", help="ulysses, ring, usp, tas, or all")
    run.add_argument("--transport", default="shm", help="shm or gloo")
    run.add_argument("--out", default="out", help="directory for results")
    run.set_defaults(fn=_cmd_run)

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
