"""Forward hooks that split and gather a plan's tensors inside the model.

:func:`install_module_hooks` applies a plan's ``split_module_inputs``,
``split_module_outputs`` and ``gather_module_outputs`` (Note [Split inside the model] in
:mod:`sf_models.plan`), and with sharded text its ``sharded_text_module_inputs`` and
``sharded_text_module_outputs`` (Note [Text layouts]); :func:`rewrite_arguments_hook` is the pre-hook they and the model
plans (HunyuanVideo's first-frame tokens, Wan's per-token timestep) build on. Every hook is a
no-op outside a parallel forward (Note [Inactive processors] in :mod:`sf_models.plan`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

import sf_attn

from .plan import SequenceParallelPlan, ShardState

__all__ = ["hooked_modules", "install_module_hooks", "rewrite_arguments_hook"]


def hooked_modules(
    model: torch.nn.Module, plan: SequenceParallelPlan
) -> dict[str, torch.nn.Module]:
    """The submodules ``plan`` hooks, by name (each once).

    Raises:
        ValueError: ``model`` has no submodule of one of those names.
    """
    names = [
        *plan.split_module_inputs,
        *plan.sharded_text_module_inputs,
        *plan.split_module_outputs,
        *plan.sharded_text_module_outputs,
        *plan.gather_module_outputs,
    ]
    return {name: _submodule(model, name) for name in dict.fromkeys(names)}


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"parallelize: the {type(model).__name__} plan hooks submodule {name!r}, which this "
            f"model does not have (check its config, e.g. a zero layer count)"
        ) from None


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on a tensor, or on each tensor of a tuple/list (RoPE ``(cos, sin)``)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    raise TypeError(f"parallelize: expected a tensor or a tuple of tensors, got {type(value)}")


def _first_length(value: Any, dim: int) -> int:
    return int((value if isinstance(value, torch.Tensor) else value[0]).shape[dim])


def rewrite_arguments_hook(
    state: ShardState,
    forward: Callable[..., Any],
    rewrite: Callable[[dict[str, Any]], bool],
) -> Callable[[torch.nn.Module, Any, Any], Any]:
    """A forward pre-hook (register it ``with_kwargs=True``) that, while a parallel forward
    runs, binds the call to ``forward``'s signature and lets ``rewrite`` change the bound
    arguments in place; ``rewrite`` returns False to leave the call as it is. Outside a
    parallel forward it does nothing (Note [Inactive processors])."""
    signature = inspect.signature(forward)

    def hook(_: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        if not state.active:
            return None
        bound = signature.bind(*args, **kwargs)
        if not rewrite(bound.arguments):
            return None
        return bound.args, bound.kwargs

    return hook


def install_module_hooks(
    modules: Mapping[str, torch.nn.Module], plan: SequenceParallelPlan, state: ShardState
) -> None:
    """Register the plan's submodule hooks on ``modules`` (from :func:`hooked_modules`); their
    handles go to ``state.hooks``."""
    ctx = state.ctx

    def split_inputs_hook(
        name: str, dims: Mapping[str, int], text_dims: Mapping[str, int], module: torch.nn.Module
    ) -> Any:
        def split(arguments: dict[str, Any]) -> bool:
            sharded_text = text_dims if state.text == "sharded" else {}
            for arg, dim in {**dims, **sharded_text}.items():
                value = arguments.get(arg)
                if value is None:
                    continue
                state.lengths[f"{name}.{arg}"] = _first_length(value, dim)
                arguments[arg] = _map_tensors(value, partial(sf_attn.shard, ctx=ctx, dim=dim))
            return True

        return rewrite_arguments_hook(state, module.forward, split)

    def split_output_hook(name: str, dim: int, text_only: bool = False) -> Any:
        def hook(_: torch.nn.Module, __: Any, out: Any) -> Any:
            if not state.active or (text_only and state.text != "sharded"):
                return None
            state.lengths[name] = _first_length(out, dim)
            return _map_tensors(out, partial(sf_attn.shard, ctx=ctx, dim=dim))

        return hook

    def gather_output_hook(dim: int) -> Any:
        def hook(_: torch.nn.Module, __: Any, out: Any) -> Any:
            if not state.active:
                return None
            return _map_tensors(out, partial(sf_attn.gather, ctx=ctx, dim=dim))

        return hook

    hooks = state.hooks  # removed by SequenceParallelModel.close()
    for name in dict.fromkeys([*plan.split_module_inputs, *plan.sharded_text_module_inputs]):
        module = modules[name]
        dims = plan.split_module_inputs.get(name, {})
        text_dims = plan.sharded_text_module_inputs.get(name, {})
        hook = split_inputs_hook(name, dims, text_dims, module)
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for name, dim in plan.split_module_outputs.items():
        hooks.append(modules[name].register_forward_hook(split_output_hook(name, dim)))
    for name, dim in plan.sharded_text_module_outputs.items():
        hook = split_output_hook(name, dim, text_only=True)
        hooks.append(modules[name].register_forward_hook(hook))
    for name, dim in plan.gather_module_outputs.items():
        hooks.append(modules[name].register_forward_hook(gather_output_hook(dim)))
