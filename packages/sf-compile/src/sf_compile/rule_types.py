"""What a propagation rule sees (:class:`Call`) and decides (:class:`Decision`), plus the helpers
every rule uses. The rules themselves: :mod:`sf_compile.rules`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .token_layout import Shard, Split

__all__ = [
    "Call",
    "Config",
    "Decision",
    "Rewrite",
    "Rule",
    "UnsupportedOpError",
    "first_split",
    "gather_all",
    "is_static",
    "norm_dim",
    "replicated",
    "shape_of",
    "value_of",
    "whole_outputs",
]


class UnsupportedOpError(ValueError):
    """An op receives token-split inputs that no rule can keep split (``on_unsupported="error"``)."""


Rewrite = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclasses.dataclass(slots=True)
class Config:
    """What the rules need beyond the node: the split and how to emit attention."""

    split: Split
    strategy: str = "auto"
    ctx_key: int = 0
    attention_backend: str = "auto"
    overlap: bool = False


@dataclasses.dataclass(slots=True)
class Call:
    """One node seen by a rule: its tensor inputs (leaves of args/kwargs) and their layouts.

    ``layouts[i]`` is a TokenLayout, or a tuple of Layouts for a multi-output input (only
    ``getitem`` consumes those).
    """

    node: fx.Node
    name: str
    inputs: list[fx.Node]
    layouts: list[Any]
    cfg: Config

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        if len(self.node.args) > pos:
            return self.node.args[pos]
        return self.node.kwargs.get(name, default)

    def shape(self, i: int) -> tuple[int, ...]:
        return shape_of(self.inputs[i])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return shape_of(self.node)

    def input_at(self, pos: int, name: str) -> int | None:
        """Index in :attr:`inputs` of the argument at position ``pos`` or keyword ``name``, or
        None when that argument is not a tensor node. (The same node may be several inputs,
        as in ``sdpa(q, q, q)``, so look it up by position, not by identity.)"""
        count = 0
        for key, arg in [*enumerate(self.node.args), *self.node.kwargs.items()]:
            found: list[fx.Node] = []
            fx.node.map_arg(arg, found.append)
            leaves = [n for n in found if n in self.inputs]
            if key == pos if isinstance(key, int) else key == name:
                return count if isinstance(arg, fx.Node) and leaves else None
            count += len(leaves)
        return None


@dataclasses.dataclass(slots=True)
class Decision:
    """What a rule decided.

    Attributes:
        need: the layout each tensor input must have (converted by the pass if it differs).
        out: the output's layout (a tuple of layouts for multi-output ops).
        rewrite: maps the node's new (args, kwargs) to ones with local sizes.
        emit: replaces the node by other nodes: ``emit(graph, args, kwargs) -> value``.
        gather_reason: why split inputs are gathered (Note [Gather fallback]).
        unsupported: True when no rule knows the op (a fallback, not a documented gather).
        attention: a description, for attention nodes (report).
    """

    need: list[Any]
    out: Any
    rewrite: Rewrite | None = None
    emit: Callable[[fx.Graph, tuple[Any, ...], dict[str, Any]], Any] | None = None
    gather_reason: str | None = None
    unsupported: bool = False
    attention: str | None = None


Rule = Callable[[Call], Decision]


def value_of(node: Any) -> Any:
    """The fake/example value a node produced (``val`` from FakeTensorProp or Dynamo's)."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def shape_of(node: fx.Node) -> tuple[int, ...]:
    val = value_of(node)
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"node {node.name} has no tensor value (got {type(val).__name__})")
    return tuple(int(s) for s in val.shape)


def whole_outputs(out_val: Any) -> Any:
    if isinstance(out_val, (tuple, list)):
        return tuple(None for _ in out_val)
    return None


def replicated(call: Call) -> Decision:
    """Every input whole, output whole (the trivial plan)."""
    need = [lay if isinstance(lay, tuple) else None for lay in call.layouts]
    return Decision(need, whole_outputs(value_of(call.node)))


def gather_all(call: Call, reason: str, *, unsupported: bool = False) -> Decision:
    """Note [Gather fallback]: run the op on whole inputs."""
    plan = replicated(call)
    if any(isinstance(lay, Shard) for lay in call.layouts):
        plan.gather_reason = reason
        plan.unsupported = unsupported
    return plan


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def is_static(values: Any) -> bool:
    """True when a (nested) argument holds no graph nodes (sizes known at compile time)."""
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return not found


def first_split(call: Call) -> Shard | None:
    """The first input's layout when it is split, else None (most rules carry only it)."""
    lay = call.layouts[0] if call.layouts else None
    if not isinstance(lay, Shard):
        return None
    return lay
