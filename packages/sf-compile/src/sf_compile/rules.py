"""Token-dimension propagation rules, one per kind of op.

A rule looks at one graph node and the layouts of its tensor inputs (:mod:`sf_compile.layout`)
and returns a :class:`Plan`: the layout each input must be converted to (the pass inserts the
slice or gather), the layout of the output, and how to rewrite arguments that hold sizes of the
token dimension (``view(B, S, C)`` becomes ``view(B, S_local, C)``). Rules never touch the
graph; the same rules also run *backwards* (:mod:`sf_compile.sharding` asks "which input
layout gives this output layout?"), so each op's knowledge lives in one place.

Supported (token dim carried through, see Note [Gather fallback] for the rest):

- elementwise and broadcasting ops (arithmetic, activations, casts, dropout, ``where``):
  an operand whose aligned dim has the full token length is sliced (learned positional
  embeddings, RoPE tables); a size-1 or missing dim broadcasts (timestep, modulation vectors);
- ``linear``, ``matmul`` with a replicated right operand, ``layer_norm``/``rms_norm`` over
  trailing non-token dims, ``softmax``/``log_softmax``/``cumsum``/``normalize`` off the token dim;
- ``view``/``reshape``/``flatten``/``unflatten``/``expand`` that keep the token dim whole,
  ``permute``/``transpose``/``movedim``/``unsqueeze``/``squeeze``, tensor indexing, ``split``/
  ``chunk``/``unbind`` off the token dim, ``cat``/``stack``;
- joint text: ``cat([text, tokens], token_dim)`` gives a layout whose text prefix is replicated;
  slicing or ``split_with_sizes`` at the prefix boundary separates them again;
- reductions (``sum``/``mean``/...) off the token dim;
- attention: ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention`` /
  ``aten._scaled_dot_product_flash_attention_for_cpu`` ([B, H, S, D]) become
  ``streamfusion::attention`` (self-attention over split tokens, joint text as ``joint=``), or
  stay local when keys/values are replicated (cross-attention to text).

Note [Gather fallback]
~~~~~~~~~~~~~~~~~~~~~~
An op that needs the whole sequence (a reduction over tokens, a reshape that merges the token
dim with another, indexing into the token dim, a conv over it) or that no rule knows gets its
split inputs gathered first and runs exactly as in eager on every rank; its output is
replicated. Results stay correct; only the work after it is no longer split. The first kind is
reported as a gather "needed by" the op; the second as a fallback, which
``on_unsupported="error"`` turns into :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .layout import Layout, Shard, Split

__all__ = ["Call", "Plan", "UnsupportedOpError", "mutated_input", "op_name", "rule_for"]


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

    ``layouts[i]`` is a Layout, or a tuple of Layouts for a multi-output input (only
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
        return _shape(self.inputs[i])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return _shape(self.node)

    def index_of(self, node: Any) -> int | None:
        return next((i for i, n in enumerate(self.inputs) if n is node), None)


@dataclasses.dataclass(slots=True)
class Plan:
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


Rule = Callable[[Call], Plan]


# -- helpers -----------------------------------------------------------------------------


def value_of(node: Any) -> Any:
    """The fake/example value a node produced (``val`` from FakeTensorProp or Dynamo's)."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = value_of(node)
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"node {node.name} has no tensor value (got {type(val).__name__})")
    return tuple(int(s) for s in val.shape)


def _full_out(out_val: Any) -> Any:
    if isinstance(out_val, (tuple, list)):
        return tuple(None for _ in out_val)
    return None


def replicated(call: Call) -> Plan:
    """Every input whole, output whole (the trivial plan)."""
    need = [lay if isinstance(lay, tuple) else None for lay in call.layouts]
    return Plan(need, _full_out(value_of(call.node)))


def gather_all(call: Call, reason: str, *, unsupported: bool = False) -> Plan:
    """Note [Gather fallback]: run the op on whole inputs."""
    plan = replicated(call)
    if any(isinstance(lay, Shard) for lay in call.layouts):
        plan.gather_reason = reason
        plan.unsupported = unsupported
    return plan


def _norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _static(values: Any) -> bool:
    """True when a (nested) argument holds no graph nodes (sizes known at compile time)."""
    found = []
    fx.node.map_arg(values, found.append)
    return not found


def _only(call: Call) -> Shard | None:
    """The first input's layout when it is split and every other input is replicated."""
    lay = call.layouts[0] if call.layouts else None
    if not isinstance(lay, Shard):
        return None
    return lay


# -- elementwise -------------------------------------------------------------------------


def elementwise(call: Call) -> Plan:
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
    return Plan(need, target)


# -- reductions and dim-wise ops ---------------------------------------------------------


def _dims_arg(call: Call, ndim: int) -> list[int] | None:
    dims = call.arg(1, "dim")
    if dims is None:
        dims = call.arg(1, "axis")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [_norm_dim(d, ndim) for d in dims]


def reduction(call: Call) -> Plan:
    """``sum``/``mean``/... keep the tokens unless they reduce over them (then gather)."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    ndim = len(call.shape(0))
    dims = _dims_arg(call, ndim)
    if dims is None or lay.dim in dims:
        return gather_all(call, f"{call.name} over the token dim needs all tokens")
    keepdim = bool(call.arg(2, "keepdim", False))
    out_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
    need = [lay] + [None] * (len(call.inputs) - 1)
    return Plan(need, lay.moved(out_dim))


def along_dim(dim_pos: int, default: int | None = None) -> Rule:
    """Ops that mix values along one dim (softmax, cumsum, normalize): fine off the token dim."""

    def rule(call: Call) -> Plan:
        lay = _only(call)
        if lay is None:
            return replicated(call)
        ndim = len(call.shape(0))
        dim = call.arg(dim_pos, "dim", default)
        if dim is None or _norm_dim(dim, ndim) == lay.dim:
            return gather_all(call, f"{call.name} along the token dim needs all tokens")
        return Plan([lay] + [None] * (len(call.inputs) - 1), lay)

    return rule


def norm(call: Call) -> Plan:
    """``layer_norm``/``rms_norm`` normalise the trailing ``normalized_shape`` dims."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    ndim = len(call.shape(0))
    normalized = call.arg(1, "normalized_shape")
    trailing = 1 if isinstance(normalized, int) else len(normalized)
    if lay.dim >= ndim - trailing:
        return gather_all(call, f"{call.name} normalises over the token dim")
    return Plan([lay] + [None] * (len(call.inputs) - 1), lay)


def group_norm(call: Call) -> Plan:
    """``group_norm`` over [B, C, *]: normalises channels and every dim after them."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    if lay.dim >= 1:
        return gather_all(call, "group_norm normalises over the token dim")
    return Plan([lay] + [None] * (len(call.inputs) - 1), lay)


def linear(call: Call) -> Plan:
    """``linear(x, w, b)``: rows of ``x`` are independent; weights stay whole."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    if call.inputs[0] is not (call.node.args[0] if call.node.args else call.node.kwargs.get("input")):
        return gather_all(call, "linear with a split weight", unsupported=True)
    if lay.dim == len(call.shape(0)) - 1:
        return gather_all(call, "linear contracts the token dim")
    return Plan([lay] + [None] * (len(call.inputs) - 1), lay)


def matmul(call: Call) -> Plan:
    """``a @ b`` with split ``a`` rows and whole ``b``; anything else needs all tokens."""
    if len(call.inputs) != 2 or isinstance(call.layouts[1], Shard):
        return gather_all(call, f"{call.name} over split tokens of its right operand")
    lay = call.layouts[0]
    if not isinstance(lay, Shard):
        return replicated(call)
    nd_a = len(call.shape(0))
    if nd_a < 2 or lay.dim >= nd_a - 1:
        return gather_all(call, f"{call.name} contracts the token dim")
    return Plan([lay, None], lay.moved(lay.dim + len(call.out_shape) - nd_a))


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
    def rewrite(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for key in ("shape", "size"):
            if key in kwargs:
                return args, {**kwargs, key: type(kwargs[key])(local)}
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            return (args[0], type(args[1])(local)), kwargs
        return (args[0], *local), kwargs

    return rewrite


def view(call: Call) -> Plan:
    """Reshapes that keep the token dim whole; ``view(B, S, C)`` gets ``S_local``."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    if len(call.inputs) != 1 or not _static(call.node.args[1:]) or not _static(call.node.kwargs):
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
    return Plan([lay], out, rewrite=rewrite)


def expand(call: Call) -> Plan:
    """``expand(*sizes)``: the token dim keeps its size (-1), others broadcast."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    if not _static(call.node.args[1:]):
        return gather_all(call, "expand with computed sizes", unsupported=True)
    out_dim = lay.dim + len(call.out_shape) - len(call.shape(0))
    local = list(call.out_shape)
    local[out_dim] = -1
    return Plan([lay], lay.moved(out_dim), rewrite=_rewrite_sizes(local))


_MARK = 7919  # a prime no real dim is likely to equal; checked below


def _apply_on_meta(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    args = (x, *node.args[1:])
    if node.op == "call_method":
        return getattr(x, str(node.target))(*node.args[1:], **node.kwargs)
    target: Any = node.target
    return target(*args, **node.kwargs)


def shuffle(call: Call) -> Plan:
    """Dim-moving ops (permute, transpose, movedim, unsqueeze, squeeze): find where the token
    dim lands by running the op on a meta tensor whose token dim has a marker size."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    if len(call.inputs) != 1 or not _static(call.node.args[1:]):
        return gather_all(call, f"{call.name} with tensor arguments", unsupported=True)
    shape = list(call.shape(0))
    mark = max([_MARK, *shape]) + 1
    shape[lay.dim] = mark
    out = _apply_on_meta(call.node, torch.empty(shape, device="meta"))
    where = [i for i, s in enumerate(out.shape) if s == mark]
    if len(where) != 1:
        return gather_all(call, f"{call.name} does not keep the token dim", unsupported=True)
    return Plan([lay], lay.moved(where[0]))


# -- indexing, splitting, joining ---------------------------------------------------------


def index_layout(lay: Shard, index: Any, ndim: int) -> tuple[Layout, Any] | str:
    """Layout of ``x[index]`` for split ``x`` and the index to use on this rank's part, or why
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
    out: Layout = lay
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
    def rewrite(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (args[0], new_index, *args[2:]), kwargs

    return rewrite


def getitem(call: Call) -> Plan:
    """Tuple element, or tensor indexing (see :func:`index_layout`)."""
    src, index = call.node.args[0], call.node.args[1]
    if call.layouts and isinstance(call.layouts[0], tuple):
        if not isinstance(index, int):
            return gather_all(call, "getitem with a non-int index of a tuple", unsupported=True)
        return Plan(list(call.layouts), call.layouts[0][index])
    lay = _only(call)
    if lay is None or not isinstance(src, fx.Node):
        return replicated(call)
    if len(call.inputs) != 1:
        return gather_all(call, "indexing with tensors", unsupported=True)
    found = index_layout(lay, index, len(call.shape(0)))
    if isinstance(found, str):
        return gather_all(call, found, unsupported=found.startswith("indexing with"))
    out, new_index = found
    return Plan([lay], out, rewrite=_with_index(new_index))


def setitem(call: Call) -> Plan:
    """``x[index] = value`` (in place): ``x`` keeps its layout when the index keeps the tokens
    whole; ``value`` is sliced like an elementwise operand of the indexed region."""
    target, index, value = call.node.args[:3]
    it, iv = call.index_of(target), call.index_of(value)
    lay = call.layouts[it] if it is not None else None
    if it is None or not isinstance(lay, Shard):
        return replicated(call)
    found = index_layout(lay, index, len(call.shape(it)))
    if isinstance(found, str) or not isinstance(found[0], Shard):
        return gather_all(call, "in-place write into part of the token sequence")
    region, new_index = found
    need: list[Any] = [None] * len(call.inputs)
    need[it] = lay
    if iv is not None:
        region_shape = torch.empty(call.shape(it), device="meta")[index].shape
        v_shape = call.shape(iv)
        dim = region.dim - (len(region_shape) - len(v_shape))
        if dim >= 0 and v_shape[dim] == region.length:
            need[iv] = region.moved(dim)
    return Plan(need, None, rewrite=_with_index(new_index))


def splitting(call: Call) -> Plan:
    """``split``/``split_with_sizes``/``chunk``/``unbind``: off the token dim every piece keeps
    the tokens; ``split_with_sizes([text, rest], token_dim)`` separates joint text."""
    lay = _only(call)
    if lay is None:
        return replicated(call)
    pieces = value_of(call.node)
    ndim = len(call.shape(0))
    dim_pos = 1 if call.name == "unbind" else 2
    dim = _norm_dim(call.arg(dim_pos, "dim", 0), ndim)
    if dim != lay.dim:
        out_dim = lay.dim - (1 if call.name == "unbind" and dim < lay.dim else 0)
        return Plan([lay], tuple(lay.moved(out_dim) for _ in pieces))
    sizes = call.arg(1, "split_size") if call.name != "split_with_sizes" else call.arg(1, "split_sizes")
    if call.name in ("split", "split_with_sizes") and isinstance(sizes, (list, tuple)):
        if lay.prefix and list(sizes) == [lay.prefix, lay.length - lay.prefix]:
            local = [lay.prefix, call.cfg.split.local_len(lay) - lay.prefix]

            def rewrite(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
                if len(args) > 1:
                    return (args[0], type(sizes)(local), *args[2:]), kwargs
                key = "split_sizes" if "split_sizes" in kwargs else "split_size"
                return args, {**kwargs, key: type(sizes)(local)}

            return Plan([lay], (None, Shard(dim, lay.length - lay.prefix)), rewrite=rewrite)
    return gather_all(call, f"{call.name} along the token dim")


def cat(call: Call) -> Plan:
    """``cat``: off the token dim, pieces line up; along it, whole (text) pieces followed by
    one split piece give a layout with a replicated prefix (MMDiT joint streams)."""
    if not any(isinstance(lay, Shard) for lay in call.layouts):
        return replicated(call)
    ndim = len(call.out_shape)
    dim = _norm_dim(call.arg(1, "dim", 0), ndim)
    first = next(lay for lay in call.layouts if isinstance(lay, Shard))
    if first.dim != dim:
        need = [first if call.shape(i)[first.dim] == first.length else None for i in range(len(call.inputs))]
        if any(n is None for n in need):
            return gather_all(call, "cat of pieces with different token counts")
        return Plan(need, first)
    *head, last = call.layouts
    if all(lay is None for lay in head) and isinstance(last, Shard):
        prefix = sum(call.shape(i)[dim] for i in range(len(head)))
        out = Shard(dim, prefix + last.length, prefix + last.prefix)
        return Plan(list(call.layouts), out)
    return gather_all(call, "cat along the token dim after split pieces")


def stack(call: Call) -> Plan:
    """``stack``: every piece carries the same tokens; the token dim shifts past the new dim."""
    if not any(isinstance(lay, Shard) for lay in call.layouts):
        return replicated(call)
    first = next(lay for lay in call.layouts if isinstance(lay, Shard))
    ndim = len(call.out_shape)
    dim = _norm_dim(call.arg(1, "dim", 0), ndim)
    need = [first if call.shape(i)[first.dim] == first.length else None for i in range(len(call.inputs))]
    if any(n is None for n in need):
        return gather_all(call, "stack of pieces with different token counts")
    return Plan(need, first.moved(first.dim + (1 if dim <= first.dim else 0)))


def like_first(call: Call) -> Plan:
    """``x.type_as(other)``, ``x.to(other)``: elementwise in ``x``; ``other`` only lends its
    dtype/device, so it is used in whatever layout it has."""
    lay = call.layouts[0] if call.layouts else None
    return Plan([lay, *call.layouts[1:]], lay if isinstance(lay, Shard) else None)


def creation(call: Call) -> Plan:
    """``x.new_zeros(sizes)`` and friends: ``x`` only lends dtype/device; sizes are full."""
    return Plan(list(call.layouts), _full_out(value_of(call.node)))


def size(call: Call) -> Plan:
    """``x.size()``/``x.shape``: sizes of the full tensor (constants in a static graph)."""
    return Plan(list(call.layouts), None)


# -- attention ---------------------------------------------------------------------------

# name -> (positional parameter names, tuple output?)
_ATTENTION_PARAMS: dict[str, tuple[tuple[str, ...], bool]] = {
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
    names, _ = _ATTENTION_PARAMS[call.name]
    bound = dict(zip(names, call.node.args))
    bound.update(call.node.kwargs)
    return bound


def attention(call: Call) -> Plan:
    """SDPA in [B, H, S, D]: self-attention over split tokens -> ``streamfusion::attention``;
    replicated keys/values (cross-attention) -> the same SDPA on this rank's query rows."""
    bound = _attention_args(call)
    q, k, v = bound["query"], bound["key"], bound["value"]
    iq, ik, iv = call.index_of(q), call.index_of(k), call.index_of(v)
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
    tuple_out = _ATTENTION_PARAMS[call.name][1]

    def on_seq(lay: Any) -> Shard | None:
        return lay if isinstance(lay, Shard) and lay.dim == seq_dim else None

    sq, sk, sv = on_seq(lq), on_seq(lk), on_seq(lv)
    need = [None] * len(call.inputs)
    only_out0 = all(
        u.target is operator.getitem and u.args[1] == 0 for u in call.node.users
    )
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
        return _parallel_attention(call, sk, bound, need, tuple_out)
    # Local: this rank's query rows against whole keys/values (no communication).
    q_lay = sq if sq is not None else Shard(seq_dim, q_shape[seq_dim])
    need[iq] = q_lay
    reason = None
    if isinstance(lk, Shard) or isinstance(lv, Shard):
        reason = "attention whose key/value split differs from the query's"
    out: Any = q_lay
    if tuple_out:
        out = tuple([q_lay, q_lay.moved(seq_dim)] + [None] * (len(value_of(call.node)) - 2))
    return Plan(need, out, gather_reason=reason, attention="local (keys/values whole)")


def _parallel_attention(
    call: Call, lay: Shard, bound: dict[str, Any], need: list[Any], tuple_out: bool
) -> Plan:
    cfg = call.cfg
    scale = bound.get("scale")
    names = _ATTENTION_PARAMS[call.name][0]

    def emit(graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        new = dict(zip(names, args))
        new.update(kwargs)
        if cfg.overlap:
            from .overlap import emit_overlapped

            out = emit_overlapped(graph, new["query"], new["key"], new["value"], lay, scale, cfg)
        else:
            q, k, v = (
                graph.call_method("transpose", (new[name], 1, 2)) for name in ("query", "key", "value")
            )
            out = graph.call_function(
                torch.ops.streamfusion.attention.default,
                (q, k, v, lay.length, lay.prefix, scale, cfg.strategy, cfg.ctx_key, cfg.attention_backend),
            )
        out = graph.call_method("transpose", (out, 1, 2))
        return (out,) if tuple_out else out

    out: Any = (lay,) if tuple_out else lay
    text = f", joint text {lay.prefix}" if lay.prefix else ""
    return Plan(need, out, emit=emit, attention=f"streamfusion::attention ({lay.length} tokens{text})")


# -- the table ---------------------------------------------------------------------------

_ELEMENTWISE = """
add sub mul div true_divide floor_divide remainder pow neg exp expm1 log log1p log2 sqrt rsqrt
sin cos tan tanh sigmoid relu relu6 gelu silu mish softplus leaky_relu elu selu hardswish
hardsigmoid abs sign clamp clamp_min clamp_max clip where maximum minimum float half bfloat16
double type contiguous clone detach dropout lerp addcmul addcdiv erf reciprocal
square masked_fill nan_to_num _to_copy alias rsub add_ sub_ mul_ div_ logical_not eq ne lt gt
le ge zeros_like ones_like empty_like full_like fill_ sigmoid_ relu_ silu_ gelu_ tanh_ pow_
dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout atan atan2 cosh sinh asin
acos floor ceil round trunc frac bitwise_and bitwise_or logical_and logical_or
"""

RULES: dict[str, Rule] = {name: elementwise for name in _ELEMENTWISE.split()}
RULES.update(
    {
        name: reduction
        for name in "sum mean amax amin prod var std logsumexp nansum nanmean all any count_nonzero".split()
    }
)
RULES.update(
    softmax=along_dim(1),
    log_softmax=along_dim(1),
    _softmax=along_dim(1),
    _log_softmax=along_dim(1),
    cumsum=along_dim(1),
    cumprod=along_dim(1),
    normalize=along_dim(2, default=1),
    layer_norm=norm,
    rms_norm=norm,
    native_layer_norm=norm,
    group_norm=group_norm,
    linear=linear,
    matmul=matmul,
    mm=matmul,
    bmm=matmul,
    view=view,
    reshape=view,
    _unsafe_view=view,
    _reshape_alias=view,
    flatten=view,
    unflatten=view,
    expand=expand,
    permute=shuffle,
    transpose=shuffle,
    swapaxes=shuffle,
    swapdims=shuffle,
    movedim=shuffle,
    moveaxis=shuffle,
    unsqueeze=shuffle,
    squeeze=shuffle,
    t=shuffle,
    getitem=getitem,
    setitem=setitem,
    split=splitting,
    split_with_sizes=splitting,
    chunk=splitting,
    unbind=splitting,
    cat=cat,
    concat=cat,
    concatenate=cat,
    stack=stack,
    size=size,
    dim=size,
    type_as=like_first,
    to=like_first,
    new_zeros=creation,
    new_ones=creation,
    new_empty=creation,
    new_full=creation,
    new_tensor=creation,
    scaled_dot_product_attention=attention,
    _scaled_dot_product_flash_attention_for_cpu=attention,
)

_OPERATORS: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.floordiv: "floor_divide",
    operator.mod: "remainder",
    operator.pow: "pow",
    operator.neg: "neg",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.setitem: "setitem",
}

_NAMESPACES = (torch, torch.nn.functional, torch._C._nn, torch.Tensor, torch.special)


def op_name(node: fx.Node) -> str | None:
    """The op a call node runs, as one name for its torch, method and aten forms (``add``
    for ``operator.add``, ``torch.add``, ``x.add`` and ``aten.add.Tensor``), or None."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return None
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return name if ns == "aten" else None
    name = getattr(target, "__name__", None)
    if name and any(getattr(ns, name, None) is target for ns in _NAMESPACES):
        return name
    return None


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def mutated_input(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes (``x.add_(y)``, ``x += y``, ``x[i] = y``), or None."""
    name = op_name(node)
    in_place = node.target in _IN_PLACE_OPERATORS or (
        name is not None and name.endswith("_") and not name.startswith("_")
    )
    target = node.args[0] if node.args else None
    if in_place and isinstance(target, fx.Node) and isinstance(value_of(target), torch.Tensor):
        return target
    return None


def rule_for(name: str | None) -> Rule | None:
    """The rule for an op name (None: unknown op, see Note [Gather fallback])."""
    return RULES.get(name) if name is not None else None
