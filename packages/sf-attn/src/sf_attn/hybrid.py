"""The Ulysses x Ring executor that ``ulysses``, ``ring``, ``usp`` and ``tas`` share.

Equivalent plain code (single process, on the gathered sequence)::

    out = softmax(scale * Q K^T) V      # over all image tokens (+ text tokens if joint)

What runs on each rank (P_u = Ulysses degree, P_r = Ring degree, see :mod:`sf_attn.layout`)::

    qkv_u  = all_to_all(stack(q, k, v), ulysses)   # [3, B, seq_u, heads/P_u, D]
    for step in range(P_r):                         # KV block of ring member (me - step)
        next = ring_shift(kv)      ──┐ in flight while the block computes
        o, lse = attn(q_u, kv)       │
        merge into (acc_o, acc_lse)  │
        kv = next.wait()           ◄─┘
    out = all_to_all(acc_o, ulysses)                # back to [B, seq_local, heads, D]

The first all-to-all is phase 1 (:func:`scatter_heads`, a strategy's ``begin``), the rest
phase 2 (:func:`ring_and_return`, its ``finish``); :func:`hybrid_attention` runs them back to
back, the compiler's overlap schedule apart.

    time ─►   compute: | blk 0 | blk 1 | ... | blk P_r-1 |
              ring:    | shift→1 | shift→2 | ...          (overlapped with compute)

Joint (MMDiT) text tokens ride inside these kernels: their K/V join the first block, their
queries are split among the Ring group and stacked on the image queries, and one all-gather
assembles the text output (Note [Text rows owned once] in :mod:`sf_attn.joint`). Per rank
and layer: P_r attention kernels and P_r - 1 merges, text or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

import sf_comm

from .backends import attention_with_lse
from .joint import (
    KV,
    Accumulator,
    block_key_mask,
    fold_text_keys,
    gather_text,
    join_tokens,
    my_text_rows,
)
from .layout import Layout
from .sharding import chunk_offsets, chunk_sizes

# Note [Gathered ring]
# A Ring group inside one machine may gather its KV blocks over the fast link in one
# all-gather (the same bytes as P_r - 1 ring shifts) instead of rotating them: then a rank
# computes its own block while the gather flies and every peer's block in one more kernel,
# 2 kernels and 1 merge instead of P_r and P_r - 1, holding P_r blocks at once. Rotating
# hides each shift behind a block's compute; gathering trades that overlap for fewer, larger
# kernels, which wins where blocks are small (per-kernel and per-merge costs dominate) and the
# gather hides behind the own block. SF_GATHER_KV: "never" (the default: measured on CPU ranks
# and costed by the simulator on H100/H200 machines, gathering was no faster: ring on one
# 8-GPU H200 machine, Flux 2048 px, 122.8 vs 118.9 ms/step), "auto" (rings inside one machine
# whose gathered peers' KV fits SF_GATHER_KV_MB, default 1024 MiB) or "always" (any ring).
# Every rank must see the same values (they decide the collectives; sf_comm.init checks them).
GATHER_ENV = ("SF_GATHER_KV", "SF_GATHER_KV_MB")
sf_comm.agree_on_env(*GATHER_ENV)
_GATHER_MODES = ("never", "auto", "always")


_forced_mode: str | None = None  # rotating_rings() sets "never" (the simulator's xDiT rows)


@contextlib.contextmanager
def rotating_rings() -> Iterator[None]:
    """Within the block every Ring rotates its blocks whatever SF_GATHER_KV says: for costing
    a peer's executor that never gathers (xDiT's ring), Note [Gathered ring]."""
    global _forced_mode
    saved, _forced_mode = _forced_mode, "never"
    try:
        yield
    finally:
        _forced_mode = saved


def gather_setting() -> tuple[str, float]:
    """``(SF_GATHER_KV, SF_GATHER_KV_MB in bytes)`` (Note [Gathered ring]).

    Raises:
        ValueError: either is not a valid setting (the message says what is allowed).
    """
    mode = _forced_mode or os.environ.get("SF_GATHER_KV", "never")
    if mode not in _GATHER_MODES:
        raise ValueError(f"SF_GATHER_KV must be one of {list(_GATHER_MODES)}, got {mode!r}")
    raw = os.environ.get("SF_GATHER_KV_MB", "1024")
    try:
        budget = float(raw)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise ValueError(f"SF_GATHER_KV_MB must be a number of MiB >= 0, got {raw!r}")
    return mode, budget * 2**20


def gather_ring(ctx: sf_comm.CommContext, ring: sf_comm.Group, nbytes: int) -> bool:
    """Whether ``ring`` gathers its KV blocks (``nbytes``: the peers' blocks this rank would
    hold) instead of rotating them (Note [Gathered ring])."""
    mode, budget = gather_setting()
    if mode != "auto":
        return mode == "always"  # "never" (the default) rotates
    gpus = ctx.topology.gpus_per_machine
    if len({rank // gpus for rank in ring.ranks}) > 1:  # crosses machines: keep the overlap
        return False
    return nbytes <= budget


def scatter_heads(
    ctx: sf_comm.CommContext,
    layout: Layout,
    xs: torch.Tensor,
    seq_lens: Sequence[int],
) -> sf_comm.Handle[torch.Tensor]:
    """Phase 1 (``begin``): start the Ulysses all-to-all of the stacked tensors ``xs``.

    ``xs`` is [n, batch, seq_local, heads, dim] (e.g. n = 3 for Q, K, V); the handle yields
    [n, batch, seq_u, heads_u, dim]: this Ulysses group's tokens (member order) for head
    group ``ug.index``. With Ulysses degree 1 it is ``xs`` itself. Equivalent plain code::

        full = gather(xs, dim=2)                          # the group's tokens, all heads
        out = full[:, :, :, head_group(ug.index)]
    """
    ug = ctx.subgroup(layout.ulysses, "ulysses")
    if ug.size == 1:
        return sf_comm.Handle.completed(xs)
    n, batch, _, heads, dim = xs.shape
    head_sizes, head_off = chunk_sizes(heads, ug.size), chunk_offsets(heads, ug.size)
    ins = [xs[:, :, :, head_off[j] : head_off[j + 1]] for j in range(ug.size)]
    shapes = [(n, batch, seq_lens[r], head_sizes[ug.index], dim) for r in ug.ranks]
    sent = sf_comm.all_to_all(ctx, ug, ins, shapes)
    return sf_comm.Handle(lambda: torch.cat(sent.wait(), dim=2), sent.is_completed)


def ring_and_return(
    q_u: torch.Tensor,
    kv: KV,
    *,
    ctx: sf_comm.CommContext,
    layout: Layout,
    seq_lens: Sequence[int],
    heads: int,
    scale: float,
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_mask: torch.Tensor | None = None,
    key_masks: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Phase 2 (``finish``): the Ring over the exchanged tokens, then the output back.

    One attention kernel per ring step, text tokens included (Note [Text rows owned once] in
    :mod:`sf_attn.joint`).

    Args:
        q_u: [batch, seq_u, heads_u, dim], this rank's queries after :func:`scatter_heads`.
        kv: [2, batch, seq_u, heads_u, dim], its keys and values, contiguous (with Ring
            degree 1 also a pair (k, v): nothing rotates).
        heads: the layer's head count (all head groups).
        joint: replicated text (tq, tk, tv) with all ``heads``, or None.
        key_masks: every rank's mask over its own keys, in rank order, or None.
        The rest as :func:`hybrid_attention`.

    Returns:
        As :func:`hybrid_attention`.
    """
    ug = ctx.subgroup(layout.ulysses, "ulysses")
    rg = ctx.subgroup(layout.ring, "ring")
    batch, _, h_i, dim = q_u.shape
    p_u, p_r, i = ug.size, rg.size, ug.index
    head_sizes = chunk_sizes(heads, p_u)
    head_off = chunk_offsets(heads, p_u)

    queries, rows, text_kv = q_u, 0, None
    if joint is not None:
        tq, tk, tv = (t[:, :, head_off[i] : head_off[i + 1]] for t in joint)
        mine = my_text_rows(tq.shape[1], rg)
        rows = mine.stop - mine.start
        queries = join_tokens(tq[:, mine], q_u)  # [batch, rows + seq_u, h_i, dim]
        text_kv = (tk, tv)

    # The Ring over the ranks that hold the same heads: KV blocks rotate, outputs merge.
    u_group_of = {r: g for g in layout.ulysses for r in g}
    block_len = [sum(seq_lens[r] for r in u_group_of[rank]) for rank in rg.ranks]
    acc = Accumulator()

    def attend(block: KV, owners: Sequence[int], first: bool) -> None:
        """The queries against one KV block of ``owners``' tokens; the text keys (and their
        mask) join the ``first`` block."""
        keys, values = block[0], block[1]
        mask = block_key_mask(key_masks, owners)
        if first and text_kv is not None:
            keys, values, mask = fold_text_keys(text_kv, block, joint_mask)
        acc.add(
            *attention_with_lse(queries, keys, values, scale=scale, key_mask=mask, backend=backend)
        )

    peers_bytes = (
        (sum(block_len) - block_len[rg.index]) * 2 * batch * h_i * dim * q_u.element_size()
    )
    if p_r > 1 and gather_ring(ctx, rg, peers_bytes):  # Note [Gathered ring]
        assert isinstance(kv, torch.Tensor), "a ring block is one stacked tensor"
        shapes = [(2, batch, n, h_i, dim) for n in block_len]
        gathered = sf_comm.all_gather(ctx, rg, kv, shapes)  # flies while the own block computes
        attend(kv, u_group_of[ctx.rank], first=True)
        parts = gathered.wait()
        peers = [m for m in range(p_r) if m != rg.index]
        attend(  # one block: every peer's keys
            torch.cat([parts[m] for m in peers], dim=2),
            [r for m in peers for r in u_group_of[rg.ranks[m]]],
            first=False,
        )
    else:
        for step in range(p_r):
            pending = None
            if step < p_r - 1:
                src = (rg.index - step - 1) % p_r
                assert isinstance(kv, torch.Tensor), "a rotating block is one stacked tensor"
                pending = sf_comm.ring_shift(
                    ctx, rg, kv, out_shape=(2, batch, block_len[src], h_i, dim)
                )
            attend(kv, u_group_of[rg.ranks[(rg.index - step) % p_r]], first=step == 0)
            if pending is not None:
                kv = pending.wait()

    out_all = acc.result(q_u.dtype)
    text_out = None
    if joint is not None:
        text_out = gather_text(
            ctx, layout, out_all[:, :rows], text_len=joint[0].shape[1], heads=heads
        )
    out_u = out_all[:, rows:]

    # Ulysses back: Ulysses-group sequence, heads group i -> own sequence chunk, all heads.
    if p_u == 1:
        return out_u, text_out
    seq_local = seq_lens[ctx.rank]
    pieces = list(out_u.split([seq_lens[r] for r in ug.ranks], dim=1))
    back = [(batch, seq_local, head_sizes[j], dim) for j in range(p_u)]
    out = torch.cat(sf_comm.all_to_all(ctx, ug, pieces, back).wait(), dim=2)
    return out, text_out


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ctx: sf_comm.CommContext,
    layout: Layout,
    seq_lens: Sequence[int],
    scale: float,
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_mask: torch.Tensor | None = None,
    key_masks: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of this rank's shard against the whole sharded sequence: the two
    phases back to back (the compiler's overlap schedule runs them apart)::

        qkv_u = scatter_heads(ctx, layout, stack([q, k, v]), seq_lens).wait()
        return ring_and_return(qkv_u[0], qkv_u[1:], ...)

    Args:
        q, k, v: this rank's shard, [batch, seq_local, heads, head_dim].
        ctx: the communication context.
        layout: Ulysses and Ring partitions of the world.
        seq_lens: every rank's ``seq_local``, in rank order.
        scale: score scale.
        joint: replicated text (tq, tk, tv), [batch, text, heads, head_dim], or None.
        joint_mask: [batch, text] key mask of the text tokens (bool or additive), or None.
        key_masks: every rank's [batch, seq_local] mask over its own keys (bool or additive),
            in rank order, or None (not with ``joint``: sharded text, Note [Sharded text]).
        backend: local attention backend.

    Returns:
        (out [batch, seq_local, heads, head_dim], text out [batch, text, heads, head_dim] or None)
    """
    kv: KV
    if layout.p_u == 1:  # nothing to exchange: q stays, k/v stacked only if they rotate
        q_u, kv = q, torch.stack([k, v]) if layout.p_r > 1 else (k, v)
    else:
        qkv = scatter_heads(ctx, layout, torch.stack([q, k, v]), seq_lens).wait()
        q_u, kv = qkv[0], qkv[1:]  # a leading-dim slice of a contiguous tensor: contiguous
    return ring_and_return(
        q_u,
        kv,
        ctx=ctx,
        layout=layout,
        seq_lens=seq_lens,
        heads=q.shape[2],
        scale=scale,
        joint=joint,
        joint_mask=joint_mask,
        key_masks=key_masks,
        backend=backend,
    )
