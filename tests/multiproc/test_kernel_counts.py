"""Tier 2: how many attention kernels and merges a layer costs each rank, text included.

Counted from the trace every rank records (``sf_comm.trace``: one "attn" span per kernel
call, one "merge" span per merge). The bounds are the hot path's contract: one kernel per KV
block the strategy visits plus at most one, whatever the joint text length (Note [Text rows
owned once] in sf_attn.joint). Torus gathers each stage's KV over its machine's ring and
runs one kernel per stage: N + 2 (N + 1 with a ring of one), within world + 1 (Note [Torus
schedule] in sf_attn.torus).
"""

from __future__ import annotations

import os

import pytest
import torch

import sf_attn
import sf_comm
from sf_comm.trace import WallTracer, tracing


def _count(ctx: sf_comm.Context, strategy: str, text: int) -> dict[str, int]:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, 8, 16, generator=g) for _ in range(3))
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    joint = tuple(torch.randn(1, text, 8, 16, generator=g) for _ in range(3)) if text else None
    how = sf_attn.resolve(
        ctx, seq_len=96, heads=8, head_dim=16, dtype=torch.float32, text_len=text, strategy=strategy
    )
    with tracing(WallTracer()) as tracer:
        sf_attn.parallel_attention(*shards, ctx=ctx, strategy=strategy, joint=joint, seq_len=96)
    names = [e.name for e in tracer.events if e.track == "compute"]
    return {
        "attn": names.count("attn"),
        "merge": names.count("merge"),
        "p_u": how.ulysses_degree,
        "p_r": how.ring_degree,
    }


def _bound(strategy: str, topology: sf_comm.Topology, p_u: int) -> int:
    world, machines, gpus = topology.world_size, topology.machines, topology.gpus_per_machine
    return {
        "ulysses": 2,
        "ring": world + 1,
        "usp": machines + 1,
        "tas": gpus + 1,
        "torus": world + 1,
    }[strategy]


@pytest.mark.parametrize(
    "topology",
    [
        "2x2",
        pytest.param("4x2", marks=pytest.mark.slow),
        pytest.param("2x4", marks=pytest.mark.slow),
    ],
)
def test_one_kernel_per_block_text_included(ranks, topology: str) -> None:
    """Catches joint text costing extra kernels and merges per block (text queries against
    every block and text keys as a block of their own: ring launched 18 kernels for 8 blocks
    on 4x2) and strategies that split blocks more finely than their layout needs."""
    topo = sf_comm.Topology.parse(topology)
    pool = ranks(topo.world_size)
    for strategy in sf_attn.strategy_names(auto=False):
        for text in (0, 7):
            counts = pool.run(_count, strategy, text, topology=topology, transport="shm")
            for rank, c in enumerate(counts):
                limit = _bound(strategy, topo, c["p_u"])
                assert c["attn"] <= limit, (strategy, text, rank, c, limit)
                if strategy == "torus":  # local x own, local x peers, a stage each, last split
                    n = c["p_u"]
                    expected = n + 1 + (c["p_r"] > 1) if n > 1 else 1 + (c["p_r"] > 1)
                    assert c["attn"] == expected, (text, rank, c, expected)
                else:  # one kernel per ring step, merged as they come
                    assert c["attn"] == c["p_r"] and c["merge"] == c["p_r"] - 1, (
                        strategy,
                        text,
                        rank,
                        c,
                    )


def _world_one(ctx: sf_comm.Context) -> dict[str, int]:
    return _count(ctx, "ulysses", 7)


def test_world_of_one_is_one_kernel(ranks) -> None:
    """Catches a single process paying blocks and merges for joint text (4 kernels and 3
    merges where one attention call over [text, image] does)."""
    (c,) = ranks(1).run(_world_one, topology="1x1", transport="shm")
    assert c["attn"] == 1 and c["merge"] == 0, c


def _ring_on_one_machine(ctx: sf_comm.Context, mode: str | None) -> dict[str, int]:
    old = os.environ.pop("SF_GATHER_KV", None)
    if mode is not None:
        os.environ["SF_GATHER_KV"] = mode
    try:
        return _count(ctx, "ring", 7)
    finally:
        os.environ.pop("SF_GATHER_KV", None)
        if old is not None:
            os.environ["SF_GATHER_KV"] = old


def test_a_ring_inside_a_machine_gathers(ranks) -> None:
    """Catches SF_GATHER_KV=auto leaving a Ring inside one machine rotating its blocks (P_r
    kernels and P_r - 1 merges) where one all-gather over the fast link makes it 2 kernels
    and 1 merge (Note [Gathered ring] in sf_attn.hybrid), and the default (rotate) or "never"
    gathering."""
    pool = ranks(4)
    for c in pool.run(_ring_on_one_machine, "auto", topology="1x4", transport="shm"):
        assert (c["attn"], c["merge"]) == (2, 1), c
    for mode in (None, "never"):
        for c in pool.run(_ring_on_one_machine, mode, topology="1x4", transport="shm"):
            assert (c["attn"], c["merge"]) == (4, 3), (mode, c)
