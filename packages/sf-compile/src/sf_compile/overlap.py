"""The overlap schedule: start each of V, K, Q's Ulysses exchange as soon as it is computed.

Plain code (``streamfusion::attention``, what the non-overlapped graph runs)::

    q, k, v = proj_q(x), proj_k(x), proj_v(x)     # + norms / RoPE on q and k
    out = parallel_attention(q, k, v)             # all-to-all(q, k, v) -> ring -> all-to-all back

Overlapped (same numbers, bit for bit: the same exchanges and the same ring), with the
strategy's two phases (``begin``/``finish`` of :class:`sf_attn.strategies.UlyssesRing`)::

    v = proj_v(x)                                  ; sent_v = strategy.begin([v])   # V first:
    q, k = rope(norm(proj_q(x))), rope(norm(proj_k(x))); sent_qk = strategy.begin([q, k])  # no norm/RoPE
    out = strategy.finish(sent_qk, sent_v)         # wait -> ring -> exchange back

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
``overlap="auto"`` turns it on for CUDA contexts only (measured in :mod:`sf_compile.compile_bench`).

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

import itertools
from typing import Any

import torch
from torch import fx

import sf_attn
import sf_comm
from sf_attn.layout import Layout
from sf_attn.sharding import chunk_sizes
from sf_attn.strategies import UlyssesRing

from .ops import context_for
from .token_layout import Shard

__all__ = ["hoist_value_sends", "overlap_plan"]

_PENDING: dict[tuple[int, str], sf_comm.Handle[torch.Tensor]] = {}
_SLOTS = itertools.count()


def overlap_plan(
    ctx_key: int,
    strategy: str,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    tokens: int,
    text_len: int,
) -> sf_attn.Resolution | None:
    """The resolution to overlap with, or None when there is nothing to overlap (Ulysses
    degree 1, a strategy without the two phases such as torus, or a world of one). It is
    :func:`sf_attn.resolve`'s answer for the arguments ``parallel_attention`` passes, so the
    plan compiled is the plan the plain op would run."""
    how = sf_attn.resolve(
        context_for(ctx_key),
        seq_len=tokens,
        heads=heads,
        head_dim=head_dim,
        dtype=dtype,
        batch=batch,
        text_len=text_len,
        strategy=strategy,
    )
    if not isinstance(how.strategy, UlyssesRing) or how.layout.p_u == 1:
        return None
    return how


def _phases(
    ctx: sf_comm.CommContext, strategy: str, degree: int, x: torch.Tensor, length: int, prefix: int
) -> tuple[UlyssesRing, Layout, list[int]]:
    """The two-phase strategy, its layout and every rank's image tokens for ``x``'s layer."""
    batch, _, heads, dim = x.shape
    how = sf_attn.resolve(
        ctx,
        seq_len=length - prefix,
        heads=heads,
        head_dim=dim,
        dtype=x.dtype,
        batch=batch,
        text_len=prefix,
        strategy=strategy,
        ulysses_degree=degree,
    )
    assert isinstance(how.strategy, UlyssesRing)
    return how.strategy, how.layout, chunk_sizes(length - prefix, ctx.world_size)


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
    H, D], stacked): the strategy's ``begin``. Returns a token the matching
    ``attention_overlapped`` takes (the exchange stays pending until then)."""
    ctx = context_for(ctx_key)
    chosen, layout, seq_lens = _phases(ctx, strategy, degree, xs[0], length, prefix)
    img = torch.stack([x[:, prefix:] for x in xs])  # [len(xs), B, seq_local, H, D]
    _PENDING[(slot, name)] = chosen.begin(ctx, layout, img, seq_lens)
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
    """Finish what the sends started (the strategy's ``finish``: the Ring on the exchanged
    Q/K/V, then the output back to [B, prefix + seq_local, H, D]; see the module docstring)."""
    ctx = context_for(ctx_key)
    chosen, layout, seq_lens = _phases(ctx, strategy, degree, q, length, prefix)
    q_u, k_u = _PENDING.pop((slot, "qk")).wait()  # [B, seq_u, heads_u, D] each
    v_u = _PENDING.pop((slot, "v")).wait()[0]
    joint = None
    if prefix:
        joint = tuple(t[:, :prefix].contiguous() for t in (q, k, v))
    out, text_out = chosen.finish(
        q_u,
        torch.stack([k_u, v_u]) if layout.p_r > 1 else (k_u, v_u),  # only rotating KV stacks
        ctx=ctx,
        layout=layout,
        seq_lens=seq_lens,
        heads=q.shape[2],
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        joint=joint,
        backend=backend,
    )
    return out if text_out is None else torch.cat([text_out, out], dim=1)


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
    plan: sf_attn.Resolution,
    ctx_key: int,
    backend: str,
) -> fx.Node:
    """Emit V's send right after V's producer, Q/K's after the later of theirs, and the
    finishing op here; returns the output in [B, prefix + seq_local, H, D]."""
    strategy, degree = plan.name, plan.ulysses_degree
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
