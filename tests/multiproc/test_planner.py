"""Tier 2: the planner on real ranks (measured rates) and ``strategy="auto"``."""

from __future__ import annotations

import torch

import sf_attn
import sf_comm


def _plan(ctx: sf_comm.Context) -> tuple[str, int, float, float, dict[str, float]]:
    p = sf_attn.plan(ctx, seq_len=256, heads=4, head_dim=16, dtype=torch.float32, measure=True)
    measured = sf_attn.planner._MEASURED[(str(ctx.topology), ctx.transport.name, 16, torch.float32)]
    rates = {
        "device_flops": measured.device_flops,
        "intra_bw": measured.intra_bw,
        "inter_bw": measured.inter_bw,
    }
    return p.strategy, p.ulysses_degree, p.predicted_s, p.baseline_s, rates


def test_measured_plan_is_consistent_across_ranks(ranks) -> None:
    """Catches ranks planning from different measurements (they would pick different layouts and hang)."""
    results = ranks(4).run(_plan, topology="2x2", transport="shm")
    assert all(r == results[0] for r in results), results
    strategy, degree, predicted, usp, rates = results[0]
    assert strategy in sf_attn.strategy_names() and degree in (1, 2, 4)
    assert predicted <= usp  # never worse than USP by its own model
    assert all(v > 0 for v in rates.values())


def _auto(ctx: sf_comm.Context) -> tuple[str, int]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (sf_attn.shard(torch.randn(1, 64, 4, 8, generator=g), ctx) for _ in range(3))
    out = sf_attn.parallel_attention(q, k, v, ctx=ctx, strategy="auto", seq_len=64)
    ref = sf_attn.shard(
        sf_attn.reference_attention(*(sf_attn.gather(t, ctx) for t in (q, k, v)))[0], ctx
    )
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    chosen = sf_attn.resolve(ctx, seq_len=64, heads=4, head_dim=8, dtype=torch.float32)
    return chosen.name, chosen.ulysses_degree


def test_auto_runs_the_planned_strategy_exactly(ranks) -> None:
    """Catches "auto" resolving differently on different ranks, or to something inexact."""
    chosen = ranks(4).run(_auto, topology="2x2", transport="shm")
    assert all(c == chosen[0] for c in chosen)


def test_planner_prefers_usp_on_two_machines_and_topology_aware_on_four() -> None:
    """Catches a planner that ignores the topology (the paper: TAS loses to USP on 2 machines)."""
    big = dict(seq_len=65536, heads=24, head_dim=128, dtype=torch.bfloat16)
    two = sf_attn.planner.plan_for(sf_comm.Topology.preset("p4de", machines=2), **big)
    four = sf_attn.planner.plan_for(sf_comm.Topology.preset("p4de", machines=4), **big)
    assert two.strategy == "usp" and two.predicted_s == two.baseline_s
    assert four.strategy in ("tas", "torus") and four.predicted_s < four.baseline_s
