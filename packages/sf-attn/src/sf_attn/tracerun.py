"""Record a real run of one attention layer on every rank: Chrome trace JSON + timeline PNG.

``streamfusion trace`` calls :func:`run`; :func:`record` is what each rank executes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import sf_comm
from sf_comm.launch import RankPool
from sf_comm.trace import Counters, WallTracer, timeline_png, tracing, write_chrome

from .api import parallel_attention
from .sharding import shard


def record(
    ctx: sf_comm.Context,
    strategy: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    ulysses_degree: int | None,
    warmup: int = 1,
) -> tuple[list[dict[str, Any]], Counters]:
    """One traced call of ``parallel_attention`` on this rank (after ``warmup`` untraced):
    its Chrome events and its counters."""
    batch, seq, heads, dim = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        shard(torch.randn(batch, seq, heads, dim, generator=g).to(dtype), ctx) for _ in range(3)
    )
    for _ in range(warmup):
        parallel_attention(
            q, k, v, ctx=ctx, strategy=strategy, seq_len=seq, ulysses_degree=ulysses_degree
        )
    ctx.barrier()
    with tracing(WallTracer()) as tracer:
        parallel_attention(
            q, k, v, ctx=ctx, strategy=strategy, seq_len=seq, ulysses_degree=ulysses_degree
        )
    return tracer.to_chrome(ctx.rank), tracer.counters()


def run(
    *,
    strategy: str,
    topology: str,
    transport: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    out: str,
    ulysses_degree: int | None = None,
) -> tuple[str, str, list[Counters]]:
    """Trace ``strategy`` on a pool of CPU ranks; returns (json path, png path, every rank's
    counters)."""
    world = sf_comm.Topology.parse(topology).world_size
    os.makedirs(out, exist_ok=True)
    with RankPool(world, env={"SF_TOPOLOGY": topology, "SF_TIMEOUT": "300"}) as pool:
        recorded = pool.run(
            record,
            strategy,
            shape,
            dtype,
            ulysses_degree,
            topology=topology,
            transport=transport,
            timeout=600,
        )
    traces = [events for events, _ in recorded]
    stem = os.path.join(out, f"trace-{strategy}-{topology}")
    write_chrome(stem + ".json", traces)
    timeline_png(stem + ".png", traces, title=f"{strategy} on {topology} ({transport}), {shape}")
    return stem + ".json", stem + ".png", [counters for _, counters in recorded]
