"""Torus Attention: TAS's Ulysses exchange split into stages that overlap with compute.

Equivalent plain code: the ``tas`` strategy (Ulysses all-to-all over the torus group, a Ring
over the ranks holding the same heads, all-to-all back), hence single-device attention.

Write X[l, h] for sequence chunk l (torus member l's tokens) and head group h (of N). Member
t computes head group t for every chunk. KV[t, t] and Q[t, t] never move, so compute starts
at once (Note [Torus stage order])::

    Q stages   s = 0..N-1:  compute Q[t+s, t] x KV[t, t]      while pulling Q[t+s+1, t]
                                                              (last stage: KV[t+1, t])
    KV stages  j = 0..N-1:  compute every Q[., t] x KV[t+j, t] while pulling KV[t+j+1, t]
                            (each KV block goes round the intra Ring: P_r compute steps)
    push O:    last step:   finish remote chunks first, push O[l, t] to member l each,
                            then the local chunk O[t, t] while the pushes fly

    time ─►  compute: |Q0xKV0|Q1xKV0|..|QxKV1 ring|..|QxKV(N-1): remote.. local|
             inter:      |pull Q1|pull Q2|..|pull KV1|..|pull KV2|..  |push O|push O|
             intra:                        |shift|shift|..

Inter-machine bytes equal Ulysses' (Q, K, V in and O back, (N-1)/N of each); intra bytes
equal the Ring's. Only the last compute step and the last push are exposed.

Note [Torus stage order]: pulls are ``shift(offset=-(s+1))`` collectives on the torus group
(every member sends the head group of member ``t-(s+1)`` and receives from ``t+s+1``), so
every member issues the same collectives in the same order, as the transports require.
Joint text tokens join the stationary block (keys) and the local chunk (this rank's share of
the text rows), Note [Text rows owned once] in :mod:`sf_attn.joint`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import sf_comm

from .backends import attention_with_lse
from .joint import block_key_mask, fold_text_keys, gather_text, my_text_rows
from .layout import Layout
from .merge import merge_attention_
from .sharding import chunk_offsets, chunk_sizes

Acc = tuple[torch.Tensor, torch.Tensor]  # (out, lse)


def _empty_acc(
    batch: int, seq: int, heads: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    acc_o = torch.zeros(batch, seq, heads, dim, dtype=torch.float32, device=device)
    acc_lse = torch.full((batch, heads, seq), -math.inf, dtype=torch.float32, device=device)
    return acc_o, acc_lse


def torus_attention(
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
    """Exact attention of this rank's shard; same contract as :func:`hybrid_attention`."""
    ug = ctx.subgroup(layout.ulysses, "ulysses")  # the torus group
    rg = ctx.subgroup(layout.ring, "ring")
    n, p_r, t = ug.size, rg.size, ug.index
    batch, _, heads, dim = q.shape
    hs, ho = chunk_sizes(heads, n), chunk_offsets(heads, n)

    def heads_of(member: int) -> slice:
        member %= n
        return slice(ho[member], ho[member + 1])

    lens = [seq_lens[r] for r in ug.ranks]  # chunk length of each torus member
    u_group_of = {r: g for g in layout.ulysses for r in g}
    ring_lens = [[seq_lens[r] for r in u_group_of[p]] for p in rg.ranks]
    h_t = hs[t]

    def attend(qc: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> Acc:
        return attention_with_lse(qc, kv[0], kv[1], scale=scale, key_mask=mask, backend=backend)

    def pull(x: torch.Tensor, d: int) -> sf_comm.Handle[torch.Tensor]:
        """Member t+d's chunk of ``x`` in head group t (member t-d gets ours in its group)."""
        send = x[..., heads_of(t - d), :].contiguous()
        shape = (*x.shape[:-3], lens[(t + d) % n], h_t, dim)
        return sf_comm.shift(ctx, ug, send, offset=-d, out_shape=shape)

    kv_own = torch.stack([k, v])  # [2, batch, seq_local, heads, dim]
    kv_t = kv_own[:, :, :, heads_of(t)].contiguous()  # KV[t, t]: never moves
    # All Q chunks of head group t live in one buffer, remote chunks first in member order
    # t+1, ..., t+n-1, then the local chunk t, then this rank's text rows (Note [Text rows
    # owned once]): one attention call per KV block covers them all, and the remote prefix
    # can finish (and be pushed) before the local chunk.
    slots = [(t + 1 + i) % n for i in range(n - 1)] + [t]
    start = {}
    pos = 0
    for member in slots:
        start[member] = pos
        pos += lens[member]
    remote = pos - lens[t]

    def mask_of(ring_member: int, member: int) -> torch.Tensor | None:
        """Key mask of KV[member, t] as ring member ``ring_member`` holds it."""
        return block_key_mask(key_masks, [u_group_of[rg.ranks[ring_member]][member % n]])

    stationary: tuple[torch.Tensor, torch.Tensor | None] = (kv_t, mask_of(rg.index, t))
    text_rows = slice(pos, pos)
    mine_q = None
    if joint is not None:
        mine = my_text_rows(joint[0].shape[1], rg)
        mine_q = joint[0][:, mine, heads_of(t)]
        text_rows = slice(pos, pos + mine.stop - mine.start)
        text_kv = (joint[1][:, :, heads_of(t)], joint[2][:, :, heads_of(t)])
        # the text keys join the stationary block, which every Q chunk meets exactly once
        k_t, v_t, mask_t = fold_text_keys(text_kv, kv_t, joint_mask)
        stationary = (torch.stack([k_t, v_t]), mask_t)
    total = text_rows.stop

    def rows(member: int) -> slice:
        if member == t:  # the local chunk and the text rows finish together
            return slice(start[t], total)
        return slice(start[member], start[member] + lens[member])

    q_all = torch.empty(
        batch, total, h_t, dim, dtype=q.dtype, device=q.device
    )  # [batch, seq_u + text rows, h_t, dim]
    q_all[:, start[t] : start[t] + lens[t]] = q[:, :, heads_of(t)]
    if mine_q is not None:
        q_all[:, text_rows] = mine_q
    acc_o, acc_lse = _empty_acc(batch, total, h_t, dim, q.device)

    def merge_rows(sl: slice, kv: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        o, lse = attend(q_all[:, sl], kv, mask)
        merge_attention_(acc_o[:, sl], acc_lse[:, :, sl], o, lse)

    # Q stages: stationary KV[t, t] (and the text keys) against each Q chunk as it arrives.
    blocks: list[torch.Tensor | None] = [None] * n  # KV[t+j, t] as received
    blocks[0] = kv_t
    for s in range(n):
        pending = None
        if s < n - 1:
            pending = pull(q, s + 1)
        elif n > 1:
            pending = pull(kv_own, 1)
        merge_rows(rows((t + s) % n), *stationary)
        if pending is not None:
            got = pending.wait()
            if s < n - 1:
                q_all[:, rows((t + s + 1) % n)] = got
            else:
                blocks[1] = got

    # KV stages: each KV block goes round the intra ring; all Q chunks meet it at once.
    pushes: list[sf_comm.Handle[torch.Tensor]] = []
    for j in range(n):
        pending = pull(kv_own, j + 1) if 1 <= j < n - 1 else None
        cur = blocks[j]
        assert cur is not None
        for r in range(p_r):
            shift = None
            if r < p_r - 1:
                src = (rg.index - r - 1) % p_r
                shape = (2, batch, ring_lens[src][(t + j) % n], h_t, dim)
                shift = sf_comm.ring_shift(ctx, rg, cur, out_shape=shape)
            if not (j == 0 and r == 0):  # that pair ran in the Q stages
                mask = mask_of((rg.index - r) % p_r, t + j)
                if j == n - 1 and r == p_r - 1:  # last step: remote rows, push, then local
                    if remote:
                        merge_rows(slice(0, remote), cur, mask)
                    for d in range(1, n):
                        member = (t + d) % n
                        out_shape = (batch, lens[t], hs[(t - d) % n], dim)
                        o_chunk = acc_o[:, rows(member)].to(q.dtype)
                        pushes.append(
                            sf_comm.shift(ctx, ug, o_chunk, offset=d, out_shape=out_shape)
                        )
                    merge_rows(rows(t), cur, mask)
                else:
                    merge_rows(slice(0, total), cur, mask)
            if shift is not None:
                cur = shift.wait()
        if pending is not None:
            blocks[j + 1] = pending.wait()

    out = torch.empty(batch, lens[t], heads, dim, dtype=q.dtype, device=q.device)
    out[:, :, heads_of(t)] = acc_o[:, start[t] : start[t] + lens[t]].to(q.dtype)
    for d, handle in zip(range(1, n), pushes):
        out[:, :, heads_of(t - d)] = handle.wait()

    text_out = None
    if joint is not None:
        tile = acc_o[:, text_rows].to(q.dtype)
        text_out = gather_text(ctx, layout, tile, text_len=joint[0].shape[1], heads=heads)
    return out, text_out
