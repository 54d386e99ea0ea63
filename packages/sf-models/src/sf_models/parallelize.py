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

Models that patchify inside ``forward`` (latent [B, C, (F,) H, W] in, the same out) are split
on the token sequence *inside* the model instead, by hooks on named submodules (Note [Split
inside the model])::

    tokens = patch_embed(latent)                         # full, on every rank
    tokens = shard(tokens, ctx, 1)                       # split_module_outputs / _inputs
    ...blocks on the shard...
    out = gather(proj_out(tokens), ctx, 1)               # gather_module_outputs
    latent_out = unpatchify(out)                         # full, on every rank

Contract with the attention processors a plan installs (Note [Inactive processors]): the
processors read the per-call :class:`ShardState` that the wrapper fills in before each
forward, and delegate to the processor they replaced while no parallel forward is running,
so the wrapped module called directly still computes the original model.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, overload

import torch

import sf_attn
import sf_comm

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .pipeline import DecodeOn, ParallelPipeline

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
            for the current call, e.g. ``{"hidden_states": 35, "encoder_hidden_states": 6}``;
            a split submodule output is keyed by the submodule's name (``"rope"``) and a split
            submodule input by ``"<submodule>.<argument>"`` (``"blocks.0.hidden_states"``).
    """

    ctx: sf_comm.Context
    strategy: str
    active: bool = False
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)


Attach = Callable[[torch.nn.Module, ShardState], None]


def _check_module_inputs(value: Mapping[str, Mapping[str, int]]) -> None:
    for module, dims in value.items():
        if not isinstance(module, str) or not isinstance(dims, Mapping):
            raise ValueError(
                "SequenceParallelPlan.split_module_inputs must map submodule name -> "
                f"{{argument: dim}}; got {module!r}: {dims!r}"
            )
        _check_dims(f"split_module_inputs[{module!r}]", dims, str)


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
        split_module_inputs: submodule name -> {forward argument: dim}: while a parallel forward
            runs, those arguments of that submodule are sharded on their way in (e.g.
            ``{"blocks.0": {"hidden_states": 1}}``). Note [Split inside the model].
        split_module_outputs: submodule name -> dim: that submodule's output (a tensor, or a
            tuple of tensors such as RoPE ``(cos, sin)``: each one) is sharded along dim.
        gather_module_outputs: submodule name -> dim: that submodule's output is gathered
            along dim (e.g. ``{"proj_out": 1}`` before an unpatchify).
        attach: ``attach(model, state)`` swaps the model's attention for a sequence-parallel
            one that reads ``state``; it validates the model (heads vs strategy) and raises
            ValueError for what it cannot run.
    """

    split_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    replicated_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    output_dims: Mapping[int, int] = dataclasses.field(default_factory=lambda: {0: 1})
    unsupported_inputs: tuple[str, ...] = ()
    split_module_inputs: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    split_module_outputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    gather_module_outputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    attach: Attach

    def __post_init__(self) -> None:
        if not (self.split_inputs or self.split_module_inputs or self.split_module_outputs):
            raise ValueError(
                "SequenceParallelPlan.split_inputs is empty and so are split_module_inputs and "
                "split_module_outputs; at least one input must be split"
            )
        _check_dims("split_inputs", self.split_inputs, str)
        _check_dims("replicated_inputs", self.replicated_inputs, str)
        _check_dims("output_dims", self.output_dims, int)
        _check_module_inputs(self.split_module_inputs)
        _check_dims("split_module_outputs", self.split_module_outputs, str)
        _check_dims("gather_module_outputs", self.gather_module_outputs, str)
        both = sorted(set(self.split_inputs) & set(self.replicated_inputs))
        if both:
            raise ValueError(f"SequenceParallelPlan: inputs {both} are both split and replicated")
        if not callable(self.attach):
            raise ValueError(f"SequenceParallelPlan.attach must be callable, got {self.attach!r}")
        # Frozen plans are shared by every model of a class: make the maps read-only too.
        for name in (
            "split_inputs",
            "replicated_inputs",
            "output_dims",
            "split_module_outputs",
            "gather_module_outputs",
        ):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        module_inputs = {m: MappingProxyType(dict(d)) for m, d in self.split_module_inputs.items()}
        object.__setattr__(self, "split_module_inputs", MappingProxyType(module_inputs))


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
    from . import cogvideox, flux, hunyuanvideo, sd3, wan  # noqa: F401


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


@overload
def parallelize(
    model: torch.nn.Module, *, ctx: sf_comm.Context, strategy: str = "auto"
) -> SequenceParallelModel: ...


@overload
def parallelize(
    model: DiffusionPipeline,
    *,
    ctx: sf_comm.Context,
    strategy: str = "auto",
    cfg_parallel: bool = False,
    decode_on: DecodeOn = "rank0",
) -> ParallelPipeline: ...


def parallelize(
    model: Any,
    *,
    ctx: sf_comm.Context,
    strategy: str = "auto",
    cfg_parallel: bool = False,
    decode_on: DecodeOn = "rank0",
) -> SequenceParallelModel | ParallelPipeline:
    """Wrap a diffusers transformer so its token sequence is split across ``ctx``'s ranks.

    Given a diffusers pipeline instead (``DiffusionPipeline``), parallelizes its transformer
    in place and returns a :class:`~sf_models.pipeline.ParallelPipeline`; ``cfg_parallel`` and
    ``decode_on`` apply to pipelines only (see :func:`sf_models.pipeline.parallelize_pipeline`).

    Every rank calls the returned module with the same full inputs and gets the same full
    outputs as ``model`` would return, up to floating-point rounding. ``model``'s attention
    processors are replaced in place; called directly (outside the wrapper) it still computes
    the original model (Note [Inactive processors]).

    Args:
        model: a supported diffusers transformer (see :func:`supported_models`) or a
            diffusers pipeline built on one, identical (same weights) on every rank.
        ctx: the communication context (:func:`sf_comm.init`).
        strategy: ``sf_attn.parallel_attention`` strategy: "ulysses", "ring", "usp", "tas"
            or "auto".
        cfg_parallel: (pipelines) run the two classifier-free-guidance branches on the two
            halves of the world (:mod:`sf_models.cfg`).
        decode_on: (pipelines) "rank0" (other ranks return latents) or "all".

    Returns:
        The wrapping :class:`SequenceParallelModel` (a pipeline: a ``ParallelPipeline``).

    Raises:
        ValueError: the model class has no plan (the message lists the supported ones), the
            strategy is unknown, or it cannot split the model's heads on ``ctx``'s topology
            (sf_attn's message, naming the heads and what fits); for a pipeline, see
            ``parallelize_pipeline``; ``cfg_parallel`` given with a bare transformer.
    """
    if _is_pipeline(model):
        from .pipeline import parallelize_pipeline

        return parallelize_pipeline(
            model, ctx=ctx, strategy=strategy, cfg_parallel=cfg_parallel, decode_on=decode_on
        )
    if cfg_parallel:
        raise ValueError(
            "parallelize: cfg_parallel=True needs the pipeline (it splits the pipeline's "
            f"guidance branches), got a {type(model).__name__}: call parallelize(pipe, ...)"
        )
    plan = get_plan(model)
    if strategy != "auto":
        sf_attn.get_strategy(strategy)  # unknown names fail here, not mid-forward
    state = ShardState(ctx=ctx, strategy=strategy)
    hooked = {name: _submodule(model, name) for name in _hooked_modules(plan)}
    plan.attach(model, state)
    _install_module_hooks(hooked, plan, state)
    return SequenceParallelModel(model, plan, state)


def _is_pipeline(model: Any) -> bool:
    """A diffusers ``DiffusionPipeline``, or a pipeline already wrapped by parallelize()."""
    return any(
        cls.__name__ in ("DiffusionPipeline", "ParallelPipeline") for cls in type(model).__mro__
    )


def _hooked_modules(plan: SequenceParallelPlan) -> list[str]:
    names = [*plan.split_module_inputs, *plan.split_module_outputs, *plan.gather_module_outputs]
    return list(dict.fromkeys(names))


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


def _install_module_hooks(
    modules: Mapping[str, torch.nn.Module], plan: SequenceParallelPlan, state: ShardState
) -> None:
    """Register the plan's submodule hooks (Note [Split inside the model])."""
    ctx = state.ctx

    def split_inputs_hook(name: str, dims: Mapping[str, int], module: torch.nn.Module) -> Any:
        def split(arguments: dict[str, Any]) -> bool:
            for arg, dim in dims.items():
                value = arguments.get(arg)
                if value is None:
                    continue
                state.lengths[f"{name}.{arg}"] = _first_length(value, dim)
                arguments[arg] = _map_tensors(value, partial(sf_attn.shard, ctx=ctx, dim=dim))
            return True

        return rewrite_arguments_hook(state, module.forward, split)

    def split_output_hook(name: str, dim: int) -> Any:
        def hook(_: torch.nn.Module, __: Any, out: Any) -> Any:
            if not state.active:
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

    for name, dims in plan.split_module_inputs.items():
        module = modules[name]
        module.register_forward_pre_hook(split_inputs_hook(name, dims, module), with_kwargs=True)
    for name, dim in plan.split_module_outputs.items():
        modules[name].register_forward_hook(split_output_hook(name, dim))
    for name, dim in plan.gather_module_outputs.items():
        modules[name].register_forward_hook(gather_output_hook(dim))


# Note [Inactive processors]
# parallelize() swaps processors on the caller's model object instead of deep-copying it
# (a copy would double the weights' memory). So that the caller's model keeps computing the
# original function when called on its own (e.g. as the single-process reference, or by
# code that still holds it), every installed processor checks ``state.active`` and hands
# the call to the processor it replaced unless the wrapper's forward is running.


# Note [Split inside the model]
# Flux takes token-shaped inputs, so the wrapper can split them. SD3, CogVideoX, HunyuanVideo
# and Wan take a latent image/video and patchify inside forward(), adding positional
# embeddings that depend on the whole grid; splitting the latent itself would change those
# embeddings and would not give tensor_split-sized token chunks. Their plans instead name
# submodules whose outputs (or inputs) are the token sequence right after patch embedding,
# which every rank computes in full (a cheap, replicated convolution), and shard it there;
# the last per-token layer (``proj_out``) is gathered so the model's own unpatchify sees the
# full sequence. RoPE tables computed from the full grid are sharded the same way, so each
# rank holds exactly the rows of its own tokens. The hooks are no-ops outside a parallel
# forward (Note [Inactive processors]) and must sit on submodules that run once per forward.
