"""Rules for ops that move, cut or join tensors: views and reshapes, dim shuffles, indexing
(including in-place writes), split/chunk/unbind, cat/stack (see :mod:`sf_compile.rules`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .rule_types import (
    Call,
    Decision,
    Rewrite,
    first_split,
    gather_all,
    is_static,
    norm_dim,
    replicated,
    value_of,
)
from .token_layout import Shard, TokenLayout

__all__ = [
    "cat",
    "expand",
    "getitem",
    "index_layout",
    "map_view",
    "setitem",
    "shuffle",
    "splitting",
    "stack",
    "view",
]


# -- views -------------------------------------------------------------------------------


def map_view(in_shape: Sequence[int], out_shape: Sequence[int], dim: int) -> int | None:
    """The output dim of a row-major reshape that holds input dim ``dim`` whole, or None when
    the reshape merges or splits it (same prefix product and size is necessary and enough)."""
    before, size = math.prod(in_shape[:dim]), in_shape[dim]
    acc = 1
    for j, s in enumerate(out_shape):
        if acc == before and s == size:
            return j
        acc *= s
        if acc > before:
            break
    return None


_SIZE_ARGS = {"view", "reshape", "_unsafe_view", "_reshape_alias"}


def _rewrite_sizes(local: list[int]) -> Rewrite:
    def rewrite(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for key in ("shape", "size"):
            if key in kwargs:
                return args, {**kwargs, key: type(kwargs[key])(local)}
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            return (args[0], type(args[1])(local)), kwargs
        return (args[0], *local), kwargs

    return rewrite


def view(call: Call) -> Decision:
    """Reshapes that keep the token dim whole; ``view(B, S, C)`` gets ``S_local``."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    if (
        len(call.inputs) != 1
        or not is_static(call.node.args[1:])
        or not is_static(call.node.kwargs)
    ):
        return gather_all(call, f"{call.name} with computed sizes", unsupported=True)
    out_dim = map_view(call.shape(0), call.out_shape, lay.dim)
    if out_dim is None:
        return gather_all(call, f"{call.name} merges or splits the token dim")
    out = lay.moved(out_dim)
    rewrite = None
    if call.name in _SIZE_ARGS:
        local = list(call.out_shape)
        local[out_dim] = call.cfg.split.local_len(out)
        rewrite = _rewrite_sizes(local)
    return Decision([lay], out, rewrite=rewrite)


def expand(call: Call) -> Decision:
    """``expand(*sizes)``: the token dim keeps its size (-1), others broadcast."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    if not is_static(call.node.args[1:]):
        return gather_all(call, "expand with computed sizes", unsupported=True)
    out_dim = lay.dim + len(call.out_shape) - len(call.shape(0))
    local = list(call.out_shape)
    local[out_dim] = -1
    return Decision([lay], lay.moved(out_dim), rewrite=_rewrite_sizes(local))


_MARK = 7919  # a prime no real dim is likely to equal; checked below


def _apply_on_meta(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    args = (x, *node.args[1:])
    if node.op == "call_method":
        return getattr(x, str(node.target))(*node.args[1:], **node.kwargs)
    target: Any = node.target
    return target(*args, **node.kwargs)


def shuffle(call: Call) -> Decision:
    """Dim-moving ops (permute, transpose, movedim, unsqueeze, squeeze): find where the token
    dim lands by running the op on a meta tensor whose token dim has a marker size."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    if len(call.inputs) != 1 or not is_static(call.node.args[1:]):
        return gather_all(call, f"{call.name} with tensor arguments", unsupported=True)
    shape = list(call.shape(0))
    mark = max([_MARK, *shape]) + 1
    shape[lay.dim] = mark
    out = _apply_on_meta(call.node, torch.empty(shape, device="meta"))
    where = [i for i, s in enumerate(out.shape) if s == mark]
    if len(where) != 1:
        return gather_all(call, f"{call.name} does not keep the token dim", unsupported=True)
    return Decision([lay], lay.moved(where[0]))


# -- indexing, splitting, joining ---------------------------------------------------------


def index_layout(lay: Shard, index: Any, ndim: int) -> tuple[TokenLayout, Any] | str:
    """TokenLayout of ``x[index]`` for split ``x`` and the index to use on this rank's part, or why
    the index needs all tokens. Indexing must keep the token dim whole, or cut it at the
    joint-text boundary (``x[:, :text]`` is replicated, ``x[:, text:]`` split)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1:
        return "indexing with two Ellipsis"
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for it in items if it is not None and it is not Ellipsis)
        items[at : at + 1] = [slice(None)] * (ndim - used)
    in_dim = out_dim = 0
    new_items: list[Any] = []
    out: TokenLayout = lay
    for it in items:
        if it is None:
            out_dim += 1
            new_items.append(it)
            continue
        if isinstance(it, bool) or not isinstance(it, (int, slice)):
            return "indexing with tensors or bools"
        if in_dim == lay.dim:
            if isinstance(it, int):
                return "indexing a single token"
            start, stop, step = it.indices(lay.length)
            if step != 1:
                return "strided indexing of the tokens"
            if (start, stop) == (0, lay.length):
                out = lay.moved(out_dim)
                it = slice(None)
            elif start == 0 and stop <= lay.prefix:
                out = None  # joint text part only: replicated
            elif start == lay.prefix and stop == lay.length and lay.prefix:
                out = Shard(out_dim, lay.length - lay.prefix)
                it = slice(lay.prefix, None)
            else:
                return "indexing part of the token sequence"
        in_dim += 1
        if isinstance(it, slice):
            out_dim += 1
        new_items.append(it)
    if lay.dim >= in_dim:  # token dim after the indexed dims
        out = lay.moved(lay.dim - in_dim + out_dim)
    return out, (tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _with_index(new_index: Any) -> Rewrite:
    def rewrite(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (args[0], new_index, *args[2:]), kwargs

    return rewrite


def getitem(call: Call) -> Decision:
    """Tuple element, or tensor indexing (see :func:`index_layout`)."""
    src, index = call.node.args[0], call.node.args[1]
    if call.layouts and isinstance(call.layouts[0], tuple):
        if not isinstance(index, int):
            return gather_all(call, "getitem with a non-int index of a tuple", unsupported=True)
        return Decision(list(call.layouts), call.layouts[0][index])
    lay = first_split(call)
    if lay is None or not isinstance(src, fx.Node):
        return replicated(call)
    if len(call.inputs) != 1:
        return gather_all(call, "indexing with tensors", unsupported=True)
    found = index_layout(lay, index, len(call.shape(0)))
    if isinstance(found, str):
        return gather_all(call, found, unsupported=found.startswith("indexing with"))
    out, new_index = found
    return Decision([lay], out, rewrite=_with_index(new_index))


def setitem(call: Call) -> Decision:
    """``x[index] = value`` (in place): ``x`` keeps its layout when the index keeps the tokens
    whole; ``value`` is sliced like an elementwise operand of the indexed region."""
    index = call.node.args[1]
    it, iv = call.input_at(0, "target"), call.input_at(2, "value")
    lay = call.layouts[it] if it is not None else None
    if it is None or not isinstance(lay, Shard):
        return replicated(call)
    found = index_layout(lay, index, len(call.shape(it)))
    if isinstance(found, str) or not isinstance(found[0], Shard):
        return gather_all(call, "in-place write into part of the token sequence")
    region, new_index = found
    assert isinstance(region, Shard)
    need: list[Any] = [None] * len(call.inputs)
    need[it] = lay
    if iv is not None:
        region_shape = torch.empty(call.shape(it), device="meta")[index].shape  # type: ignore[index]
        v_shape = call.shape(iv)
        dim = region.dim - (len(region_shape) - len(v_shape))
        if dim >= 0 and v_shape[dim] == region.length:
            need[iv] = region.moved(dim)
    return Decision(need, None, rewrite=_with_index(new_index))


def splitting(call: Call) -> Decision:
    """``split``/``split_with_sizes``/``chunk``/``unbind``: off the token dim every piece keeps
    the tokens; ``split_with_sizes([text, rest], token_dim)`` separates joint text."""
    lay = first_split(call)
    if lay is None:
        return replicated(call)
    pieces = value_of(call.node)
    ndim = len(call.shape(0))
    dim_pos = 1 if call.name == "unbind" else 2
    dim = norm_dim(call.arg(dim_pos, "dim", 0), ndim)
    if dim != lay.dim:
        out_dim = lay.dim - (1 if call.name == "unbind" and dim < lay.dim else 0)
        return Decision([lay], tuple(lay.moved(out_dim) for _ in pieces))
    sizes = (
        call.arg(1, "split_size") if call.name != "split_with_sizes" else call.arg(1, "split_sizes")
    )
    if (
        call.name in ("split", "split_with_sizes")
        and isinstance(sizes, (list, tuple))
        and lay.prefix
        and list(sizes) == [lay.prefix, lay.length - lay.prefix]
    ):
        local = [lay.prefix, call.cfg.split.local_len(lay) - lay.prefix]

        def rewrite(
            args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if len(args) > 1:
                return (args[0], type(sizes)(local), *args[2:]), kwargs
            key = "split_sizes" if "split_sizes" in kwargs else "split_size"
            return args, {**kwargs, key: type(sizes)(local)}

        return Decision([lay], (None, Shard(dim, lay.length - lay.prefix)), rewrite=rewrite)
    return gather_all(call, f"{call.name} along the token dim")


def cat(call: Call) -> Decision:
    """``cat``: off the token dim, pieces line up; along it, whole (text) pieces followed by
    one split piece give a layout with a replicated prefix (MMDiT joint streams)."""
    if not any(isinstance(lay, Shard) for lay in call.layouts):
        return replicated(call)
    ndim = len(call.out_shape)
    dim = norm_dim(call.arg(1, "dim", 0), ndim)
    first = next(lay for lay in call.layouts if isinstance(lay, Shard))
    if first.dim != dim:
        need = [
            first if call.shape(i)[first.dim] == first.length else None
            for i in range(len(call.inputs))
        ]
        if any(n is None for n in need):
            return gather_all(call, "cat of pieces with different token counts")
        return Decision(need, first)
    *head, last = call.layouts
    if all(lay is None for lay in head) and isinstance(last, Shard):
        prefix = sum(call.shape(i)[dim] for i in range(len(head)))
        out = Shard(dim, prefix + last.length, prefix + last.prefix)
        return Decision(list(call.layouts), out)
    return gather_all(call, "cat along the token dim after split pieces")


def stack(call: Call) -> Decision:
    """``stack``: every piece carries the same tokens; the token dim shifts past the new dim."""
    if not any(isinstance(lay, Shard) for lay in call.layouts):
        return replicated(call)
    first = next(lay for lay in call.layouts if isinstance(lay, Shard))
    ndim = len(call.out_shape)
    dim = norm_dim(call.arg(1, "dim", 0), ndim)
    need = [
        first if call.shape(i)[first.dim] == first.length else None for i in range(len(call.inputs))
    ]
    if any(n is None for n in need):
        return gather_all(call, "stack of pieces with different token counts")
    return Decision(need, first.moved(first.dim + (1 if dim <= first.dim else 0)))
