"""Rules for ops that compute: elementwise/broadcasting, reductions, norms, ``linear``,
``matmul``, and ops that only borrow a tensor's dtype or device (see :mod:`sf_compile.rules`)."""

from __future__ import annotations

from typing import Any

import torch

from .rule_types import (
    Call,
    Decision,
    Rule,
    first_split,
    gather_all,
    norm_dim,
    replicated,
    value_of,
    whole_outputs,
)
from .token_layout import Shard

__all__ = [
    "along_dim",
    "creation",
    "elementwise",
    "group_norm",
    "like_first",
    "linear",
    "matmul",
    "norm",
    "reduction",
    "size",
]


def elementwise(call: Call) -> Decision:
    """Broadcasting ops: the output carries tokens where any operand does; operands whose
    aligned dim has the full token length are sliced, size-1 dims broadcast."""
    out_val = value_of(call.node)
    if not isinstance(out_val, torch.Tensor):
        return gather_all(call, f"{call.name} returns no tensor", unsupported=True)
    out_shape = call.out_shape
    rank_out = len(out_shape)
    target: Shard | None = None
    for i, lay in enumerate(call.layouts):
        if isinstance(lay, Shard):
            dim = lay.dim + rank_out - len(call.shape(i))
            if 0 <= dim < rank_out and out_shape[dim] == lay.length:
                target = lay.moved(dim)
                break
    if target is None:
        return gather_all(call, f"{call.name}: token dims do not line up", unsupported=True)
    need: list[Any] = []
    for i, lay in enumerate(call.layouts):
        if isinstance(lay, tuple):
            return gather_all(call, f"{call.name} of a multi-output value", unsupported=True)
        shape = call.shape(i)
        dim = target.dim - (rank_out - len(shape))
        if dim < 0 or shape[dim] == 1:
            need.append(None)  # broadcasts along the tokens: per-sample vectors, scalars
        elif shape[dim] == target.length:
            need.append(target.moved(dim))  # e.g. a positional embedding: slice it
        else:
            need.append(None)  # not aligned with the tokens (dtype/device-only argument)
    return Decision(need, target)


# -- reductions and dim-wise ops ---------------------------------------------------------


def _dims_arg(call: Call, ndim: int) -> list[int] | None:
    dims = call.arg(1, "dim")
    if dims is None:
        dims = call.arg(1, "axis")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, ndim) for d in dims]


def reduction(call: Call) -> Decision:
    """``sum``/``mean``/... keep the tokens unless they reduce over them (then gather)."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    ndim = len(call.shape(0))
    dims = _dims_arg(call, ndim)
    if dims is None or lay.dim in dims:
        return gather_all(call, f"{call.name} over the token dim needs all tokens")
    keepdim = bool(call.arg(2, "keepdim", False))
    out_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
    need = [lay] + [None] * (len(call.inputs) - 1)
    return Decision(need, lay.moved(out_dim))


def along_dim(dim_pos: int, default: int | None = None) -> Rule:
    """Ops that mix values along one dim (softmax, cumsum, normalize): fine off the token dim."""

    def rule(call: Call) -> Decision:
        lay = first_split(call)
        if lay is None:
            return replicated(call)
        ndim = len(call.shape(0))
        dim = call.arg(dim_pos, "dim", default)
        if dim is None or norm_dim(dim, ndim) == lay.dim:
            return gather_all(call, f"{call.name} along the token dim needs all tokens")
        return Decision([lay] + [None] * (len(call.inputs) - 1), lay)

    return rule


def norm(call: Call) -> Decision:
    """``layer_norm``/``rms_norm`` normalise the trailing ``normalized_shape`` dims."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    ndim = len(call.shape(0))
    normalized = call.arg(1, "normalized_shape")
    trailing = 1 if isinstance(normalized, int) else len(normalized)
    if lay.dim >= ndim - trailing:
        return gather_all(call, f"{call.name} normalises over the token dim")
    return Decision([lay] + [None] * (len(call.inputs) - 1), lay)


def group_norm(call: Call) -> Decision:
    """``group_norm`` over [B, C, *]: normalises channels and every dim after them."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    if lay.dim >= 1:
        return gather_all(call, "group_norm normalises over the token dim")
    return Decision([lay] + [None] * (len(call.inputs) - 1), lay)


def linear(call: Call) -> Decision:
    """``linear(x, w, b)``: rows of ``x`` are independent; weights stay whole."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    if call.inputs[0] is not (
        call.node.args[0] if call.node.args else call.node.kwargs.get("input")
    ):
        return gather_all(call, "linear with a split weight", unsupported=True)
    if lay.dim == len(call.shape(0)) - 1:
        return gather_all(call, "linear contracts the token dim")
    return Decision([lay] + [None] * (len(call.inputs) - 1), lay)


def matmul(call: Call) -> Decision:
    """``a @ b`` with split ``a`` rows and whole ``b``; anything else needs all tokens."""
    if len(call.inputs) != 2 or isinstance(call.layouts[1], Shard):
        return gather_all(call, f"{call.name} over split tokens of its right operand")
    lay = call.layouts[0]
    if not isinstance(lay, Shard):
        return replicated(call)
    nd_a = len(call.shape(0))
    if nd_a < 2 or lay.dim >= nd_a - 1:
        return gather_all(call, f"{call.name} contracts the token dim")
    return Decision([lay, None], lay.moved(lay.dim + len(call.out_shape) - nd_a))


def like_first(call: Call) -> Decision:
    """``x.type_as(other)``, ``x.to(other)``: elementwise in ``x``; ``other`` only lends its
    dtype/device, so it is used in whatever layout it has."""
    lay = call.layouts[0] if call.layouts else None
    return Decision([lay, *call.layouts[1:]], lay if isinstance(lay, Shard) else None)


def creation(call: Call) -> Decision:
    """``x.new_zeros(sizes)`` and friends: ``x`` only lends dtype/device; sizes are full."""
    return Decision(list(call.layouts), whole_outputs(value_of(call.node)))


def size(call: Call) -> Decision:
    """``x.size()``/``x.shape``: sizes of the full tensor (constants in a static graph)."""
    return Decision(list(call.layouts), None)
