"""The overlap schedule: start each of V, K, Q's Ulysses exchange as soon as it is computed.

Plain code (``streamfusion::attention``, what the non-overlapped graph runs)::

    q, k, v = proj_q(x), proj_k(x), proj_v(x)     # + norms / RoPE on q and k
    out = parallel_attention(q, k, v)             # all-to-all(q, k, v) -> ring -> all-to-all back

Overlapped (same numbers, bit for bit: the same exchanges and the same ring)::

    v = proj_v(x)                                  ; sent_v = ulysses_send([v])   # V first:
    q, k = rope(norm(proj_q(x))), rope(norm(proj_k(x))); sent_qk = ulysses_send([q, k])  # no norm/RoPE
    out = attention_overlapped(q, k, v, sent_qk, sent_v)   # wait -> ring -> exchange back

    time ─►  compute: | proj V | proj Q, K, norms, RoPE | (wait) | ring blocks ... |
             link:             | V all-to-all ─────────►| Q,K all-to-all ─►|

The pass emits V's send right after V's producer, the Q/K send right after the later of the
two, and moves V's projection (the nodes only V needs) ahead of Q's and K's
(:func:`hoist_value_sends`), so V's exchange runs while Q and K are projected, normed and
rotated. With a fused QKV projection V comes out together with Q and K; it is still sent
first, during Q and K's norms and RoPE. Two exchanges instead of the plain op's one stacked
Q/K/V exchange: on links that move data while the device computes (NVLink, InfiniBand with
one-sided puts) V's is hidden; where a put is a memcpy by the sending core (the CPU shm
transport) there is nothing to hide it behind and the extra exchange only costs, hence
``overlap="auto"`` turns it on for CUDA contexts only (measured in :mod:`sf_compile.bench`).

Only the Ulysses exchange has something to overlap with here; a strategy whose layout has
Ulysses degree 1 (``ring``) or its own staged schedule (``torus``) keeps the plain op.
Inductor sees the sends as opaque calls and keeps their data dependencies; its own
comm/compute reordering only moves c10d functional collectives.

Concurrency contract: a send stores its handle under (slot, name) until the matching
``attention_overlapped`` call takes it; slots are unique per attention node of every graph
compiled in the process, and a graph runs its nodes in order, so a slot holds at most one
pending exchange per name.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import fx

import sf_attn
import sf_comm
from sf_attn.hybrid import hybrid_attention
from sf_attn.layout import Layout
from sf_attn.sharding import chunk_offsets, chunk_sizes

from .layout import Shard
from .ops import context_for

__all__ = ["hoist_value_sends", "overlap_plan"]

_PENDING: dict[tuple[int, str], sf_comm.Handle[list[torch.Tensor]]] = {}
_SLOTS = itertools.count()


def overlap_plan(
    ctx_key: int, strategy: str, heads: int, head_dim: int, dtype: torch.dtype, tokens: int
) -> tuple[str, int] | None:
    """(strategy, Ulysses degree) to overlap with, or None when there is nothing to overlap
    (Ulysses degree 1, torus, or a world of one). ``auto`` is resolved now, with the same
    planner call ``parallel_attention`` makes, so the choice is the one it would make."""
    ctx = context_for(ctx_key)
    degree = None
    if strategy == "auto":
        from sf_attn.planner import choose_strategy

        strategy, degree = choose_strategy(
            ctx.topology,
            heads=heads,
            seq_len=tokens,
            head_dim=head_dim,
            dtype=dtype,
            one_sided=ctx.transport.one_sided,
        )
    if strategy == "torus":
        return None
    layout = sf_attn.get_strategy(strategy).layout(ctx.topology, heads, degree)
    return (strategy, layout.p_u) if layout.p_u > 1 else None


@functools.lru_cache(maxsize=64)
def _layout(topology: sf_comm.Topology, strategy: str, heads: int, degree: int) -> Layout:
    return sf_attn.get_strategy(strategy).layout(topology, heads, degree)


def _ulysses(
    ctx: sf_comm.Context, layout: Layout, heads: int
) -> tuple[sf_comm.Group, list[int], list[int]]:
    group = ctx.subgroup(layout.ulysses, "ulysses")
    return group, chunk_sizes(heads, group.size), chunk_offsets(heads, group.size)


@torch.library.custom_op("streamfusion::ulysses_send", mutates_args=())
def ulysses_send(
    xs: list[torch.Tensor],
    length: int,
    prefix: int,
    strategy: str,
    degree: int,
    ctx_key: int,
    slot: int,
    name: str,
) -> torch.Tensor:
    """Start one Ulysses all-to-all of the split tokens of ``xs`` (each [B, prefix + seq_local,
    H, D], stacked); returns a token the matching ``attention_overlapped`` takes (the exchange
    stays pending until then)."""
    ctx = context_for(ctx_key)
    batch, _, heads, dim = xs[0].shape
    layout = _layout(ctx.topology, strategy, heads, degree)
    group, head_sizes, head_off = _ulysses(ctx, layout, heads)
    seq_lens = chunk_sizes(length - prefix, ctx.world_size)
    img = torch.stack([x[:, prefix:] for x in xs])  # [len(xs), B, seq_local, H, D]
    ins = [img[:, :, :, head_off[j] : head_off[j + 1]] for j in range(group.size)]
    shapes = [(len(xs), batch, seq_lens[r], head_sizes[group.index], dim) for r in group.ranks]
    _PENDING[(slot, name)] = sf_comm.all_to_all(ctx, group, ins, shapes)
    return xs[0].new_zeros(())


@ulysses_send.register_fake
def _(
    xs: list[torch.Tensor],
    length: int,
    prefix: int,
    strategy: str,
    degree: int,
    ctx_key: int,
    slot: int,
    name: str,
) -> torch.Tensor:
    return xs[0].new_empty(())


@torch.library.custom_op("streamfusion::attention_overlapped", mutates_args=())
def attention_overlapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sent_qk: torch.Tensor,
    sent_v: torch.Tensor,
    length: int,
    prefix: int,
    scale: float | None,
    strategy: str,
    degree: int,
    ctx_key: int,
    slot: int,
    backend: str,
) -> torch.Tensor:
    """Finish what the sends started: the Ring part of the layout on the exchanged Q/K/V,
    then the output back to [B, prefix + seq_local, H, D] (see the module docstring)."""
    ctx = context_for(ctx_key)
    batch, _, heads, dim = q.shape
    layout = _layout(ctx.topology, strategy, heads, degree)
    group, head_sizes, head_off = _ulysses(ctx, layout, heads)
    seq_lens = chunk_sizes(length - prefix, ctx.world_size)
    q_u, k_u = torch.cat(_PENDING.pop((slot, "qk")).wait(), dim=2)  # [B, seq_u, h_i, D] each
    v_u = torch.cat(_PENDING.pop((slot, "v")).wait(), dim=2)[0]
    # The exchanged tensors hold this Ulysses group's tokens for head group `group.index`:
    # what remains is a ring over the ranks with the same heads, with Ulysses degree 1.
    ring_only = Layout(tuple((r,) for r in range(ctx.world_size)), layout.ring)
    seq_u = [
        sum(seq_lens[r] for r in next(g for g in layout.ulysses if rank in g))
        for rank in range(ctx.world_size)
    ]
    joint = None
    mine = slice(head_off[group.index], head_off[group.index + 1])
    if prefix:
        joint = (q[:, :prefix, mine], k[:, :prefix, mine], v[:, :prefix, mine])
    out_u, text_out = hybrid_attention(
        q_u,
        k_u,
        v_u,
        ctx=ctx,
        layout=ring_only,
        seq_lens=seq_u,
        scale=dim**-0.5 if scale is None else float(scale),
        joint=None if joint is None else tuple(t.contiguous() for t in joint),  # type: ignore[arg-type]
        backend=backend,
    )
    pieces = list(out_u.split([seq_lens[r] for r in group.ranks], dim=1))
    back = [(batch, seq_lens[ctx.rank], head_sizes[j], dim) for j in range(group.size)]
    out = torch.cat(sf_comm.all_to_all(ctx, group, pieces, back).wait(), dim=2)
    if text_out is None:
        return out
    t_shapes = [(batch, prefix, head_sizes[j], dim) for j in range(group.size)]
    text_out = torch.cat(sf_comm.all_gather(ctx, group, text_out, t_shapes).wait(), dim=2)
    return torch.cat([text_out, out], dim=1)


@attention_overlapped.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sent_qk: torch.Tensor,
    sent_v: torch.Tensor,
    length: int,
    prefix: int,
    scale: float | None,
    strategy: str,
    degree: int,
    ctx_key: int,
    slot: int,
    backend: str,
) -> torch.Tensor:
    return q.new_empty(q.shape)


SEND = torch.ops.streamfusion.ulysses_send.default
FINISH = torch.ops.streamfusion.attention_overlapped.default


def emit_overlapped(
    graph: fx.Graph,
    q: fx.Node,
    k: fx.Node,
    v: fx.Node,
    lay: Shard,
    scale: float | None,
    plan: tuple[str, int],
    ctx_key: int,
    backend: str,
) -> fx.Node:
    """Emit V's send right after V's producer, Q/K's after the later of theirs, and the
    finishing op here; returns the output in [B, prefix + seq_local, H, D]."""
    strategy, degree = plan
    slot = next(_SLOTS)
    order = {n: i for i, n in enumerate(graph.nodes)}
    bshd = {}
    for name, node in (("v", v), ("k", k), ("q", q)):
        with graph.inserting_after(node):
            bshd[name] = graph.call_method("transpose", (node, 1, 2))
    consts = (lay.length, lay.prefix, strategy, degree, ctx_key, slot)
    with graph.inserting_after(bshd["v"]):
        sent_v = graph.call_function(SEND, ([bshd["v"]], *consts, "v"))
    last = bshd["q"] if order[q] >= order[k] else bshd["k"]
    with graph.inserting_after(last):
        sent_qk = graph.call_function(SEND, ([bshd["q"], bshd["k"]], *consts, "qk"))
    return graph.call_function(
        FINISH,
        (
            bshd["q"],
            bshd["k"],
            bshd["v"],
            sent_qk,
            sent_v,
            lay.length,
            lay.prefix,
            scale,
            strategy,
            degree,
            ctx_key,
            slot,
            backend,
        ),
    )


def hoist_value_sends(graph: fx.Graph) -> int:
    """Move the nodes that only V needs (its projection) ahead of Q's and K's, as early as
    their inputs allow, so V's exchange starts first. Returns how many nodes moved."""
    moved = 0
    for finish in [n for n in graph.nodes if n.target is FINISH]:
        send_qk, send_v = finish.args[3:5]
        q_and_k = _ancestors(send_qk)
        order = {n: i for i, n in enumerate(graph.nodes)}
        only_v = sorted(
            (
                n
                for n in _ancestors(send_v) | {send_v}
                if n not in q_and_k and n.op != "placeholder"
            ),
            key=order.__getitem__,
        )
        for node in only_v:
            deps = node.all_input_nodes
            anchor = max(deps, key=order.__getitem__) if deps else None
            if anchor is None or order[anchor] + 1 >= order[node]:
                continue
            anchor.append(node)
            moved += 1
            order = {n: i for i, n in enumerate(graph.nodes)}
    return moved


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def pending() -> dict[Any, Any]:
    """Exchanges started and not yet finished (empty between forward passes; for tests)."""
    return dict(_PENDING)
