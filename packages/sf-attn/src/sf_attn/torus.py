"""Torus Attention: TAS's Ulysses exchange overlapped with compute, one kernel per stage.

Equivalent plain code: the ``tas`` strategy (Ulysses all-to-all over the torus group, a Ring
over the ranks holding the same heads, all-to-all back), hence single-device attention.

Write X[l, h] for sequence chunk l (torus member l's tokens) and head group h (of N). Member
t computes head group t for every chunk. Its Ring group (the ranks of its machine under the
inter-first layout) holds the same head group, so a KV block of a stage is gathered over the
fast intra link once (every member's KV[l, t], one kernel per stage) instead of going round
the ring (a kernel per ring step). KV[t, t] and Q[t, t] never move, so compute starts at
once; every inter-machine transfer is issued at the start, so the slow link is never idle
while work remains (Note [Torus schedule])::

    issue:   gather KV[t, t] (intra); pull Q[t+d, t], then KV[t+d, t], d = 1..N-1 (inter)
    local:   L x (text keys, KV[t, t])           L = local chunk (+ this rank's text rows)
             L x gathered KV[t, t] of the ring peers
    stages   j = 1..N-2:  (R, L) x gathered KV[t+j, t]        R = the remote Q chunks
    last:    R x (text keys, gathered KV[t, t], gathered KV[t+N-1, t]); push O[l, t] to
             member l each; then L x gathered KV[t+N-1, t] while the pushes fly

    time ─►  compute: |L x KV0|L x peers|stage 1|..|R last|L last|
             inter:   |pull Q..............|pull KV1|pull KV2|..|      |push O|
             intra:   |gather KV0|gather KV1|gather KV2|..

Inter-machine bytes equal Ulysses' (Q, K, V in and O back, (N-1)/N of each); intra bytes
equal the Ring's (each block once from every ring peer). Per rank and layer: N + 2 attention
kernels (N + 1 with a ring of one), at most world + 1. The last compute step and the pushes
are exposed; so is the text gather with replicated text.

Note [Torus schedule]: transfers are ``shift(offset=-d)`` collectives on the torus group
(every member sends the head group of member ``t-d`` and receives from ``t+d``) and
all-gathers on the ring group, issued by every member in the same order, as the transports
require. All pulls in flight at once need the memory Ulysses needs anyway (every chunk of
head group t). Joint text tokens: their keys join the first local kernel and the remote
chunks' last kernel (every Q row meets them once); the text rows this rank owns ride with
the local chunk (Note [Text rows owned once] in :mod:`sf_attn.joint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import sf_comm

from .backends import attention_with_lse
from .joint import block_key_mask, concat_masks, gather_text, my_text_rows
from .layout import Layout
from .merge import merge_attention_
from .sharding import chunk_offsets, chunk_sizes

Block = tuple[torch.Tensor, torch.Tensor | None]  # (stacked KV [2, B, seq, h, D], key mask)


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
    h_t = hs[t]

    def heads_of(member: int) -> slice:
        member %= n
        return slice(ho[member], ho[member + 1])

    lens = [seq_lens[r] for r in ug.ranks]  # chunk length of each torus member
    u_group_of = {r: g for g in layout.ulysses for r in g}

    def owner(ring_member: int, member: int) -> int:
        """The rank whose tokens are chunk ``member`` of ring member ``ring_member``'s group."""
        return u_group_of[rg.ranks[ring_member]][member % n]

    def pull(x: torch.Tensor, d: int) -> sf_comm.Handle[torch.Tensor]:
        """Member t+d's chunk of ``x`` in head group t (member t-d gets ours in its group)."""
        send = x[..., heads_of(t - d), :].contiguous()
        shape = (*x.shape[:-3], lens[(t + d) % n], h_t, dim)
        return sf_comm.shift(ctx, ug, send, offset=-d, out_shape=shape)

    def gather_ring(kv: torch.Tensor, member: int) -> sf_comm.Handle[list[torch.Tensor]]:
        """Every ring member's KV[member, t] (the fast link), in ring order."""
        shapes = [(2, batch, seq_lens[owner(m, member)], h_t, dim) for m in range(p_r)]
        return sf_comm.all_gather(ctx, rg, kv, shapes)

    def block(parts: Sequence[torch.Tensor], member: int, ring_members: Sequence[int]) -> Block:
        """One KV block from ``parts`` (chunk ``member`` of each of ``ring_members``), with its
        key mask (Note [Sharded text] in :mod:`sf_attn.joint`)."""
        kv = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=2)
        mask = block_key_mask(key_masks, [owner(m, member) for m in ring_members])
        return kv, mask

    # Issue every transfer (Note [Torus schedule]).
    kv_own = torch.stack([k, v])  # [2, batch, seq_local, heads, dim]
    kv_t = kv_own[:, :, :, heads_of(t)].contiguous()  # KV[t, t]: never moves
    gathers: list[sf_comm.Handle[list[torch.Tensor]] | None] = [None] * n
    if p_r > 1:
        gathers[0] = gather_ring(kv_t, t)
    q_pulls = [pull(q, d) for d in range(1, n)]
    kv_pulls = [pull(kv_own, d) for d in range(1, n)]

    # All Q chunks of head group t live in one buffer: remote chunks first in member order
    # t+1, ..., t+n-1 (R), then the local chunk t and this rank's text rows (L).
    remote = sum(lens[(t + d) % n] for d in range(1, n))
    local = slice(remote, remote + lens[t])
    text_rows = slice(local.stop, local.stop)
    text_kv: Block | None = None
    mine_q = None
    if joint is not None:
        mine = my_text_rows(joint[0].shape[1], rg)
        mine_q = joint[0][:, mine, heads_of(t)]
        text_rows = slice(local.stop, local.stop + mine.stop - mine.start)
        text_kv = (
            torch.stack([joint[1][:, :, heads_of(t)], joint[2][:, :, heads_of(t)]]),
            joint_mask,
        )
    total = text_rows.stop
    rows_l, rows_r = slice(remote, total), slice(0, remote)
    q_all = torch.empty(batch, total, h_t, dim, dtype=q.dtype, device=q.device)
    q_all[:, local] = q[:, :, heads_of(t)]
    if mine_q is not None:
        q_all[:, text_rows] = mine_q
    acc_o, acc_lse = _empty_acc(batch, total, h_t, dim, q.device)

    def compute(rows: slice, *blocks: Block | None) -> None:
        """``rows`` against the concatenation of ``blocks``, merged into the accumulator."""
        kvs = [b for b in blocks if b is not None]
        kv = kvs[0][0] if len(kvs) == 1 else torch.cat([b[0] for b in kvs], dim=2)
        mask = concat_masks([(b[1], b[0].shape[2]) for b in kvs], batch)
        o, lse = attention_with_lse(
            q_all[:, rows], kv[0], kv[1], scale=scale, key_mask=mask, backend=backend
        )
        merge_attention_(acc_o[:, rows], acc_lse[:, :, rows], o, lse)

    me = [rg.index]
    peers = [m for m in range(p_r) if m != rg.index]
    own = block([kv_t], t, me)
    compute(rows_l, text_kv, own)  # no transfer needed: starts at once
    blocks: list[Block | None] = [None] * n  # gathered KV[t+j, t] (all ring members)
    if n > 1 and p_r > 1:
        gathers[1] = gather_ring(kv_pulls[0].wait(), t + 1)
    if p_r > 1:
        got = gathers[0]
        assert got is not None
        parts = got.wait()
        blocks[0] = block(parts, t, range(p_r))
        compute(rows_l, block([parts[m] for m in peers], t, peers))
    else:
        blocks[0] = own

    if n > 1:
        pos = 0
        for d, handle in enumerate(q_pulls, start=1):  # the remote Q chunks, member order
            size = lens[(t + d) % n]
            q_all[:, pos : pos + size] = handle.wait()
            pos += size
    pushes: list[sf_comm.Handle[torch.Tensor]] = []
    for j in range(1, n):
        if p_r == 1:
            blocks[j] = block([kv_pulls[j - 1].wait()], t + j, me)
        else:
            if j + 1 < n:  # the next block's gather flies while this stage computes
                gathers[j + 1] = gather_ring(kv_pulls[j].wait(), t + j + 1)
            got = gathers[j]
            assert got is not None
            blocks[j] = block(got.wait(), t + j, range(p_r))
        if j < n - 1:
            compute(slice(0, total), blocks[j])
            continue
        # Last stage: the remote rows first (with the blocks they have not met yet), push
        # them to their owners, then the local rows while the pushes fly.
        compute(rows_r, text_kv, blocks[0], blocks[j])
        start = 0
        for d in range(1, n):
            member = (t + d) % n
            o_chunk = acc_o[:, start : start + lens[member]].to(q.dtype)
            start += lens[member]
            out_shape = (batch, lens[t], hs[(t - d) % n], dim)
            pushes.append(sf_comm.shift(ctx, ug, o_chunk, offset=d, out_shape=out_shape))
        compute(rows_l, blocks[j])

    out = torch.empty(batch, lens[t], heads, dim, dtype=q.dtype, device=q.device)
    out[:, :, heads_of(t)] = acc_o[:, local].to(q.dtype)
    for d, handle in zip(range(1, n), pushes):
        out[:, :, heads_of(t - d)] = handle.wait()

    text_out = None
    if joint is not None:
        tile = acc_o[:, text_rows].to(q.dtype)
        text_out = gather_text(ctx, layout, tile, text_len=joint[0].shape[1], heads=heads)
    return out, text_out
