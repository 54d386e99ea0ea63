"""Tier 2: every strategy, on both transports, equals single-process float64 attention.

Each rank builds the full inputs from a shared seed, runs ``parallel_attention`` on its shard
and compares its rows with float64 attention on the gathered (full) inputs.

Tolerances: float32 inputs are computed in float32 with float32 merges; over a few hundred
keys the error vs float64 stays around 1e-6 relative, so atol=rtol=2e-5 (~1e-5 relative, as
DESIGN.md sets) catches any wrong or missing block (which changes outputs by ~1e-1).
bf16/fp16 inputs round Q, K, V, the per-block outputs and the final cast to 8 (resp. 11)
mantissa bits: 2e-2 / 5e-3 absolute on unit-scale outputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sf_attn
import sf_comm
from sf_attn.backends import reference_attention

STRATEGIES = ["ulysses", "ring", "usp", "tas", "torus", "auto"]
TRANSPORTS = ["shm", "gloo"]
TOPOLOGIES = {1: ["1x1"], 2: ["1x2", "2x1"], 4: ["2x2", "1x4", "4x1"], 8: ["2x4", "4x2"]}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
HYP = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def _inputs(seed: int, batch: int, seq: int, heads: int, dim: int, text: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(batch, seq, heads, dim, generator=g).to(dtype) for _ in range(3)]
    txt = (
        [torch.randn(batch, text, heads, dim, generator=g).to(dtype) for _ in range(3)]
        if text
        else None
    )
    return qkv, txt


def _text_mask(seed: int, batch: int, text: int, kind: str) -> torch.Tensor | None:
    """A mask over the text keys: bool (about a third masked) or additive (some -inf)."""
    if kind == "none" or not text:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(batch, text, generator=g) > 0.35
    if kind == "bool":
        return keep
    bias = torch.randn(batch, text, generator=g)
    return bias.masked_fill(~keep, float("-inf"))


def _check(
    ctx: sf_comm.Context,
    strategy: str,
    seed: int,
    batch: int,
    seq: int,
    heads: int,
    dim: int,
    text: int,
    dtype: torch.dtype,
    pass_len: bool,
    layout: str = "replicated",
    mask_kind: str = "none",
) -> float:
    (q, k, v), txt = _inputs(seed, batch, seq, heads, dim, text, dtype)
    mask = _text_mask(seed, batch, text, mask_kind)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    sharded = layout == "sharded"
    result = sf_attn.parallel_attention(
        *shards,
        ctx=ctx,
        strategy=strategy,
        joint=(tuple(sf_attn.shard(t, ctx) for t in txt) if sharded else tuple(txt))
        if txt
        else None,
        joint_mask=sf_attn.shard(mask, ctx) if sharded and mask is not None else mask,
        text=layout,
        seq_len=seq if pass_len else None,
        text_len=text if pass_len and sharded else None,
    )
    if txt:
        fq, fk, fv = (torch.cat([t, i], dim=1) for t, i in zip(txt, (q, k, v)))
    else:
        fq, fk, fv = q, k, v
    full_mask = None
    if mask is not None:
        open_ = torch.ones(batch, seq, dtype=torch.bool)
        full_mask = torch.cat([mask, open_ if mask.dtype == torch.bool else 0.0 * open_], dim=1)
    ref, _ = reference_attention(fq, fk, fv, key_mask=full_mask)
    ref_img = sf_attn.shard(ref[:, text:], ctx)
    out = result[0] if txt else result
    assert out.dtype == dtype and out.shape == ref_img.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_img, atol=tol, rtol=tol)
    err = (out.double() - ref_img).abs().max().item() if out.numel() else 0.0
    if txt:
        txt_out = result[1]
        ref_text = sf_attn.shard(ref[:, :text], ctx) if sharded else ref[:, :text]
        assert txt_out.shape == ref_text.shape
        torch.testing.assert_close(txt_out.double(), ref_text, atol=tol, rtol=tol)
        if not sharded:  # replicated: identical on every rank, bit for bit
            every = sf_comm.all_gather(ctx, ctx.group("world"), txt_out).wait()
            assert all(torch.equal(every[0], t) for t in every), "text output differs across ranks"
    return err


def _shape_strategy(world: int):
    return dict(
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 2),
        seq=st.integers(world, 41),  # includes lengths that do not divide
        heads=st.sampled_from([1, 2, 3, 4, 6, 8]),
        dim=st.sampled_from([8, 16, 24, 40]),
        text=st.sampled_from([0, 0, 3, 7]),
        dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
        topo=st.sampled_from(TOPOLOGIES[world]),
        strategy=st.sampled_from(STRATEGIES),
        pass_len=st.booleans(),
        layout=st.sampled_from(["replicated", "sharded"]),
        mask_kind=st.sampled_from(["none", "none", "bool", "additive"]),
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_every_strategy_matches_single_process(ranks, world: int, transport: str) -> None:
    """Catches any strategy that drops, duplicates or misroutes a block, a head or a text token.

    Property-based over batch, (uneven) sequence length, heads, head_dim, dtype, joint text
    length, text layout (replicated or sharded), text key mask (none, bool, additive),
    topology and strategy. Strategies that cannot split the drawn heads must refuse
    with a ValueError naming the heads; that case is checked separately below.
    """
    pool = ranks(world)

    @HYP
    @given(**_shape_strategy(world))
    def check(
        seed, batch, seq, heads, dim, text, dtype, topo, strategy, pass_len, layout, mask_kind
    ) -> None:  # type: ignore[no-untyped-def]
        if strategy == "ulysses" and heads < world:
            strategy = "ring"  # ulysses cannot split fewer heads than ranks (tested below)
        pool.run(
            _check,
            strategy,
            seed,
            batch,
            seq,
            heads,
            dim,
            text,
            dtype,
            pass_len,
            layout,
            mask_kind,
            topology=topo,
            transport=transport,
        )

    check()


@pytest.mark.parametrize("strategy", ["ulysses", "ring", "usp", "tas", "torus"])
@pytest.mark.parametrize("topo", ["2x2", "1x4", "4x1"])
def test_each_strategy_on_each_topology(ranks, strategy: str, topo: str) -> None:
    """Catches a strategy/topology pair the property test's random draws happened to miss."""
    errs = ranks(4).run(
        _check, strategy, 7, 2, 37, 4, 16, 5, torch.float32, False, topology=topo, transport="shm"
    )
    assert max(errs) < 2e-5


def _both_layouts_and_masks(ctx: sf_comm.Context, strategy: str) -> float:
    errs = [
        _check(ctx, strategy, 11, 2, 37, 4, 16, 7, torch.float32, pass_len, layout, mask)
        for layout in ("replicated", "sharded")
        for mask, pass_len in (("none", True), ("bool", False), ("additive", True))
    ]
    return max(errs)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("strategy", ["ulysses", "ring", "usp", "tas", "torus"])
def test_text_layouts_with_masks(ranks, strategy: str, transport: str) -> None:
    """Catches a strategy that routes a text key's mask with the wrong block, or sharded text
    rows to the wrong rank: both layouts, each mask kind, 7 text tokens over 4 ranks."""
    errs = ranks(4).run(_both_layouts_and_masks, strategy, topology="2x2", transport=transport)
    assert max(errs) < 2e-5


def _with_degree(ctx: sf_comm.Context, strategy: str, degree: int) -> float:
    (q, k, v), txt = _inputs(5, 1, 30, 8, 8, 3, torch.float32)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
    out, _ = sf_attn.parallel_attention(
        *shards, ctx=ctx, strategy=strategy, joint=tuple(txt), ulysses_degree=degree
    )
    fq, fk, fv = (torch.cat([t, i], dim=1) for t, i in zip(txt, (q, k, v)))
    ref = sf_attn.shard(reference_attention(fq, fk, fv)[0][:, 3:], ctx)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    return (out.double() - ref).abs().max().item()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("strategy", "degree"), [("usp", 4), ("usp", 1), ("tas", 2), ("tas", 1), ("torus", 4)]
)
def test_every_degree(ranks, transport: str, strategy: str, degree: int) -> None:
    """Catches layouts whose member order differs from the process group's rank order.

    USP with P_u = 4 on 2x2 numbers its Ulysses members (0, 2, 1, 3): a transport that
    trusted the library's rank order would hand every chunk to the wrong member.
    """
    ranks(4).run(_with_degree, strategy, degree, topology="2x2", transport=transport)


def _count(ctx: sf_comm.Context, strategy: str, heads: int, text: int) -> tuple[dict, dict, int]:
    (q, k, v), txt = _inputs(0, 1, 64, heads, 8, text, torch.float32)
    shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]

    def call() -> None:
        sf_attn.parallel_attention(
            *shards, ctx=ctx, strategy=strategy, seq_len=64, joint=tuple(txt) if txt else None
        )

    call()  # the first call of a kind also agrees on the kernel (one all-gather, once)
    before = ctx.transport.stats.snapshot()
    call()
    delta = ctx.transport.stats - before
    return dict(delta.calls), dict(delta.bytes_sent), shards[0].numel() * 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_communication_counts(ranks, transport: str) -> None:
    """Catches a strategy that silently falls back to gathering the sequence, or shifts too often.

    Ring does world-1 shifts of K/V; Ulysses two all-to-alls; USP/TAS on 2x2 one all-to-all
    each way in the Ulysses group plus P_r-1 shifts; nobody moves more than its own share.
    """
    pool = ranks(4)
    calls, sent, shard_bytes = pool.run(_count, "ring", 4, 0, topology="2x2", transport=transport)[
        0
    ]
    assert calls == {"shift+1": 3}
    assert sent == {"shift+1": 3 * 2 * shard_bytes}  # K and V, three steps
    calls, sent, shard_bytes = pool.run(
        _count, "ulysses", 4, 0, topology="2x2", transport=transport
    )[0]
    assert calls == {"all_to_all": 2}
    # forward: q, k, v minus own quarter; back: out minus own quarter
    assert sent == {"all_to_all": 3 * shard_bytes * 3 // 4 + shard_bytes * 3 // 4}
    calls, _, _ = pool.run(_count, "ulysses", 4, 5, topology="2x2", transport=transport)[0]
    assert calls == {"all_to_all": 2, "all_gather": 1}  # + the text outputs' heads
    for strategy in ("usp", "tas"):
        calls, sent, shard_bytes = pool.run(
            _count, strategy, 2, 0, topology="2x2", transport=transport
        )[0]
        assert calls == {"all_to_all": 2, "shift+1": 1}, (strategy, calls)
        ulysses_bytes = 3 * shard_bytes // 2 + shard_bytes // 2
        ring_bytes = 2 * 2 * shard_bytes // 2  # K, V of 2 shards' tokens, half the heads
        assert sent == {"all_to_all": ulysses_bytes, "shift+1": ring_bytes}, (strategy, sent)


def _which_groups(ctx: sf_comm.Context, strategy: str, heads: int) -> tuple:
    layout = sf_attn.get_strategy(strategy).layout(ctx.topology, heads)
    return layout.ulysses, layout.ring


def test_layouts_put_links_where_intended(ranks) -> None:
    """Catches TAS and USP swapping roles: USP's Ulysses stays in a machine, TAS's spans machines."""
    topo = sf_comm.Topology.parse("2x4")
    usp = sf_attn.get_strategy("usp").layout(topo, heads=8)
    assert usp.ulysses == ((0, 1, 2, 3), (4, 5, 6, 7)) and usp.ring == (
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
    )
    tas = sf_attn.get_strategy("tas").layout(topo, heads=6)  # gcd(8, 6) = 2: across machines
    assert tas.ulysses == ((0, 4), (1, 5), (2, 6), (3, 7)) and tas.ring == (
        (0, 1, 2, 3),
        (4, 5, 6, 7),
    )


def _bad(ctx: sf_comm.Context) -> list[str]:
    x = torch.randn(1, 4, 2, 8)
    cases = [
        dict(q=x[0], k=x[0], v=x[0]),
        dict(q=x, k=x, v=x[:, :3]),
        dict(q=x, k=x, v=x.half()),
        dict(q=x, k=x, v=x, strategy="spiral"),
        dict(q=x, k=x, v=x, strategy="ulysses"),  # 2 heads over 4 ranks
        dict(q=x, k=x, v=x, joint=(x[:, :2, :1],) * 3),
        dict(q=x, k=x, v=x, strategy="tas", ulysses_degree=3),
        dict(q=x if ctx.rank else torch.randn(1, 4, 4, 8), k=None, v=None),
        dict(q=x if ctx.rank != 3 else x[:, :1], k=None, v=None),
        dict(q=x, k=x, v=x, seq_len=20),  # every rank's shard would be 5
        dict(q=x, k=x, v=x, joint=(x,) * 3, text="spread"),
        dict(q=x, k=x, v=x, joint=(x[:, : 1 + (ctx.rank == 3)],) * 3, text="sharded"),
        dict(q=x, k=x, v=x, joint=(x[:, :1],) * 3, text="sharded", seq_len=16, text_len=8),
        dict(q=x, k=x, v=x, joint=(x,) * 3, joint_mask=torch.ones(1, 3, dtype=torch.bool)),
        dict(
            q=x,
            k=x,
            v=x,
            joint=(x,) * 3,
            text="sharded",
            joint_mask=x[:, :, 0, 0] if ctx.rank else None,
        ),
    ]
    msgs = []
    for case in cases:
        case = dict(case)
        if case.get("k", 0) is None:
            case["k"] = case["v"] = case["q"]
        try:
            sf_attn.parallel_attention(ctx=ctx, **case)
            msgs.append("no error")
        except (ValueError, TypeError) as exc:
            msgs.append(f"{type(exc).__name__}: {exc}")
    return msgs


def test_bad_input_errors_name_the_problem(ranks) -> None:
    """Catches bad input reaching the wire (a hang or garbage) instead of a clear error."""
    msgs = ranks(4).run(_bad, topology="2x2", transport="shm")[0]
    assert "q must be 4-D [batch, seq, heads, head_dim], got 3-D" in msgs[0]
    assert "q, k, v must have the same shape" in msgs[1]
    assert "must share a dtype" in msgs[2]
    assert "unknown strategy 'spiral'" in msgs[3] and "tas" in msgs[3]
    assert "needs at least 4 heads, got 2" in msgs[4] and "degrees that fit 2 heads" in msgs[4]
    assert "joint text_q must be [batch=1, text, heads=2, head_dim=8]" in msgs[5]
    assert "allows Ulysses degrees [1, 2, 4], got 3" in msgs[6]
    assert "ranks disagree on heads: [4, 2, 2, 2]" in msgs[7]
    assert "sequence shards [4, 4, 4, 1]" in msgs[8] and "split [4, 4, 4, 1]" not in msgs[8]
    assert "holds 4 tokens, but the shard of a 20-token sequence over 4 ranks is 5" in msgs[9]
    assert "text must be one of ['replicated', 'sharded'], got 'spread'" in msgs[10]
    assert "text shards [1, 1, 1, 2] (rank order)" in msgs[11] and "split [2, 1, 1, 1]" in msgs[11]
    assert "holds 1 text tokens, but the shard of 8 text tokens over 4 ranks is 2" in msgs[12]
    assert "joint_mask must be [batch=1, text=4], got (1, 3)" in msgs[13]
    assert "ranks disagree on joint_mask (none, bool, additive): [0, 2, 2, 2]" in msgs[14]
