"""The sequence-parallel wrapper of one diffusers transformer, built from its plan.

:func:`parallelize_transformer` is the transformer case of :func:`sf_models.parallelize`: it
looks up the model's :class:`~sf_models.plan.SequenceParallelPlan`, lets the plan swap the
model's attention processors, installs the plan's submodule hooks and returns a
:class:`SequenceParallelModel`, which splits the plan's inputs and gathers its outputs around
each call (the plain-code equivalent is in :mod:`sf_models.plan`), and with ``text="sharded"``
splits the plan's text inputs as well (Note [Text layouts] in :mod:`sf_models.plan`).
:meth:`SequenceParallelModel.close` undoes the swap and the hooks, giving the model back.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

import sf_attn
import sf_comm

from ._hooks import hooked_modules, install_module_hooks
from ._swap import restore_attention_processors
from .plan import SequenceParallelPlan, ShardState, TextLayout, get_plan, resolve_text

__all__ = ["SequenceParallelModel", "parallelize_transformer", "replace_outputs"]


class SequenceParallelModel(torch.nn.Module):
    """A model that takes the full inputs and returns the full outputs on every rank, with
    its token sequence split across the ranks of ``state.ctx`` inside.

    Built by :func:`sf_models.parallelize`. Attributes not found here are looked up on the
    wrapped module (``config``, ``dtype``, ...), so it can stand in for the model.
    :meth:`close` gives the model back (its own processors, no hooks).
    """

    def __init__(
        self, module: torch.nn.Module, plan: SequenceParallelPlan, state: ShardState
    ) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.state = state
        self._signature = inspect.signature(module.forward)
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def attention_plan(
        self,
        *,
        seq_len: int,
        text_len: int = 0,
        batch: int = 1,
        dtype: torch.dtype | None = None,
    ) -> sf_attn.Resolution:
        """The strategy and degrees this model's attention layers run with: the
        :func:`sf_attn.resolve` answer ``parallel_attention`` gets inside them (the same cached
        object), e.g. ``.name``, ``.ulysses_degree``, ``.ring_degree``, ``.layout``.

        Args:
            seq_len: the whole image/video token count of a call (after patchifying).
            text_len: the whole joint text token count (0 where the text is not joint, e.g.
                Wan's cross-attention).
            batch: the batch the transformer is called with.
            dtype: the attention's dtype; default the model's.

        Raises:
            ValueError: as :func:`sf_attn.resolve`.
        """
        model: Any = self.module
        return self.state.resolve(
            heads=model.config.num_attention_heads,
            head_dim=model.config.attention_head_dim,
            seq_len=seq_len,
            text_len=text_len,
            dtype=model.dtype if dtype is None else dtype,
            batch=batch,
        )

    def close(self) -> None:
        """Give the model back: its own attention processors (the very objects it had) and
        none of the hooks ``parallelize`` installed, so it can be used on its own or
        parallelized again. The wrapper refuses calls afterwards. Not collective; calling it
        again does nothing; it does not close the context (its owner does).
        """
        if self._closed:
            return
        self._closed = True
        restore_attention_processors(self.module)
        hooks, self.state.hooks = self.state.hooks, []
        for hook in hooks:
            hook.remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan, state, ctx = self.plan, self.state, self.state.ctx
        model_name = type(self.module).__name__
        if self._closed:
            raise RuntimeError(
                f"parallelize({model_name}): this wrapper is closed (close() gave the model back); "
                f"call the model itself, or parallelize it again"
            )
        if ctx.transport.closed:
            raise RuntimeError(
                f"parallelize({model_name}): the context is closed while the model is still "
                f"parallelized; call close() (for a pipeline: sp.close() on the "
                f"ParallelPipeline) to get the single-process model back"
            )
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
        state.lengths, state.presplit, state.active = lengths, {}, True
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
    ulysses_degree: int | None = None,
) -> SequenceParallelModel:
    """:func:`sf_models.parallelize` for a diffusers transformer (see there).

    Raises:
        ValueError: the model class has no plan (the message lists the supported ones), the
            strategy is unknown, it cannot split the model's heads on ``ctx``'s topology
            (sf_attn's message), ``ulysses_degree`` is not a positive int, is given with
            "auto", or cannot be laid out or exceeds the heads (sf_attn's message, listing the
            degrees that fit), the model lacks a submodule its plan hooks, ``text`` is not a
            layout, or it is "sharded" and the plan keeps text replicated (the message lists
            the models that support it).
    """
    plan = get_plan(model)
    if strategy != "auto":
        sf_attn.get_strategy(strategy)  # unknown names fail here, not mid-forward
    text_layout = resolve_text(model, plan, text)
    state = ShardState(ctx=ctx, strategy=strategy, text=text_layout, ulysses_degree=ulysses_degree)
    hooked = hooked_modules(model, plan)  # before attach: a missing one leaves model untouched
    plan.attach(model, state)
    install_module_hooks(hooked, plan, state)
    return SequenceParallelModel(model, plan, state)
