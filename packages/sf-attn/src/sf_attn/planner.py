"""The planner behind ``strategy="auto"``: rank candidate layouts by simulated cost.

Candidates are every registered strategy at every Ulysses degree its layout allows that can
split the heads. Each is costed by :func:`sf_attn.simulate.simulate` on the context's
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

from .simulate import CostModel, SimResult, simulate
from .strategies import get_strategy, strategy_names

_ORDER = ("usp", "tas", "torus", "ulysses", "ring")  # tie-break: the baseline first


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The chosen strategy, its degrees, the predicted per-layer latency, and the ranking."""

    strategy: str
    ulysses_degree: int
    ring_degree: int
    predicted_s: float
    usp_s: float
    candidates: tuple[SimResult, ...]

    def table(self) -> str:
        lines = [f"{'strategy':<9} {'P_u x P_r':>9} {'predicted ms':>13} {'vs usp':>7}"]
        for c in sorted(self.candidates, key=lambda c: c.latency_s):
            mark = (
                " <- chosen"
                if (c.strategy, c.degrees[0]) == (self.strategy, self.ulysses_degree)
                else ""
            )
            lines.append(
                f"{c.strategy:<9} {c.degrees[0]:>4} x {c.degrees[1]:<3} {c.latency_s * 1e3:13.3f} "
                f"{self.usp_s / c.latency_s:6.2f}x{mark}"
            )
        return "\n".join(lines)


def candidates(topology: Topology, heads: int) -> list[tuple[str, int]]:
    """Every (strategy, Ulysses degree) that can run ``heads`` heads on ``topology``."""
    out = []
    for name in _ORDER + tuple(n for n in strategy_names() if n not in _ORDER and n != "auto"):
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
    usp_default = get_strategy("usp").default_degree(topology, heads)
    usp = next(r for r in results if r.strategy == "usp" and r.degrees[0] == usp_default)
    best = usp
    for r in results:  # strictly better only: ties keep USP
        if r.latency_s < best.latency_s * (1 - 1e-9):
            best = r
    return Plan(
        best.strategy,
        best.degrees[0],
        best.degrees[1],
        best.latency_s,
        usp.latency_s,
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
    """The context's topology with compute and link rates measured on its ranks (collective)."""
    import torch.distributed as dist

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
    # every rank must plan with the same numbers: take the slowest rank's view
    names = sorted(rates)
    values = torch.tensor([rates[n] for n in names], dtype=torch.float64)
    slow = torch.tensor(
        [1.0 if n.endswith("latency") else -1.0 for n in names], dtype=torch.float64
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        signed = values * slow
        dist.all_reduce(signed, op=dist.ReduceOp.MAX)
        values = signed * slow
    return ctx.topology.replace(**{n: float(v) for n, v in zip(names, values.tolist())})


def choose_strategy(
    topology: Topology,
    *,
    heads: int,
    seq_len: int,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    one_sided: bool = True,
    batch: int = 1,
    text_len: int = 0,
) -> tuple[str, int]:
    """(strategy, Ulysses degree) the planner picks for this layer on ``topology``."""
    chosen = plan_for(
        topology,
        seq_len=seq_len,
        heads=heads,
        head_dim=head_dim,
        dtype=dtype,
        one_sided=one_sided,
        batch=batch,
        text_len=text_len,
    )
    return chosen.strategy, chosen.ulysses_degree


__all__ = [
    "CostModel",
    "Plan",
    "candidates",
    "choose_strategy",
    "measure_rates",
    "plan",
    "plan_for",
]
