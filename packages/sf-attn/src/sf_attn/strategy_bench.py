"""Attention benchmark: every strategy on every transport, same inputs, one run.

``streamfusion bench attention`` calls :func:`run`. Inputs are built from one seed on every
rank; each (strategy, transport) is timed over ``iters`` repetitions after a warm-up, in
rounds that alternate the configurations so drift hits all alike. The figure is the median
of the slowest rank's time per call; ratios are against the baseline strategy (xDiT's USP)
on the same transport and
against gloo for the same strategy. Each configuration's output is also checked against
single-process attention on the gathered inputs (max abs error reported).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import sf_comm
from sf_comm.launch import RankPool

from .api import parallel_attention
from .backends import attention_with_lse
from .sharding import shard
from .strategies import baseline_strategy, strategy_names

STRATEGIES = tuple(strategy_names(auto=False))  # every registered strategy, table order


def _inputs(batch: int, seq: int, heads: int, dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seq, heads, dim, generator=g).to(dtype) for _ in range(3)]


def _time(
    ctx: sf_comm.Context,
    strategy: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    iters: int,
    reference: torch.Tensor | None,
) -> dict[str, Any]:
    batch, seq, heads, dim = shape
    q, k, v = (shard(t, ctx) for t in _inputs(batch, seq, heads, dim, dtype))
    out = parallel_attention(q, k, v, ctx=ctx, strategy=strategy, seq_len=seq)  # warm-up
    assert isinstance(out, torch.Tensor)
    err = float("nan")
    if reference is not None:
        err = (out.float() - shard(reference, ctx).float()).abs().max().item()
    times = []
    for _ in range(iters):
        ctx.barrier()
        t0 = time.perf_counter()
        parallel_attention(q, k, v, ctx=ctx, strategy=strategy, seq_len=seq)
        times.append(time.perf_counter() - t0)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    errs = torch.tensor([err], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    return {"times": worst.tolist(), "err": errs.item()}


def reference_output(shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Single-process attention on the full inputs (the value every strategy must equal)."""
    q, k, v = _inputs(*shape, dtype)
    return attention_with_lse(q, k, v)[0]


def run(
    world: int = 4,
    topology: str = "2x2",
    shape: tuple[int, int, int, int] = (1, 4096, 24, 64),
    dtype: torch.dtype = torch.float32,
    strategies: tuple[str, ...] = STRATEGIES,
    transports: tuple[str, ...] = ("shm", "gloo"),
    iters: int = 5,
    rounds: int = 2,
    pool: RankPool | None = None,
) -> list[dict[str, Any]]:
    """Time every (strategy, transport); one row each with median seconds, ratios and error."""
    reference = reference_output(shape, dtype)
    own = pool is None
    pool = pool or RankPool(world, env={"SF_TOPOLOGY": topology, "SF_TIMEOUT": "300"})
    samples: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], float] = {}
    try:
        for _ in range(rounds):
            for transport in transports:
                for strategy in strategies:
                    res = pool.run(
                        _time,
                        strategy,
                        shape,
                        dtype,
                        iters,
                        reference,
                        topology=topology,
                        transport=transport,
                        timeout=900,
                    )[0]
                    samples.setdefault((strategy, transport), []).extend(res["times"])
                    errors[(strategy, transport)] = res["err"]
    finally:
        if own:
            pool.close()
    med = {key: statistics.median(v) for key, v in samples.items()}
    rows = []
    for (strategy, transport), m in med.items():
        rows.append(
            dict(
                strategy=strategy,
                transport=transport,
                median_s=m,
                max_abs_err=errors[(strategy, transport)],
                vs_baseline=med.get((baseline_strategy(), transport), float("nan")) / m,
                vs_gloo=med.get((strategy, "gloo"), float("nan")) / m,
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = f"{baseline_strategy()}/this"
    head = f"{'strategy':<9} {'transport':<9} {'median ms':>10} {base:>9} {'gloo/this':>10} {'max |err|':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:<9} {r['transport']:<9} {r['median_s'] * 1e3:10.2f} {r['vs_baseline']:8.2f}x "
            f"{r['vs_gloo']:9.2f}x {r['max_abs_err']:10.2e}"
        )
    return "\n".join(lines)
