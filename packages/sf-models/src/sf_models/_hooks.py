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

__all__ = ["MethodOverride", "hooked_modules", "install_module_hooks", "rewrite_arguments_hook"]


def hooked_modules(
    model: torch.nn.Module, plan: SequenceParallelPlan
) -> dict[str, torch.nn.Module]:
    """The submodules ``plan`` hooks, by name (each once).

    Raises:
        ValueError: ``model`` has no submodule of one of those names, or a
            ``patch_convolutions`` one is not a patch convolution.
    """
    names = [
        *plan.split_module_inputs,
        *plan.sharded_text_module_inputs,
        *plan.split_module_outputs,
        *plan.sharded_text_module_outputs,
        *plan.gather_module_outputs,
        *plan.patch_convolutions,
    ]
    modules = {name: _submodule(model, name) for name in dict.fromkeys(names)}
    for name in plan.patch_convolutions:
        _check_patch_convolution(name, modules[name])
    return modules


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
                key = f"{name}.{arg}"
                if key in state.presplit:  # Note [Sharded patch embedding]
                    state.lengths[key] = state.presplit.pop(key)
                    continue
                state.lengths[key] = _first_length(value, dim)
                arguments[arg] = _map_tensors(value, partial(sf_attn.shard, ctx=ctx, dim=dim))
            return True

        return rewrite_arguments_hook(state, module.forward, split)

    def split_output_hook(name: str, dim: int, text_only: bool = False) -> Any:
        def hook(_: torch.nn.Module, __: Any, out: Any) -> Any:
            if not state.active or (text_only and state.text != "sharded"):
                return None
            if name in state.presplit:  # Note [Sharded patch embedding]
                state.lengths[name] = state.presplit.pop(name)
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
    for name, point in plan.patch_convolutions.items():
        conv = modules[name]
        hooks.append(conv.register_forward_pre_hook(partial(_patch_strip, state, point)))


def _check_patch_convolution(name: str, conv: torch.nn.Module) -> None:
    """Raises ValueError unless ``conv`` embeds each patch on its own (kernel = stride, no
    padding), which the sharded patch embedding needs (Note [Sharded patch embedding])."""
    kernel = getattr(conv, "kernel_size", None)
    if (
        not isinstance(conv, torch.nn.Conv2d | torch.nn.Conv3d)
        or tuple(conv.stride) != tuple(kernel or ())
        or any(conv.padding)  # type: ignore[arg-type]
        or any(d != 1 for d in conv.dilation)
        or conv.groups != 1
    ):
        raise ValueError(
            f"parallelize: {name} is not a patch convolution (Conv2d/Conv3d with kernel = "
            f"stride, no padding, dilation or groups): {conv}"
        )


def _patch_strip(state: ShardState, point: str, conv: torch.nn.Module, args: Any) -> Any:
    """Pre-hook of a patch convolution: this rank's patches of the latent, side by side in a
    strip one patch tall (Note [Sharded patch embedding]). Equivalent plain code::

        tokens = conv(latent).flatten(2).transpose(1, 2)       # [B, L, D], every patch
        mine = sf_attn.shard(tokens, ctx, 1)                   # what the strip gives
    """
    if not state.active:
        return None
    latent = args[0]
    patch = tuple(conv.kernel_size)  # type: ignore[arg-type]
    grid = [size // p for size, p in zip(latent.shape[2:], patch, strict=True)]
    batch, channels, n = latent.shape[0], latent.shape[1], len(patch)
    crop = latent[(..., *(slice(0, g * p) for g, p in zip(grid, patch, strict=True)))]
    split = crop.reshape(batch, channels, *(v for g, p in zip(grid, patch) for v in (g, p)))
    grid_axes, patch_axes = range(2, 2 + 2 * n, 2), range(3, 3 + 2 * n, 2)
    patches = split.permute(0, *grid_axes, 1, *patch_axes).reshape(batch, -1, channels, *patch)
    state.presplit[point] = patches.shape[1]
    mine = sf_attn.shard(patches, state.ctx, 1)  # [B, L_local, C, *patch]
    # [B, C, p_0, .., p_{n-2}, L_local, p_{n-1}]: the strip, patches side by side
    strip = mine.permute(0, 2, *range(3, 2 + n), 1, 2 + n)
    return (strip.reshape(batch, channels, *patch[:-1], -1), *args[1:])


class MethodOverride:
    """``module.<name>`` replaced by ``make(original)`` on this one instance (the class and
    other instances keep theirs) until :meth:`remove`; for a plan whose model calls a helper
    method whose result must be this rank's part (SD3's positional table). A
    :class:`~sf_models.plan.Removable` for ``state.hooks``."""

    def __init__(
        self, module: torch.nn.Module, name: str, make: Callable[[Callable[..., Any]], Any]
    ) -> None:
        self.module, self.name = module, name
        self.function = make(getattr(module, name))
        object.__setattr__(module, name, self.function)

    def remove(self) -> None:
        if vars(self.module).get(self.name) is self.function:
            object.__delattr__(self.module, self.name)
