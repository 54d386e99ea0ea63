"""Tier 2: Torus Attention — exact in every composition, Ulysses' bytes, and real overlap."""

from __future__ import annotations

import pytest
import torch

import sf_attn
import sf_comm
from sf_comm.trace import WallTracer, tracing

from .test_parallel_attention import _inputs


@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize(
    ("topo", "heads", "degree"),
    [("2x2", 2, 2), ("2x2", 4, 4), ("4x1", 5, 4), ("1x4", 3, 1), ("2x2", 6, 2)],
)
def test_torus_compositions_are_exact(
    ranks, transport: str, topo: str, heads: int, degree: int
) -> None:
    """Catches a torus stage that skips or repeats a (Q chunk, KV block) pair.

    Covers torus group sizes 1, 2, 4 combined with intra rings of 1, 2, 4, uneven heads (5
    over 4) and uneven sequence (37 over 4), with joint text.
    """
    errs = ranks(4).run(_torus_check, heads, degree, topology=topo, transport=transport)
    assert max(errs) < 2e-5


def _torus_check(ctx: sf_comm.Context, heads: int, degree: int) -> float:
    (q, k, v), txt = _inputs(3, 2, 37, heads, 16, 5, torch.float32)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    out, txt_out = sf_attn.parallel_attention(
        *shards, ctx=ctx, strategy="torus", joint=tuple(txt), ulysses_degree=degree
    )
    ref, _ = sf_attn.reference_attention(*(torch.cat([a, b], 1) for a, b in zip(txt, (q, k, v))))
    torch.testing.assert_close(out.double(), sf_attn.shard(ref[:, 5:], ctx), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(txt_out.double(), ref[:, :5], atol=2e-5, rtol=2e-5)
    every = sf_comm.all_gather(ctx, ctx.group("world"), txt_out).wait()
    assert all(torch.equal(every[0], x) for x in every)
    return (out.double() - sf_attn.shard(ref[:, 5:], ctx)).abs().max().item()


@pytest.mark.slow
def test_torus_on_eight_ranks(ranks) -> None:
    """Catches errors that only appear with a torus group of 2 around an intra ring of 4."""
    for topo, heads, degree in (("2x4", 6, 2), ("2x4", 8, 8), ("4x2", 4, 4)):
        errs = ranks(8).run(_torus_check, heads, degree, topology=topo, transport="shm")
        assert max(errs) < 2e-5


def _bytes(ctx: sf_comm.Context, strategy: str) -> tuple[dict[str, int], dict[str, int]]:
    (q, k, v), _ = _inputs(0, 1, 64, 4, 8, 0, torch.float32)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    with tracing(WallTracer()) as tracer:
        sf_attn.parallel_attention(
            *shards, ctx=ctx, strategy=strategy, seq_len=64, ulysses_degree=2
        )
    per_link: dict[str, int] = {}
    calls: dict[str, int] = {}
    for e in tracer.events:
        if e.track != "compute":
            per_link[e.track] = per_link.get(e.track, 0) + e.nbytes
            calls[e.track] = calls.get(e.track, 0) + 1
    return per_link, calls


def test_torus_moves_the_same_bytes_as_tas(ranks) -> None:
    """Catches Torus sending more over the slow inter-machine link than TAS's all-to-all does."""
    pool = ranks(4)
    tas_bytes, _ = pool.run(_bytes, "tas", topology="2x2", transport="shm")[0]
    torus_bytes, torus_calls = pool.run(_bytes, "torus", topology="2x2", transport="shm")[0]
    assert torus_bytes == tas_bytes, (torus_bytes, tas_bytes)
    # N=2 torus, P_r=2 ring: 1 Q pull + 1 KV pull + 1 O push inter; 2 stages x 1 ring shift intra
    assert torus_calls == {"inter": 3, "intra": 2}


def _overlap(ctx: sf_comm.Context, strategy: str) -> list[tuple[str, str, float, float]]:
    (q, k, v), _ = _inputs(0, 1, 512, 4, 32, 0, torch.float32)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    with tracing(WallTracer()) as tracer:
        sf_attn.parallel_attention(
            *shards,
            ctx=ctx,
            strategy=strategy,
            seq_len=512,
            ulysses_degree=2 if strategy == "torus" else None,
        )
    return [(e.track, e.name, e.start, e.end) for e in tracer.events]


@pytest.mark.parametrize("strategy", ["ring", "torus"])
def test_trace_shows_transfers_overlapping_compute(ranks, strategy: str) -> None:
    """Catches a schedule that waits for each transfer before computing (no overlap).

    From the recorded trace: every shift after the first is issued before the attention
    block that precedes its wait has finished, i.e. it is in flight while compute runs.
    """
    events = ranks(4).run(_overlap, strategy, topology="2x2", transport="shm")[0]
    comms = [e for e in events if e[0] != "compute"]
    attns = [e for e in events if e[1] == "attn"]
    assert comms and attns
    overlapped = 0
    for _, _, c_start, c_end in comms:
        # some attention block starts after the transfer was issued and before its wait returned
        if any(c_start <= a_start and a_end <= c_end for _, _, a_start, a_end in attns):
            overlapped += 1
    # ring: all 3 shifts overlap a block; torus (N=2, P_r=2): every pull/shift, and the push
    assert overlapped >= len(comms) - 1, (overlapped, comms, attns)


def _inter_in_flight(ctx: sf_comm.Context) -> int:
    """The most inter-machine transfers this rank had in flight at one time."""
    events = _overlap(ctx, "torus")
    inter = [(start, end) for track, _, start, end in events if track == "inter"]
    return max(sum(s <= t < e for s, e in inter) for t, _ in inter)


def test_torus_keeps_two_pulls_in_flight(ranks) -> None:
    """Catches a schedule that issues the next inter-machine pull only when the previous one
    has landed (the link idles between them): the Q and KV pulls are issued together."""
    assert min(ranks(4).run(_inter_in_flight, topology="2x2", transport="shm")) >= 2
