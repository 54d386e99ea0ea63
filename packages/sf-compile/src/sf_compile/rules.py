"""Token-dimension propagation rules, one per kind of op.

A rule looks at one graph node and the layouts of its tensor inputs (:mod:`sf_compile.token_layout`)
and returns a :class:`Decision`: the layout each input must be converted to (the pass inserts the
slice or gather), the layout of the output, and how to rewrite arguments that hold sizes of the
token dimension (``view(B, S, C)`` becomes ``view(B, S_local, C)``). Rules never touch the
graph; the same rules also run *backwards* (:mod:`sf_compile.token_pass` asks "which input
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

import operator
from typing import Any

import torch
from torch import fx

from .rule_types import (
    Call,
    Config,
    Decision,
    Rule,
    UnsupportedOpError,
    gather_all,
    replicated,
    value_of,
)
from .rules_attention import ATTENTION_OPS, attention
from .rules_compute import (
    along_dim,
    creation,
    elementwise,
    group_norm,
    like_first,
    linear,
    matmul,
    norm,
    reduction,
    size,
)
from .rules_shape import cat, expand, getitem, map_view, setitem, shuffle, splitting, stack, view
from .token_layout import Shard

__all__ = [
    "ATTENTION_OPS",
    "Call",
    "Config",
    "Decision",
    "UnsupportedOpError",
    "attention_qkv",
    "elementwise",
    "gather_all",
    "is_tensorish",
    "linear",
    "map_view",
    "mutated_input",
    "op_name",
    "replicated",
    "rule_for",
    "rule_of",
    "tensor_inputs",
    "value_of",
]


_ELEMENTWISE = """
add sub mul div true_divide floor_divide remainder pow neg exp expm1 log log1p log2 sqrt rsqrt
sin cos tan tanh sigmoid relu relu6 gelu silu mish softplus leaky_relu elu selu hardswish
hardsigmoid abs sign clamp clamp_min clamp_max clip where maximum minimum float half bfloat16
double type contiguous clone detach dropout lerp addcmul addcdiv erf reciprocal
square masked_fill nan_to_num _to_copy alias rsub add_ sub_ mul_ div_ logical_not eq ne lt gt
le ge bitwise_not zeros_like ones_like empty_like full_like fill_ sigmoid_ relu_ silu_ gelu_ tanh_ pow_
dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout atan atan2 cosh sinh asin
acos floor ceil round trunc frac bitwise_and bitwise_or logical_and logical_or
"""

_REDUCTIONS = """
sum mean amax amin prod var std logsumexp nansum nanmean all any count_nonzero
"""

RULES: dict[str, Rule] = {name: elementwise for name in _ELEMENTWISE.split()}
RULES.update({name: reduction for name in _REDUCTIONS.split()})
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
    operator.gt: "gt",
    operator.lt: "lt",
    operator.ge: "ge",
    operator.le: "le",
    operator.eq: "eq",
    operator.ne: "ne",
    operator.and_: "bitwise_and",
    operator.or_: "bitwise_or",
    operator.invert: "bitwise_not",
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
    fn_name = getattr(target, "__name__", None)
    if fn_name and any(getattr(ns, fn_name, None) is target for ns in _NAMESPACES):
        return str(fn_name)
    return None


_IN_PLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.setitem,
}


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


def is_tensorish(node: fx.Node) -> bool:
    """True for a node whose value is a tensor or a tuple holding tensors."""
    val = value_of(node)
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued node leaves of ``node``'s args and kwargs, in traversal order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return [n for n in found if is_tensorish(n)]


def _module_rule(node: fx.Node, gm: fx.GraphModule) -> tuple[str, Any]:
    """Rules for the few ``call_module`` kinds hand-traced graphs keep (Dynamo inlines)."""
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, torch.nn.Linear):
        return "linear", linear
    if isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        trailing = len(tuple(mod.normalized_shape))

        def norm(call: Call) -> Decision:
            lay = call.layouts[0]
            if not isinstance(lay, Shard):
                return replicated(call)
            if lay.dim >= len(call.shape(0)) - trailing:
                return gather_all(call, f"{type(mod).__name__} over the token dim")
            return Decision([lay], lay)

        return type(mod).__name__, norm
    if isinstance(
        mod,
        (
            torch.nn.GELU,
            torch.nn.SiLU,
            torch.nn.ReLU,
            torch.nn.Tanh,
            torch.nn.Sigmoid,
            torch.nn.Mish,
            torch.nn.Dropout,
            torch.nn.Identity,
        ),
    ):
        return type(mod).__name__, elementwise
    return type(mod).__name__, None


def rule_of(node: fx.Node, gm: fx.GraphModule) -> tuple[str, Any]:
    """(a name for the op, its rule or None) for a call node of ``gm``."""
    if node.op == "call_module":
        return _module_rule(node, gm)
    name = op_name(node)
    label = name if name is not None else getattr(node.target, "__name__", str(node.target))
    return label, rule_for(name)


def attention_qkv(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """The query, key and value nodes of an attention call, or None."""
    names = ("query", "key", "value")
    got = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
    if all(isinstance(n, fx.Node) for n in got):
        return got[0], got[1], got[2]  # type: ignore[return-value]
    return None
