"""Where tokens enter a graph: the *seeds* of the sequence-splitting pass.

Note [Seeds]
~~~~~~~~~~~~
From every attention's query/key/value, walk the graph backwards through the ops
:mod:`sf_compile.rules` can carry tokens through (each rule run backwards: "which input layout
gives this output layout?"), to where the tokens enter: graph inputs (hidden states, learned
positional embeddings, RoPE tables) or the reshape that forms the token dim (a patch
embedding's ``flatten``). The pass cuts each seed to this rank's tokens right where it enters.

Where a value is split only changes how much work is duplicated, never the result: the forward
rewrite converts layouts wherever an op needs another one. Seeding at the inputs makes the
projections, norms and MLPs run on 1/world of the tokens. A seed keeps its whole version too,
so a consumer that needs the whole value (``mean`` over the input tokens) uses it instead of
gathering. Keys/values of cross-attention (a different length than the queries) are not
followed: they are per-sample context (text), needed whole by every rank.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .rules import (
    ATTENTION_OPS,
    Call,
    Config,
    attention_qkv,
    mutated_input,
    op_name,
    rule_of,
    tensor_inputs,
    value_of,
)
from .token_layout import Shard, TokenLayout

__all__ = ["find_seeds"]

_ATTENTION = set(ATTENTION_OPS)
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}


def find_seeds(gm: fx.GraphModule, cfg: Config) -> dict[fx.Node, Shard]:
    """Where tokens enter the graph (Note [Seeds]): node -> the layout to cut it to."""
    seeds: dict[fx.Node, Shard] = {}
    stack: list[tuple[fx.Node, int | None, int, int]] = []  # (node, output index, dim, length)
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node) not in _ATTENTION:
            continue
        qkv = attention_qkv(node)
        if qkv is None:
            continue
        q, k, v = qkv
        q_shape = value_of(q).shape
        seq_dim = len(q_shape) - 2
        stack.append((q, None, seq_dim, int(q_shape[seq_dim])))
        if int(value_of(k).shape[seq_dim]) == int(q_shape[seq_dim]):  # self-attention
            for kv in (k, v):
                stack.append((kv, None, seq_dim, int(value_of(kv).shape[seq_dim])))
    seen: set[tuple[fx.Node, int | None, int, int]] = set()
    while stack:
        item = stack.pop()
        if item in seen:
            continue
        seen.add(item)
        node, index, dim, length = item
        if node.op in ("placeholder", "get_attr"):
            if index is None and isinstance(value_of(node), torch.Tensor):
                seeds.setdefault(node, Shard(dim, length))
            continue
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and isinstance(value_of(node.args[0]), (tuple, list))
            and isinstance(node.args[1], int)
        ):
            stack.append((node.args[0], node.args[1], dim, length))
            continue
        if index is None:
            _seed_writers(node, dim, length, gm, cfg, stack)
        name, rule = rule_of(node, gm)
        if rule is None or name in _ATTENTION:
            continue
        pushed = _seed_inputs(node, name, rule, index, dim, length, cfg, stack)
        if not pushed and name in _VIEWS and index is None:
            seeds.setdefault(node, Shard(dim, length))  # the reshape that forms the tokens
    return seeds


def _seed_writers(
    node: fx.Node,
    dim: int,
    length: int,
    gm: fx.GraphModule,
    cfg: Config,
    stack: list[tuple[fx.Node, int | None, int, int]],
) -> None:
    """In-place writes into ``node`` (``out[..., ::2] = y``) also feed its tokens: follow
    the written values back too (Note [In-place ops] in :mod:`sf_compile.token_pass`)."""
    for user in node.users:
        if mutated_input(user) is not node:
            continue
        name, rule = rule_of(user, gm)
        if rule is None:
            continue
        inputs = tensor_inputs(user)
        layouts: list[TokenLayout] = [None] * len(inputs)
        layouts[inputs.index(node)] = Shard(dim, length)
        try:
            plan = rule(Call(user, name, inputs, layouts, cfg))
        except Exception:
            continue
        for inp, need in zip(inputs, plan.need):
            if isinstance(need, Shard) and inp is not node:
                stack.append((inp, None, need.dim, need.length))


def _seed_inputs(
    node: fx.Node,
    name: str,
    rule: Any,
    index: int | None,
    dim: int,
    length: int,
    cfg: Config,
    stack: list[tuple[fx.Node, int | None, int, int]],
) -> bool:
    """Find an input layout the rule maps to (dim, length) on the output; push its inputs."""
    inputs = tensor_inputs(node)
    for i, inp in enumerate(inputs):
        val = value_of(inp)
        if not isinstance(val, torch.Tensor):
            continue
        for j, size in enumerate(val.shape):
            if int(size) <= 1:
                continue
            layouts: list[TokenLayout] = [None] * len(inputs)
            layouts[i] = Shard(j, int(size))
            try:
                plan = rule(Call(node, name, inputs, layouts, cfg))
            except Exception:  # a rule that cannot even judge this candidate: not it
                continue
            out = plan.out
            if index is not None:
                out = out[index] if isinstance(out, tuple) and index < len(out) else None
            if (
                isinstance(out, Shard)
                and (out.dim, out.length) == (dim, length)
                and plan.need[i] == layouts[i]
            ):
                for inp2, need in zip(inputs, plan.need):
                    if isinstance(need, Shard):
                        stack.append((inp2, None, need.dim, need.length))
                return True
    return False
