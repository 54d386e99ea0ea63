"""The planner behind ``strategy="auto"``: rank candidate layouts by simulated cost.

Candidates are every registered strategy at every Ulysses degree its layout allows that can
split the heads. Each is costed by :func:`sf_attn.sim.layer.simulate` on the context's
topology (link and compute rates from the preset, or measured on the ranks with
``measure=True``), with the context's transport kind (one- or two-sided). The cheapest wins;
USP at its default degree is always a candidate and wins ties, so by the model the choice is
never slower than xDiT's USP.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch

from sf_comm import Topology
from sf_comm.topology import LinkModel

from .sim.layer import CostModel, SimResult, simulate
from .strategies import baseline_strategy, get_strategy, strategy_names


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The chosen strategy, its degrees, the predicted per-layer latency (and the baseline's
    at its default degree), and the ranking."""

    strategy: str
    ulysses_degree: int
    ring_degree: int
    predicted_s: float
    baseline_s: float
    candidates: tuple[SimResult, ...]

    def table(self) -> str:
        vs = f"vs {baseline_strategy()}"
        lines = [f"{'strategy':<9} {'P_u x P_r':>9} {'predicted ms':>13} {vs:>7}"]
        for c in sorted(self.candidates, key=lambda c: c.latency_s):
            mark = (
                " <- chosen"
                if (c.strategy, c.degrees[0]) == (self.strategy, self.ulysses_degree)
                else ""
            )
            lines.append(
                f"{c.strategy:<9} {c.degrees[0]:>4} x {c.degrees[1]:<3} {c.latency_s * 1e3:13.3f} "
                f"{self.baseline_s / c.latency_s:6.2f}x{mark}"
            )
        return "\n".join(lines)


def candidates(topology: Topology, heads: int) -> list[tuple[str, int]]:
    """Every (strategy, Ulysses degree) that can run ``heads`` heads on ``topology``."""
    out = []
    for name in strategy_names(auto=False):  # registration order: ties keep the earlier
        strategy = get_strategy(name)
        for degree in strategy.allowed_degrees(topology):
            if degree <= heads and heads % degree == 0:
                out.append((name, degree))
    return out


@functools.lru_cache(maxsize=256)
def _plan_cached(
    topology: Topology,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch: int,
    text_len: int,
    one_sided: bool,
) -> Plan:
    results = []
    for name, degree in candidates(topology, heads):
        results.append(
            simulate(
                name,
                topology,
                seq_len=seq_len,
                heads=heads,
                head_dim=head_dim,
                dtype=dtype,
                batch=batch,
                text_len=text_len,
                one_sided=one_sided,
                ulysses_degree=degree,
            )
        )
    name = baseline_strategy()
    default = get_strategy(name).default_degree(topology, heads)
    base = next(r for r in results if r.strategy == name and r.degrees[0] == default)
    best = base
    for r in results:  # strictly better only: ties keep the baseline, then the earlier
        if r.latency_s < best.latency_s * (1 - 1e-9):
            best = r
    return Plan(
        best.strategy,
        best.degrees[0],
        best.degrees[1],
        best.latency_s,
        base.latency_s,
        tuple(results),
    )


def plan_for(
    topology: Topology,
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    text_len: int = 0,
    one_sided: bool = True,
) -> Plan:
    """The plan for a topology (no context needed)."""
    return _plan_cached(topology, seq_len, heads, head_dim, dtype, batch, text_len, one_sided)


_MEASURED: dict[Any, Topology] = {}


def plan(
    ctx: Any,
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    text_len: int = 0,
    measure: bool = False,
) -> Plan:
    """Choose the strategy and degrees for an attention layer on this context.

    Args:
        ctx: the :class:`sf_comm.Context` (its topology and transport kind are used).
        seq_len, heads, head_dim, dtype, batch, text_len: the layer.
        measure: time a local attention block and one transfer per link on the actual ranks
            (collective: every rank must call it) and plan with those rates; cached per
            (topology, transport, head_dim, dtype).

    Returns:
        The :class:`Plan` (strategy, degrees, predicted latency, the ranked candidates).
    """
    topology = ctx.topology
    if measure:
        key = (str(topology), ctx.transport.name, head_dim, dtype)
        if key not in _MEASURED:
            _MEASURED[key] = measure_rates(ctx, heads=heads, head_dim=head_dim, dtype=dtype)
        topology = _MEASURED[key]
    return plan_for(
        topology,
        seq_len=seq_len,
        heads=heads,
        head_dim=head_dim,
        dtype=dtype,
        batch=batch,
        text_len=text_len,
        one_sided=ctx.transport.one_sided,
    )


def measure_rates(
    ctx: Any,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seq: int = 1024,
    nbytes: int = 4 << 20,
    repeats: int = 3,
) -> Topology:
    """The context's topology with compute and link rates measured on its ranks (collective
    over the context's ranks)."""
    import sf_comm

    from .backends import attention_with_lse

    device = ctx.device
    q = torch.randn(1, seq, heads, head_dim, device=device).to(dtype)
    attention_with_lse(q, q, q)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        attention_with_lse(q, q, q)
    if device.type == "cuda":
        torch.cuda.synchronize()
    attn_s = (time.perf_counter() - t0) / repeats
    flops = 4.0 * seq * seq * heads * head_dim / attn_s
    rates = {"device_flops": flops}
    payload = torch.zeros(nbytes // 4, device=device)
    for axis, bw_field, lat_field in (
        ("intra", "intra_bw", "intra_latency"),
        ("inter", "inter_bw", "inter_latency"),
    ):
        group = ctx.group(axis)
        if group.size == 1:
            continue
        small = torch.zeros(1, device=device)
        sf_comm.ring_shift(ctx, group, payload).wait()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            sf_comm.ring_shift(ctx, group, small).wait()
        lat = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            sf_comm.ring_shift(ctx, group, payload).wait()
        big = (time.perf_counter() - t0) / repeats
        rates[lat_field] = lat
        bw = nbytes / max(big - lat, 1e-9)
        rates[bw_field] = bw * (ctx.topology.gpus_per_nic if axis == "inter" else 1)
    # every rank must plan with the same numbers: take the slowest rank's view, gathered
    # through the context (a CFG half's context covers only its own ranks)
    names = sorted(rates)
    values = torch.tensor([rates[n] for n in names], dtype=torch.float64)
    world = ctx.group("world")
    if world.size > 1:
        table = torch.stack(sf_comm.all_gather(ctx, world, values.to(device)).wait()).cpu()
        slowest = [
            table[:, i].max() if n.endswith("latency") else table[:, i].min()
            for i, n in enumerate(names)
        ]
        values = torch.stack(slowest)
    # measured rates are effective rates already: line rate in the link model (LinkModel())
    measured = {n: float(v) for n, v in zip(names, values.tolist())}
    return ctx.topology.replace(links=LinkModel(), **measured)


__all__ = [
    "CostModel",
    "Plan",
    "candidates",
    "measure_rates",
    "plan",
    "plan_for",
]
