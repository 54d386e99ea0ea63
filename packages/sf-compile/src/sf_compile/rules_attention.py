"""The attention rule: SDPA over split tokens becomes ``streamfusion::attention`` (or its
overlapped schedule); SDPA against whole keys/values stays local (see :mod:`sf_compile.rules`)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .overlap import emit_overlapped, overlap_plan
from .rule_types import Call, Decision, gather_all, value_of
from .token_layout import Shard

__all__ = ["ATTENTION_OPS", "attention"]


# name -> (positional parameter names, tuple output?)
ATTENTION_OPS: dict[str, tuple[tuple[str, ...], bool]] = {
    "scaled_dot_product_attention": (
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        False,
    ),
    "_scaled_dot_product_flash_attention_for_cpu": (
        ("query", "key", "value", "dropout_p", "is_causal"),
        True,
    ),
}


def _attention_args(call: Call) -> dict[str, Any]:
    names, _ = ATTENTION_OPS[call.name]
    bound = dict(zip(names, call.node.args))
    bound.update(call.node.kwargs)
    return bound


def attention(call: Call) -> Decision:
    """SDPA in [B, H, S, D]: self-attention over split tokens -> ``streamfusion::attention``;
    replicated keys/values (cross-attention) -> the same SDPA on this rank's query rows."""
    bound = _attention_args(call)
    iq, ik, iv = (call.input_at(i, name) for i, name in enumerate(("query", "key", "value")))
    if iq is None or ik is None or iv is None:
        return gather_all(call, "attention with non-tensor q/k/v", unsupported=True)
    unsupported = [
        name
        for name, ok in (
            ("attn_mask", bound.get("attn_mask") is None),
            ("dropout_p", not bound.get("dropout_p")),
            ("is_causal", not bound.get("is_causal")),
            ("enable_gqa", not bound.get("enable_gqa")),
        )
        if not ok
    ]
    if unsupported:
        return gather_all(call, f"attention with {', '.join(unsupported)}", unsupported=True)
    lq, lk, lv = call.layouts[iq], call.layouts[ik], call.layouts[iv]
    q_shape, k_shape = call.shape(iq), call.shape(ik)
    seq_dim = len(q_shape) - 2
    tuple_out = ATTENTION_OPS[call.name][1]

    def on_seq(lay: Any) -> Shard | None:
        return lay if isinstance(lay, Shard) and lay.dim == seq_dim else None

    sq, sk, sv = on_seq(lq), on_seq(lk), on_seq(lv)
    need: list[Any] = [None] * len(call.inputs)
    only_out0 = all(u.target is operator.getitem and u.args[1] == 0 for u in call.node.users)
    parallel = (
        sk is not None
        and sk == sv
        and len(q_shape) == 4
        and q_shape[seq_dim] == k_shape[seq_dim]
        and (sq is None or sq == sk)
        and (not tuple_out or only_out0)
    )
    if parallel:
        assert sk is not None
        need[iq] = need[ik] = need[iv] = sk
        return _parallel_attention(call, sk, bound, need, tuple_out, iq)
    # Local: this rank's query rows against whole keys/values (no communication).
    q_lay = sq if sq is not None else Shard(seq_dim, q_shape[seq_dim])
    need[iq] = q_lay
    reason = None
    if isinstance(lk, Shard) or isinstance(lv, Shard):
        reason = "attention whose key/value split differs from the query's"
    out: Any = q_lay
    if tuple_out:
        out = tuple([q_lay, q_lay.moved(seq_dim)] + [None] * (len(value_of(call.node)) - 2))
    return Decision(need, out, gather_reason=reason, attention="local (keys/values whole)")


def _parallel_attention(
    call: Call, lay: Shard, bound: dict[str, Any], need: list[Any], tuple_out: bool, q_index: int
) -> Decision:
    cfg = call.cfg
    scale = bound.get("scale")
    names = ATTENTION_OPS[call.name][0]
    batch_heads_seq_dim = call.shape(q_index)
    q_val = value_of(call.inputs[q_index])
    plan = None
    if cfg.overlap:
        plan = overlap_plan(
            cfg.ctx_key,
            cfg.strategy,
            batch=batch_heads_seq_dim[0],
            heads=batch_heads_seq_dim[1],
            head_dim=batch_heads_seq_dim[3],
            dtype=q_val.dtype,
            tokens=lay.length - lay.prefix,
            text_len=lay.prefix,
        )

    def emit(graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        new = dict(zip(names, args))
        new.update(kwargs)
        if plan is not None:
            out = emit_overlapped(
                graph,
                new["query"],
                new["key"],
                new["value"],
                lay,
                scale,
                plan,
                cfg.ctx_key,
                cfg.attention_backend,
            )
        else:
            q, k, v = (
                graph.call_method("transpose", (new[name], 1, 2))
                for name in ("query", "key", "value")
            )
            out = graph.call_function(
                torch.ops.streamfusion.attention.default,
                (
                    q,
                    k,
                    v,
                    lay.length,
                    lay.prefix,
                    scale,
                    cfg.strategy,
                    cfg.ctx_key,
                    cfg.attention_backend,
                ),
            )
        out = graph.call_method("transpose", (out, 1, 2))
        return (out,) if tuple_out else out

    out: Any = (lay,) if tuple_out else lay
    text = f", joint text {lay.prefix}" if lay.prefix else ""
    what = "streamfusion::attention"
    if plan is not None:
        what = (
            f"streamfusion::attention_overlapped ({plan.name}, Ulysses degree "
            f"{plan.ulysses_degree}, V sent first)"
        )
    return Decision(need, out, emit=emit, attention=f"{what} ({lay.length} tokens{text})")
