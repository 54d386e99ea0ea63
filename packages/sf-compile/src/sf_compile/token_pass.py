"""The FX pass: split the token sequence of a graph across ranks.

Equivalent plain code (what every rank's rewritten graph computes, up to rounding)::

    outputs = graph(*inputs)                  # the original graph on the full inputs

What it does, on each rank:

1. *Seeds* (backwards, Note [Seeds] in :mod:`sf_compile.seeds`): from every attention's
   query/key/value, walk the graph backwards through the ops :mod:`sf_compile.rules` can carry
   tokens through, to where the tokens enter: graph inputs (hidden states, learned positional
   embeddings) or the reshape that forms the token dim (a patch embedding's ``flatten``).
2. *Rewrite* (forwards): every seed is cut to this rank's tokens right where it enters; every
   node's rule says which layout its inputs need and what comes out; the pass inserts a slice
   (whole -> split, free) or a ``streamfusion::gather`` (split -> whole, communication) where a
   value's layout differs from what the op needs, rewrites token sizes in ``view``/``reshape``
   arguments, and replaces attention by ``streamfusion::attention``. Graph outputs are gathered,
   so the compiled model returns full tensors on every rank, as in eager.

Note [In-place ops]
~~~~~~~~~~~~~~~~~~~
An in-place op (``x[..., ::2] = y`` in Wan's RoPE, ``x.add_(y)``, ``x += y``) writes into the
version of ``x`` it is given. If its rule needed ``x`` in another layout, the write lands in
the converted copy; the pass then makes that copy *the* value of ``x`` for every later user
and drops the other versions, which are stale. (A view of ``x`` taken before the write does
not see it when ``x`` was converted; DiTs do not do that.)
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .overlap import hoist_value_sends
from .rules import (
    Call,
    Config,
    UnsupportedOpError,
    gather_all,
    is_tensorish,
    mutated_input,
    rule_of,
    tensor_inputs,
    value_of,
)
from .seeds import find_seeds
from .token_layout import Shard, Split

__all__ = ["ShardReport", "check_static", "shard_graph"]


@dataclasses.dataclass(slots=True)
class ShardReport:
    """What :func:`shard_graph` did to one graph on one rank (node names of the input graph).

    Attributes:
        split: this rank's place in the split.
        inputs: values cut to this rank's tokens where they enter (seeds), with their layout.
        sliced: whole values cut to this rank's tokens inside the graph (no communication).
        gathered: split values gathered whole, with the op that needed them and why.
        attention: attention nodes and what replaced them.
        fallbacks: ops no rule knows that received split inputs (Note [Gather fallback]).
    """

    split: Split
    inputs: list[str] = dataclasses.field(default_factory=list)
    sliced: list[str] = dataclasses.field(default_factory=list)
    gathered: list[str] = dataclasses.field(default_factory=list)
    attention: list[str] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"streamfusion: rank {self.split.rank} of {self.split.world}"]
        for title, items in (
            ("sharded where they enter", self.inputs),
            ("sliced inside the graph", self.sliced),
            ("attention replaced", self.attention),
            ("gathered", self.gathered),
            ("fallbacks (gathered, op unknown)", self.fallbacks),
        ):
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {item}" for item in items)
        return "\n".join(lines)


class _Value:
    """What an input-graph node became: a node (or constant, or tuple of nodes) with a layout,
    plus the other layouts already materialised for it."""

    __slots__ = ("layout", "node", "versions")

    def __init__(self, node: Any, layout: Any, whole: Any = None) -> None:
        self.node = node
        self.layout = layout
        self.versions: dict[Any, Any] = {layout: node}
        if whole is not None:
            self.versions[None] = whole


class _Rewriter:
    def __init__(
        self, gm: fx.GraphModule, cfg: Config, seeds: dict[fx.Node, Shard], on_unsupported: str
    ) -> None:
        self.gm = gm
        self.cfg = cfg
        self.seeds = seeds
        self.on_unsupported = on_unsupported
        self.graph = fx.Graph()
        self.env: dict[fx.Node, _Value] = {}
        self.report = ShardReport(cfg.split)

    # layout conversions

    def _slice(self, whole: fx.Node, lay: Shard) -> fx.Node:
        split = self.cfg.split
        count = split.local_len(lay) - lay.prefix
        part = self.graph.call_function(torch.narrow, (whole, lay.dim, split.offset(lay), count))
        if not lay.prefix:
            return part
        text = self.graph.call_function(torch.narrow, (whole, lay.dim, 0, lay.prefix))
        return self.graph.call_function(torch.cat, ([text, part], lay.dim))

    def convert(self, val: _Value, want: Any, user: fx.Node, why: str) -> Any:
        if want in val.versions:
            return val.versions[want]
        if isinstance(val.layout, tuple) or isinstance(want, tuple):
            raise AssertionError(f"cannot convert the multi-output value used by {user.name}")
        if want is None:
            lay = val.layout
            assert isinstance(lay, Shard)
            out = self.graph.call_function(
                torch.ops.streamfusion.gather.default,
                (val.node, lay.dim, lay.length, lay.prefix, self.cfg.ctx_key),
            )
            self.report.gathered.append(f"{user.name}: {why}")
        else:
            whole = self.convert(val, None, user, why or "re-split for another layout")
            out = self._slice(whole, want)
            self.report.sliced.append(f"{user.name}: input cut to {want}")
        val.versions[want] = out
        return out

    # nodes

    def run(self) -> tuple[fx.GraphModule, ShardReport]:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self._source(node)
            elif node.op == "output":
                self._output(node)
            else:
                self._call(node)
        new_gm = fx.GraphModule(self.gm, self.graph, self.gm.__class__.__name__)
        new_gm.graph.eliminate_dead_code()  # unused slices of seeds
        if self.cfg.overlap:
            hoist_value_sends(new_gm.graph)
        new_gm.recompile()
        return new_gm, self.report

    def _source(self, node: fx.Node) -> None:
        new = self.graph.node_copy(node, lambda n: self.env[n].node)
        seed = self.seeds.get(node)
        if seed is None:
            self.env[node] = _Value(new, None)
            return
        self.env[node] = _Value(self._slice(new, seed), seed, whole=new)
        self.report.inputs.append(f"{node.name}: {seed}")

    def _output(self, node: fx.Node) -> None:
        def whole(n: fx.Node) -> Any:
            val = self.env[n]
            if isinstance(val.layout, tuple):
                if any(isinstance(lay, Shard) for lay in val.layout):
                    raise AssertionError(f"graph output {n.name} is a split multi-output value")
                return val.node
            return self.convert(val, None, n, "graph output")

        self.graph.output(fx.node.map_arg(node.args[0], whole))

    def _call(self, node: fx.Node) -> None:
        src = node.args[0] if node.args else None
        if (
            node.target is operator.getitem
            and isinstance(src, fx.Node)
            and isinstance(self.env[src].node, tuple)
        ):
            val = self.env[src]  # a replaced multi-output op: pick the element directly
            self.env[node] = _Value(val.node[node.args[1]], val.layout[node.args[1]])
            return
        inputs = tensor_inputs(node)
        layouts = [self.env[n].layout for n in inputs]
        name, rule = rule_of(node, self.gm)
        call = Call(node, name, inputs, layouts, self.cfg)
        if rule is None:
            plan = gather_all(call, f"no rule for {name}", unsupported=True)
        else:
            plan = rule(call)
        if plan.unsupported and plan.gather_reason:
            if self.on_unsupported == "error":
                raise UnsupportedOpError(
                    f"streamfusion: node {node.name} ({name}) receives token-split inputs and "
                    f"cannot keep them split: {plan.gather_reason}. Use on_unsupported='gather' to "
                    "gather them there (correct, but the work after it is no longer split)."
                )
            self.report.fallbacks.append(f"{node.name}: {plan.gather_reason}")
        position = iter(range(len(inputs)))
        converted: list[Any] = []

        def arg(n: fx.Node) -> Any:
            if not is_tensorish(n):
                return self.env[n].node
            i = next(position)
            converted.append(
                self.convert(self.env[n], plan.need[i], node, plan.gather_reason or name)
            )
            return converted[-1]

        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        if plan.rewrite is not None:
            args, kwargs = plan.rewrite(args, kwargs)
        if plan.attention is not None:
            self.report.attention.append(f"{node.name}: {plan.attention}")
        if plan.emit is not None:
            new: Any = plan.emit(self.graph, args, kwargs)
        else:
            new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
            new.meta = dict(node.meta)
        mutated = mutated_input(node)
        if mutated is not None:
            # The op wrote into the version it was given; that version is now the value, and
            # every other version of it is stale (Note [In-place ops]).
            i = inputs.index(mutated)
            self.env[mutated] = _Value(converted[i], plan.need[i])
        out = plan.out
        seed = self.seeds.get(node)
        if seed is not None and out is None:
            self.env[node] = _Value(self._slice(new, seed), seed, whole=new)
            self.report.inputs.append(f"{node.name}: {seed}")
        else:
            self.env[node] = _Value(new, out)


def _ensure_meta(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> None:
    """Shapes of every node: Dynamo's ``example_value`` or a fake-tensor run."""
    missing = any(
        (n.users or n.op == "placeholder") and "val" not in n.meta and "example_value" not in n.meta
        for n in gm.graph.nodes
    )
    if not missing:
        return
    if example_inputs is None:
        raise ValueError("shard_graph: the graph has no shape metadata; pass example_inputs")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def check_static(gm: fx.GraphModule) -> None:
    """Raise if token sizes may be symbolic (the pass needs them at compile time).

    Raises:
        ValueError: a graph input is a SymInt or has symbolic sizes.
    """
    for node in gm.graph.find_nodes(op="placeholder"):
        val = value_of(node)
        sym = isinstance(val, torch.SymInt) or (
            isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape)
        )
        if sym:
            raise ValueError(
                f"backend='streamfusion' needs static shapes, but graph input {node.name} is "
                "dynamic; compile with torch.compile(..., dynamic=False) (shapes that change "
                "then recompile instead of going symbolic)"
            )


def shard_graph(
    gm: fx.GraphModule,
    *,
    split: Split,
    ctx_key: int = 0,
    strategy: str = "auto",
    attention_backend: str = "auto",
    overlap: bool = False,
    on_unsupported: str = "gather",
    example_inputs: Sequence[Any] | None = None,
) -> tuple[fx.GraphModule, ShardReport]:
    """Rewrite ``gm`` so its token sequence is split across ranks (see the module docstring).

    ``gm`` is not modified. The result takes and returns the same (full) tensors as ``gm``.

    Args:
        gm: a graph with shape metadata (Dynamo's) or ``example_inputs`` to compute it.
        split: this rank and the world size.
        ctx_key: the :func:`sf_compile.ops.register_context` key the inserted ops use.
        strategy: ``sf_attn.parallel_attention`` strategy.
        attention_backend: local attention backend inside it.
        overlap: emit the overlapped attention schedule (:mod:`sf_compile.overlap`).
        on_unsupported: "gather" (Note [Gather fallback]) or "error".
        example_inputs: inputs to compute shapes from when ``gm`` has no metadata.

    Returns:
        (the rewritten graph module, what was split, sliced, replaced and gathered)

    Raises:
        UnsupportedOpError: ``on_unsupported="error"`` and an unknown op gets split inputs.
        ValueError: symbolic shapes, or an unknown ``on_unsupported``.
    """
    if on_unsupported not in ("gather", "error"):
        raise ValueError(f"on_unsupported must be 'gather' or 'error', got {on_unsupported!r}")
    _ensure_meta(gm, example_inputs)
    check_static(gm)
    cfg = Config(
        split=split,
        strategy=strategy,
        ctx_key=ctx_key,
        attention_backend=attention_backend,
        overlap=overlap,
    )
    seeds = find_seeds(gm, cfg)
    return _Rewriter(gm, cfg, seeds, on_unsupported).run()
