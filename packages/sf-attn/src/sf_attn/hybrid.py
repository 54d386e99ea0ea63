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

Joint (MMDiT) text tokens are replicated on every rank: their K/V are one extra block merged
once per query (never once per rank), and text queries are computed against every block by
the ranks of a Ring group and merged in block order, so every rank returns bit-identical text
output (Note [Canonical text merge]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import sf_comm

from .backends import attention_with_lse
from .layout import Layout
from .merge import merge_attention_
from .sharding import chunk_offsets, chunk_sizes


def _empty_acc(
    batch: int, seq: int, heads: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    acc_o = torch.zeros(batch, seq, heads, dim, dtype=torch.float32, device=device)
    acc_lse = torch.full((batch, heads, seq), -math.inf, dtype=torch.float32, device=device)
    return acc_o, acc_lse


def _text_output(
    ctx: sf_comm.CommContext,
    ug: sf_comm.Group,
    text_q: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    *,
    joint_mask: torch.Tensor | None,
    scale: float,
    backend: str,
    head_sizes: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The text queries' output (Note [Canonical text merge]: the text block first, then
    ``parts``, the partials against the sharded blocks, in the order given), with every head
    group gathered over the Ulysses group ``ug``."""
    t_o, t_lse = attention_with_lse(
        text_q, text_k, text_v, scale=scale, key_mask=joint_mask, backend=backend
    )
    t_acc_o, t_acc_lse = t_o.float(), t_lse.clone()
    for part in parts:
        assert part is not None
        merge_attention_(t_acc_o, t_acc_lse, *part)
    text_out = t_acc_o.to(dtype)
    if ug.size > 1:
        batch, text, _, dim = text_out.shape
        t_shapes = [(batch, text, head_sizes[j], dim) for j in range(ug.size)]
        text_out = torch.cat(sf_comm.all_gather(ctx, ug, text_out, t_shapes).wait(), dim=2)
    return text_out


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
    kv: torch.Tensor,
    *,
    ctx: sf_comm.CommContext,
    layout: Layout,
    seq_lens: Sequence[int],
    heads: int,
    scale: float,
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Phase 2 (``finish``): the Ring over the exchanged tokens, then the output back.

    Args:
        q_u: [batch, seq_u, heads_u, dim], this rank's queries after :func:`scatter_heads`.
        kv: [2, batch, seq_u, heads_u, dim], its keys and values (contiguous).
        heads: the layer's head count (all head groups).
        joint: replicated text (tq, tk, tv) with all ``heads``, or None.
        The rest as :func:`hybrid_attention`.

    Returns:
        As :func:`hybrid_attention`.
    """
    ug = ctx.subgroup(layout.ulysses, "ulysses")
    rg = ctx.subgroup(layout.ring, "ring")
    batch, seq_u, h_i, dim = q_u.shape
    p_u, p_r, i = ug.size, rg.size, ug.index
    head_sizes = chunk_sizes(heads, p_u)
    head_off = chunk_offsets(heads, p_u)

    text_q = text_kv = None
    if joint is not None:
        tq, tk, tv = (t[:, :, head_off[i] : head_off[i + 1]] for t in joint)
        text_q, text_kv = tq, (tk, tv)

    # The Ring over the ranks that hold the same heads: KV blocks rotate, outputs merge.
    block_len = [
        sum(seq_lens[r] for r in next(g for g in layout.ulysses if rank in g)) for rank in rg.ranks
    ]
    acc_o, acc_lse = _empty_acc(batch, seq_u, h_i, dim, q_u.device)
    text_parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * p_r
    holder = rg.index  # ring member whose KV block we hold
    for step in range(p_r):
        pending = None
        if step < p_r - 1:
            src = (rg.index - step - 1) % p_r
            pending = sf_comm.ring_shift(
                ctx, rg, kv, out_shape=(2, batch, block_len[src], h_i, dim)
            )
        merge_attention_(
            acc_o, acc_lse, *attention_with_lse(q_u, kv[0], kv[1], scale=scale, backend=backend)
        )
        if text_q is not None:
            text_parts[holder] = attention_with_lse(
                text_q, kv[0], kv[1], scale=scale, backend=backend
            )
        if pending is not None:
            kv = pending.wait()
            holder = (holder - 1) % p_r

    text_out = None
    if text_q is not None and text_kv is not None:
        tk, tv = text_kv
        block = attention_with_lse(q_u, tk, tv, scale=scale, key_mask=joint_mask, backend=backend)
        merge_attention_(acc_o, acc_lse, *block)
        # Note [Canonical text merge]: text block first, then ring blocks in member order.
        text_out = _text_output(
            ctx,
            ug,
            text_q,
            tk,
            tv,
            text_parts,
            joint_mask=joint_mask,
            scale=scale,
            backend=backend,
            head_sizes=head_sizes,
            dtype=q_u.dtype,
        )

    # Ulysses back: Ulysses-group sequence, heads group i -> own sequence chunk, all heads.
    out_u = acc_o.to(q_u.dtype)
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
        backend: local attention backend.

    Returns:
        (out [batch, seq_local, heads, head_dim], text out [batch, text, heads, head_dim] or None)
    """
    qkv = scatter_heads(ctx, layout, torch.stack([q, k, v]), seq_lens).wait()
    return ring_and_return(
        qkv[0],
        qkv[1:].contiguous(),
        ctx=ctx,
        layout=layout,
        seq_lens=seq_lens,
        heads=q.shape[2],
        scale=scale,
        joint=joint,
        joint_mask=joint_mask,
        backend=backend,
    )
