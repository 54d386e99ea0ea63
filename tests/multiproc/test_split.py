"""Tier 2: splitting a job into parts (CFG parallel) — each part runs exact SP on its own."""

from __future__ import annotations

import pytest
import torch

import sf_attn
import sf_comm
from sf_comm.split import part_layout


def test_parts_follow_the_hardware() -> None:
    """Catches CFG parts that straddle machines when whole machines were available."""
    parts, sub = part_layout(sf_comm.Topology.parse("2x4"), 2)
    assert parts == [(0, 1, 2, 3), (4, 5, 6, 7)] and sub.shape == (1, 4)
    parts, sub = part_layout(sf_comm.Topology.parse("1x4"), 2)
    assert parts == [(0, 1), (2, 3)] and sub.shape == (1, 2)
    parts, sub = part_layout(sf_comm.Topology.parse("3x2"), 2)
    assert parts == [(0, 2, 4), (1, 3, 5)] and sub.shape == (3, 1)
    with pytest.raises(ValueError, match="must divide the machines"):
        part_layout(sf_comm.Topology.parse("3x3"), 2)


def _branch(ctx: sf_comm.Context, strategy: str) -> float:
    sub, cross = ctx.split(2)
    part = ctx.rank in sub.parts[1]
    g = torch.Generator().manual_seed(10 + int(part))  # each part attends over its own inputs
    q, k, v = (torch.randn(1, 23, 4, 16, generator=g) for _ in range(3))
    shards = [sf_attn.shard(t, sub) for t in (q, k, v)]
    out = sf_attn.parallel_attention(*shards, ctx=sub, strategy=strategy)
    ref = sf_attn.shard(sf_attn.reference_attention(q, k, v)[0], sub)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # combine the branches across parts (one exchange), as CFG does per step
    both = sf_comm.all_gather(ctx, cross, out).wait()
    assert torch.equal(both[int(part)], out)
    return float((both[0] - both[1]).abs().max())


@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize("topo", ["2x2", "1x4", "4x1"])
def test_each_part_runs_exact_sequence_parallelism(ranks, transport: str, topo: str) -> None:
    """Catches a sub-context that routes to the wrong global ranks or mixes the two parts."""
    for strategy in ("ulysses", "ring", "torus"):
        diffs = ranks(4).run(_branch, strategy, topology=topo, transport=transport)
        assert all(d > 0 for d in diffs)  # the parts really computed different things


def _nested(ctx: sf_comm.Context, strategy: str) -> list[int]:
    sub, _ = ctx.split(2)  # 2x2: one machine per part
    halves, cross = sub.split(2)  # each part in two again: one rank each
    assert (halves.world_size, halves.rank, halves.topology.shape) == (1, 0, (1, 1))
    # the inner cross group joins the part's ranks, in the part's numbering
    got = sf_comm.all_gather(sub, cross, torch.tensor([ctx.rank])).wait()
    # a part of a part with two ranks: its messages are translated through both levels
    inner, _ = sub.split(1)
    g = torch.Generator().manual_seed(20 + sub.index)
    q, k, v = (torch.randn(1, 13, 4, 16, generator=g) for _ in range(3))
    shards = [sf_attn.shard(t, inner) for t in (q, k, v)]
    out = sf_attn.parallel_attention(*shards, ctx=inner, strategy=strategy)
    ref = sf_attn.shard(sf_attn.reference_attention(q, k, v)[0], inner)
    # float32 against the float64 reference, as in _branch: a misrouted block is off by ~1
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    return [int(t) for t in got]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_part_splits_again(ranks, transport: str) -> None:
    """Catches a part that is split again routing by its parent's rank numbers as if they
    were the job's (every level's transport and groups must translate to the next)."""
    for strategy in ("ulysses", "ring"):
        got = ranks(4).run(_nested, strategy, topology="2x2", transport=transport)
        assert got == [[0, 1], [0, 1], [2, 3], [2, 3]]
