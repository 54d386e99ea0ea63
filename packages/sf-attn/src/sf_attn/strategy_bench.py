"""Attention benchmark: every strategy on every transport, same inputs, one run.

``streamfusion bench attention`` calls :func:`run`. Inputs are built from one seed on every
rank; each (strategy, transport) is timed over ``iters`` repetitions after a warm-up, in
rounds that alternate the configurations so drift hits all alike. The figure is the median
of the slowest rank's time per call; ratios are against the baseline strategy (xDiT's USP)
on the same transport and
against gloo for the same strategy. Each configuration's output is also checked against
single-process attention on the gathered inputs (max abs error reported). The ``sdpa`` row
is the stock single-device path: one ``F.scaled_dot_product_attention`` call over the
whole [text, image] sequence in one process; ``sdpa/this`` is the speed against it (at
world size 1, what the engine's own overhead costs). ``kernels``, ``merges`` and ``exposed
ms`` come from one more, traced, call: the most any rank launched, and the longest any rank
waited on communication with no compute running (:meth:`sf_comm.trace.Tracer.counters`).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sf_comm
from sf_comm.collective_bench import slowest_rank_times
from sf_comm.launch import RankPool
from sf_comm.trace import Counters, WallTracer, tracing

from .api import parallel_attention
from .backends import attention_with_lse
from .sharding import shard
from .strategies import baseline_strategy, strategy_names

STRATEGIES = tuple(strategy_names(auto=False))  # every registered strategy, table order


def _inputs(
    batch: int, seq: int, heads: int, dim: int, dtype: torch.dtype, text: int
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """q, k, v [batch, seq, heads, dim] and joint text (tq, tk, tv) or None, from one seed."""
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(batch, seq, heads, dim, generator=g).to(dtype) for _ in range(3)]
    joint = [torch.randn(batch, text, heads, dim, generator=g).to(dtype) for _ in range(3)]
    return qkv, joint if text else None


def _sdpa_call(
    shape: tuple[int, int, int, int], dtype: torch.dtype, text: int
) -> Callable[[], torch.Tensor]:
    """One ``F.scaled_dot_product_attention`` over the whole [text, image] sequence, as the
    stock single-device path runs it ([batch, heads, seq, dim])."""
    (q, k, v), joint = _inputs(*shape, dtype, text)
    full = [torch.cat([t, x], dim=1) if joint else x for t, x in zip(joint or [q] * 3, (q, k, v))]
    q_, k_, v_ = (x.transpose(1, 2) for x in full)
    return lambda: F.scaled_dot_product_attention(q_, k_, v_)


def _time(
    ctx: sf_comm.CommContext,
    strategy: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    text: int,
    iters: int,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    layout: str = "replicated",
) -> dict[str, Any]:
    """Per-call seconds of the slowest rank; ``strategy="sdpa"``: one SDPA call on rank 0.
    ``layout``: the joint text's layout (Note [Sharded text] in :mod:`sf_attn.joint`)."""
    batch, seq, heads, dim = shape
    (q, k, v), joint = _inputs(batch, seq, heads, dim, dtype, text)
    call: Callable[[], Any] = lambda: None  # noqa: E731 - ranks other than 0 for "sdpa"
    sharded = layout == "sharded"
    if strategy != "sdpa":
        shards = [shard(t, ctx) for t in (q, k, v)]
        j = None
        if joint:
            tq, tk, tv = (shard(t, ctx) if sharded else t for t in joint)
            j = (tq, tk, tv)
        call = functools.partial(
            parallel_attention,
            *shards,
            ctx=ctx,
            strategy=strategy,
            seq_len=seq,
            joint=j,
            text=layout,
            text_len=text if sharded else None,
        )
    elif ctx.rank == 0:
        call = _sdpa_call(shape, dtype, text)
    out: Any = call()  # warm-up
    err = float("nan")
    if reference is not None and strategy != "sdpa":
        img, txt = out if joint else (out, None)
        ref_txt, ref_img = reference
        err = (img.float() - shard(ref_img, ctx).float()).abs().max().item()
        if txt is not None and txt.numel():  # a rank's sharded text chunk may be empty
            ref_txt = shard(ref_txt, ctx) if sharded else ref_txt
            err = max(err, (txt.float() - ref_txt.float()).abs().max().item())
    times = slowest_rank_times(ctx, call, iters)
    errs = torch.tensor([err], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    ctx.barrier()
    with tracing(WallTracer()) as tracer:  # one more call, traced: what it costs each rank
        call()
    return {"times": times, "err": errs.item(), "counters": tracer.counters()}


def reference_output(
    shape: tuple[int, int, int, int], dtype: torch.dtype, text: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process attention over [text, image] (the value every strategy must equal):
    (text rows, image rows)."""
    (q, k, v), joint = _inputs(*shape, dtype, text)
    full = [torch.cat([t, x], dim=1) if joint else x for t, x in zip(joint or [q] * 3, (q, k, v))]
    out = attention_with_lse(*full)[0]
    return out[:, :text], out[:, text:]


def run(
    world: int = 4,
    topology: str = "2x2",
    shape: tuple[int, int, int, int] = (1, 4096, 24, 64),
    dtype: torch.dtype = torch.float32,
    strategies: tuple[str, ...] = STRATEGIES,
    transports: tuple[str, ...] | None = None,
    iters: int = 5,
    rounds: int = 2,
    pool: RankPool | None = None,
    text: int = 0,
    text_layouts: tuple[str, ...] = ("replicated",),
    emulation: sf_comm.Emulation | None = None,
) -> list[dict[str, Any]]:
    """Time every (strategy, transport, text layout) and one single-process SDPA call over
    the whole sequence (the stock path); one row each with median seconds, ratios and error.
    Without text there is one layout ("-"). With ``emulation`` (started, ``world`` ranks) the
    ranks run on its emulated machines. ``transports`` default: ("shm", "gloo"), or under an
    emulation ("shm+gloo", "gloo"), which respect machines (plain "shm" would carry
    inter-machine bytes through memory, past the emulated links)."""
    if transports is None:
        transports = ("shm+gloo", "gloo") if emulation is not None else ("shm", "gloo")
    reference = reference_output(shape, dtype, text)
    own = pool is None
    pool = pool or RankPool(
        world, env={"SF_TOPOLOGY": topology, "SF_TIMEOUT": "300"}, emulation=emulation
    )
    Key = tuple[str, str, str]  # (strategy, transport, text layout)
    samples: dict[Key, list[float]] = {}
    errors: dict[Key, float] = {}
    counted: dict[Key, list[Counters]] = {}
    layouts = text_layouts if text else ("-",)
    configs = [(s, t, x) for t in transports for x in layouts for s in strategies]
    configs.append(("sdpa", transports[0], "-"))
    try:
        for _ in range(rounds):
            for strategy, transport, layout in configs:
                every = pool.run(
                    _time,
                    strategy,
                    shape,
                    dtype,
                    text,
                    iters,
                    reference,
                    "replicated" if layout == "-" else layout,
                    topology=topology,
                    transport=transport,
                    timeout=900,
                )
                key = (strategy, "-" if strategy == "sdpa" else transport, layout)
                samples.setdefault(key, []).extend(every[0]["times"])
                errors[key] = every[0]["err"]
                counted[key] = [res["counters"] for res in every]
    finally:
        if own:
            pool.close()
    med = {key: statistics.median(v) for key, v in samples.items()}
    sdpa = med[("sdpa", "-", "-")]
    rows = []
    for key, m in med.items():
        strategy, transport, layout = key
        rows.append(
            dict(
                strategy=strategy,
                transport=transport,
                text=layout,
                median_s=m,
                max_abs_err=errors[key],
                vs_baseline=med.get((baseline_strategy(), transport, layout), float("nan")) / m,
                vs_gloo=med.get((strategy, "gloo", layout), float("nan")) / m,
                vs_sdpa=sdpa / m,
                kernels=max(c.kernels for c in counted[key]),
                merges=max(c.merges for c in counted[key]),
                exposed_comm_s=max(c.exposed_comm_s for c in counted[key]),
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = f"{baseline_strategy()}/this"
    head = (
        f"{'strategy':<9} {'transport':<9} {'text':<10} {'median ms':>10} {base:>9} {'gloo/this':>10} "
        f"{'sdpa/this':>10} {'max |err|':>10} {'kernels':>7} {'merges':>6} {'exposed ms':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:<9} {r['transport']:<9} {r['text']:<10} {r['median_s'] * 1e3:10.2f} "
            f"{r['vs_baseline']:8.2f}x {r['vs_gloo']:9.2f}x {r['vs_sdpa']:9.2f}x "
            + (
                f"{'-':>10} {'1':>7} {'0':>6} {'-':>10}"  # one stock call, nothing to trace
                if r["strategy"] == "sdpa"
                else f"{r['max_abs_err']:10.2e} {r['kernels']:>7} {r['merges']:>6} "
                f"{r['exposed_comm_s'] * 1e3:10.2f}"
            )
        )
    return "\n".join(lines)
