"""Communication benchmark: shm (one-sided) vs gloo (two-sided), side by side in one run.

``streamfusion bench comm`` calls :func:`main`; :func:`run` returns the rows.
Each (collective, size) is timed on the same pool of ranks for both transports, alternating
transports between repetitions so drift hits both alike; the figure is the median over
repetitions of the slowest rank's time (a collective is done when its last rank is).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from . import collectives
from .launch import RankPool

OPS = ("all_to_all", "ring_shift", "all_gather")


def _time_op(ctx: Any, op: str, nbytes: int, iters: int) -> list[float]:
    """Per-iteration time of ``op`` moving ``nbytes`` per rank, max over ranks."""
    group = ctx.group("world")
    numel = nbytes // 4
    x = torch.randn(numel)
    if op == "all_to_all":
        chunks = list(x.tensor_split(group.size))
        # every rank splits the same size the same way: member j sends me its chunk [me]
        shapes = [chunks[group.index].shape] * group.size

        def step() -> None:
            collectives.all_to_all(ctx, group, chunks, shapes).wait()

    elif op == "ring_shift":

        def step() -> None:
            collectives.ring_shift(ctx, group, x).wait()

    else:
        part = x[: numel // group.size].clone()

        def step() -> None:
            collectives.all_gather(ctx, group, part).wait()

    step()  # warm-up (first touch of shm pages, gloo pairs)
    return slowest_rank_times(ctx, step, iters)


def slowest_rank_times(ctx: Any, call: Callable[[], object], iters: int) -> list[float]:
    """Seconds of ``iters`` calls of ``call``, each started together on every rank (a barrier
    before it), as the slowest rank saw it (collective over ``ctx``'s world)."""
    times = []
    for _ in range(iters):
        ctx.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return [float(t) for t in worst]


def run(
    world: int = 4,
    sizes: tuple[int, ...] = (64 << 10, 1 << 20, 16 << 20, 64 << 20),
    ops: tuple[str, ...] = OPS,
    iters: int = 10,
    topology: str | None = None,
) -> list[dict[str, Any]]:
    """Time every (op, size) on shm and gloo; returns one row per (op, size)."""
    rows = []
    with RankPool(world, env={"SF_TIMEOUT": "120"}) as pool:
        for op in ops:
            for size in sizes:
                per = {"shm": [], "gloo": []}  # type: dict[str, list[float]]
                n = max(3, iters if size <= (16 << 20) else iters // 2)
                for _ in range(2):  # alternate transports so drift affects both
                    for tr in ("shm", "gloo"):
                        per[tr] += pool.run(_time_op, op, size, n, topology=topology, transport=tr)[
                            0
                        ]
                med = {tr: statistics.median(v) for tr, v in per.items()}
                # bytes each rank sends to others: all_to_all (P-1)/P of its buffer; ring its
                # buffer; all_gather its part to each of P-1 peers.
                moved = {
                    "all_to_all": size * (world - 1) / world,
                    "ring_shift": size,
                    "all_gather": size // world * (world - 1),
                }[op]
                rows.append(
                    dict(
                        op=op,
                        bytes=size,
                        world=world,
                        shm_s=med["shm"],
                        gloo_s=med["gloo"],
                        shm_gbps=moved / med["shm"] / 1e9,
                        gloo_gbps=moved / med["gloo"] / 1e9,
                        speedup=med["gloo"] / med["shm"],
                    )
                )
    return rows


def _fmt_bytes(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'op':<11} {'size':>7} {'shm ms':>9} {'gloo ms':>9} {'shm GB/s':>9} {'gloo GB/s':>9} {'gloo/shm':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['op']:<11} {_fmt_bytes(r['bytes']):>7} {r['shm_s'] * 1e3:9.3f} {r['gloo_s'] * 1e3:9.3f} "
            f"{r['shm_gbps']:9.2f} {r['gloo_gbps']:9.2f} {r['speedup']:8.2f}x"
        )
    return "\n".join(lines)
