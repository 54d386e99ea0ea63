"""The sequence-parallel wrapper of one diffusers transformer, built from its plan.

:func:`parallelize_transformer` is the transformer case of :func:`sf_models.parallelize`: it
looks up the model's :class:`~sf_models.plan.SequenceParallelPlan`, lets the plan swap the
model's attention processors, installs the plan's submodule hooks and returns a
:class:`SequenceParallelModel`, which splits the plan's inputs and gathers its outputs around
each call (the plain-code equivalent is in :mod:`sf_models.plan`), and with ``text="sharded"``
splits the plan's text inputs as well (Note [Text layouts] in :mod:`sf_models.plan`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

import sf_attn
import sf_comm

from ._hooks import hooked_modules, install_module_hooks
from .plan import SequenceParallelPlan, ShardState, TextLayout, get_plan, resolve_text

__all__ = ["SequenceParallelModel", "parallelize_transformer", "replace_outputs"]


class SequenceParallelModel(torch.nn.Module):
    """A model that takes the full inputs and returns the full outputs on every rank, with
    its token sequence split across the ranks of ``state.ctx`` inside.

    Built by :func:`sf_models.parallelize`. Attributes not found here are looked up on the
    wrapped module (``config``, ``dtype``, ...), so it can stand in for the model.
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
        if state.text == "sharded":  # Note [Text layouts] in sf_models.plan
            for name, dim in plan.sharded_text_inputs.items():
                if isinstance(inputs.get(name), torch.Tensor):
                    inputs[name] = sf_attn.shard(inputs[name], ctx, dim)
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
        gathered = {i: sf_attn.gather(out[i], ctx, dim) for i, dim in self.plan.output_dims.items()}
        return replace_outputs(out, gathered)


def replace_outputs(out: Any, items: Mapping[int, torch.Tensor]) -> Any:
    """``out``, a model's tuple or diffusers ``ModelOutput`` (updated in place), with
    ``items[i]`` at position ``i``."""
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        values = list(out)
        for index, value in items.items():
            values[index] = value
        return type(out)(values)
    # diffusers ModelOutput: an ordered dict whose values are also reachable by position.
    keys = list(out.keys())
    for index, value in items.items():
        out[keys[index]] = value
    return out


def parallelize_transformer(
    model: torch.nn.Module,
    *,
    ctx: sf_comm.CommContext,
    strategy: str = "auto",
    text: TextLayout = "auto",
) -> SequenceParallelModel:
    """:func:`sf_models.parallelize` for a diffusers transformer (see there).

    Raises:
        ValueError: the model class has no plan (the message lists the supported ones), the
            strategy is unknown, it cannot split the model's heads on ``ctx``'s topology
            (sf_attn's message), the model lacks a submodule its plan hooks, ``text`` is not a
            layout, or it is "sharded" and the plan keeps text replicated (the message lists
            the models that support it).
    """
    plan = get_plan(model)
    if strategy != "auto":
        sf_attn.get_strategy(strategy)  # unknown names fail here, not mid-forward
    state = ShardState(ctx=ctx, strategy=strategy, text=resolve_text(model, plan, text))
    hooked = hooked_modules(model, plan)  # before attach: a missing one leaves model untouched
    plan.attach(model, state)
    install_module_hooks(hooked, plan, state)
    return SequenceParallelModel(model, plan, state)
