"""``parallelize``: run a diffusers transformer with its token sequence split across ranks.

A model is described by a declarative :class:`SequenceParallelPlan` (which forward inputs
are split along which dim, which are replicated, which outputs are gathered, and how its
attention is swapped) registered under the model's class name. One generic
:func:`parallelize` applies any plan; adding a model is one plan and one
:func:`register_plan` line (see :mod:`sf_models.flux`).

Equivalent plain code (what every rank computes, up to floating-point rounding)::

    out = model(**inputs)                      # the original model on the full inputs

What runs on each rank::

    for name, dim in plan.split_inputs:  inputs[name] = shard(inputs[name], ctx, dim)
    out_local = model(**inputs)                # attention: parallel_attention over the shards
    for index, dim in plan.output_dims:  out[index] = gather(out_local[index], ctx, dim)

Contract with the attention processors a plan installs (Note [Inactive processors]): the
processors read the per-call :class:`ShardState` that the wrapper fills in before each
forward, and delegate to the processor they replaced while no parallel forward is running,
so the wrapped module called directly still computes the original model.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

import sf_attn
import sf_comm

__all__ = [
    "SequenceParallelModel",
    "SequenceParallelPlan",
    "ShardState",
    "get_plan",
    "parallelize",
    "register_plan",
    "supported_models",
]


@dataclasses.dataclass(kw_only=True, slots=True)
class ShardState:
    """Per-model state shared by :class:`SequenceParallelModel` and its attention processors.

    Attributes:
        ctx: the communication context.
        strategy: the ``sf_attn.parallel_attention`` strategy name.
        active: True only while a parallel forward runs (Note [Inactive processors]).
        lengths: full (unsplit) length of every split or replicated input along its plan dim,
            for the current call, e.g. ``{"hidden_states": 35, "encoder_hidden_states": 6}``.
    """

    ctx: sf_comm.Context
    strategy: str
    active: bool = False
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)


Attach = Callable[[torch.nn.Module, ShardState], None]


def _check_dims(field: str, value: Mapping[Any, int], key_type: type) -> None:
    for key, dim in value.items():
        if not isinstance(key, key_type) or not isinstance(dim, int):
            raise ValueError(
                f"SequenceParallelPlan.{field} must map {key_type.__name__} -> int dim; got {key!r}: {dim!r}"
            )


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class SequenceParallelPlan:
    """How one model class runs sequence-parallel.

    Attributes:
        split_inputs: forward argument name -> dim it is sharded along (``sf_attn.shard``).
        replicated_inputs: forward argument name -> its sequence dim; kept whole on every rank,
            only its length is recorded in :attr:`ShardState.lengths` (e.g. text tokens).
        output_dims: output position (index into the returned tuple / ``ModelOutput``) -> dim
            it is gathered along (``sf_attn.gather``).
        unsupported_inputs: forward arguments that must be None (e.g. sequence-shaped extras
            the plan does not shard yet); anything else raises ValueError at call time.
        attach: ``attach(model, state)`` swaps the model's attention for a sequence-parallel
            one that reads ``state``; it validates the model (heads vs strategy) and raises
            ValueError for what it cannot run.
    """

    split_inputs: Mapping[str, int]
    replicated_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    output_dims: Mapping[int, int] = dataclasses.field(default_factory=lambda: {0: 1})
    unsupported_inputs: tuple[str, ...] = ()
    attach: Attach

    def __post_init__(self) -> None:
        if not self.split_inputs:
            raise ValueError(
                "SequenceParallelPlan.split_inputs is empty; at least one input must be split"
            )
        _check_dims("split_inputs", self.split_inputs, str)
        _check_dims("replicated_inputs", self.replicated_inputs, str)
        _check_dims("output_dims", self.output_dims, int)
        both = sorted(set(self.split_inputs) & set(self.replicated_inputs))
        if both:
            raise ValueError(f"SequenceParallelPlan: inputs {both} are both split and replicated")
        if not callable(self.attach):
            raise ValueError(f"SequenceParallelPlan.attach must be callable, got {self.attach!r}")
        # Frozen plans are shared by every model of a class: make the maps read-only too.
        for name in ("split_inputs", "replicated_inputs", "output_dims"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


_PLANS: dict[str, SequenceParallelPlan] = {}


def register_plan(class_name: str, plan: SequenceParallelPlan) -> None:
    """Register ``plan`` for models whose class (or a base class) is named ``class_name``."""
    _PLANS[class_name] = plan


def supported_models() -> list[str]:
    """Class names that :func:`parallelize` accepts."""
    _load_builtin_plans()
    return sorted(_PLANS)


def get_plan(model: torch.nn.Module) -> SequenceParallelPlan:
    """The plan registered for ``model``'s class (or the nearest registered base class).

    Raises:
        ValueError: no plan is registered; the message lists the supported classes.
    """
    _load_builtin_plans()
    for cls in type(model).__mro__:
        if cls.__name__ in _PLANS:
            return _PLANS[cls.__name__]
    raise ValueError(
        f"parallelize: no sequence-parallel plan for {type(model).__name__}; "
        f"supported models: {supported_models()}"
    )


def _load_builtin_plans() -> None:
    # The model modules register themselves on import; importing here keeps the registry
    # complete without sf_models/__init__ having to import every model.
    from . import flux  # noqa: F401


class SequenceParallelModel(torch.nn.Module):
    """A model that takes the full inputs and returns the full outputs on every rank, with
    its token sequence split across the ranks of ``state.ctx`` inside.

    Built by :func:`parallelize`. Attributes not found here are looked up on the wrapped
    module (``config``, ``dtype``, ...), so it can stand in for the model.
    """

    def __init__(
        self, module: torch.nn.Module, plan: SequenceParallelPlan, state: ShardState
    ) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.state = state
        self._signature = inspect.signature(module.forward)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan, state, ctx = self.plan, self.state, self.state.ctx
        bound = self._signature.bind(*args, **kwargs)
        inputs = bound.arguments
        for name in plan.unsupported_inputs:
            if inputs.get(name) is not None:
                raise ValueError(
                    f"parallelize: {type(self.module).__name__} input {name!r} is not supported under "
                    f"sequence parallelism (pass None)"
                )
        lengths: dict[str, int] = {}
        for name, dim in plan.replicated_inputs.items():
            if isinstance(inputs.get(name), torch.Tensor):
                lengths[name] = inputs[name].shape[dim]
        for name, dim in plan.split_inputs.items():
            value = inputs.get(name)
            if value is None:
                raise ValueError(f"parallelize: {type(self.module).__name__} needs input {name!r}")
            lengths[name] = value.shape[dim]
            inputs[name] = sf_attn.shard(value, ctx, dim)
        state.lengths, state.active = lengths, True
        try:
            out = self.module(*bound.args, **bound.kwargs)
        finally:
            state.active = False
        return self._gather(out)

    def _gather(self, out: Any) -> Any:
        ctx = self.state.ctx
        if isinstance(out, torch.Tensor):
            dim = self.plan.output_dims.get(0)
            return out if dim is None else sf_attn.gather(out, ctx, dim)
        if isinstance(out, tuple) and not hasattr(out, "keys"):
            items = list(out)
            for index, dim in self.plan.output_dims.items():
                items[index] = sf_attn.gather(items[index], ctx, dim)
            return type(out)(items)
        # diffusers ModelOutput: an ordered dict whose values are also reachable by position.
        keys = list(out.keys())
        for index, dim in self.plan.output_dims.items():
            out[keys[index]] = sf_attn.gather(out[keys[index]], ctx, dim)
        return out


def parallelize(
    model: torch.nn.Module, *, ctx: sf_comm.Context, strategy: str = "auto"
) -> SequenceParallelModel:
    """Wrap a diffusers transformer so its token sequence is split across ``ctx``'s ranks.

    Every rank calls the returned module with the same full inputs and gets the same full
    outputs as ``model`` would return, up to floating-point rounding. ``model``'s attention
    processors are replaced in place; called directly (outside the wrapper) it still computes
    the original model (Note [Inactive processors]).

    Args:
        model: a supported diffusers transformer (see :func:`supported_models`), identical
            (same weights) on every rank.
        ctx: the communication context (:func:`sf_comm.init`).
        strategy: ``sf_attn.parallel_attention`` strategy: "ulysses", "ring", "usp", "tas"
            or "auto".

    Returns:
        The wrapping :class:`SequenceParallelModel`.

    Raises:
        ValueError: the model class has no plan (the message lists the supported ones), the
            strategy is unknown, or it cannot split the model's heads on ``ctx``'s topology
            (sf_attn's message, naming the heads and what fits).
    """
    plan = get_plan(model)
    if strategy != "auto":
        sf_attn.get_strategy(strategy)  # unknown names fail here, not mid-forward
    state = ShardState(ctx=ctx, strategy=strategy)
    plan.attach(model, state)
    return SequenceParallelModel(model, plan, state)


# Note [Inactive processors]
# parallelize() swaps processors on the caller's model object instead of deep-copying it
# (a copy would double the weights' memory). So that the caller's model keeps computing the
# original function when called on its own (e.g. as the single-process reference, or by
# code that still holds it), every installed processor checks ``state.active`` and hands
# the call to the processor it replaced unless the wrapper's forward is running.
