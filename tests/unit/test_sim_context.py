"""Tier 1: the simulator's context is a communication context like the real ones."""

from __future__ import annotations

import sf_comm
from sf_attn.sim import SimContext


def test_sim_context_implements_the_context_protocol() -> None:
    """Catches the simulator's context drifting from sf_comm.CommContext (a strategy that
    starts using a context member the simulator lacks would fail only in the planner)."""
    ctx = SimContext(sf_comm.Topology.parse("2x4"), rank=5)
    assert isinstance(ctx, sf_comm.CommContext)
    with ctx as same, same.call("parallel_attention"):
        assert same.group("intra").ranks == (4, 5, 6, 7)
        assert same.group("inter").ranks == (1, 5)
