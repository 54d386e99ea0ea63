"""CFG parallel: the two branches of classifier-free guidance on the two halves of the world.

Classifier-free guidance evaluates the transformer twice per denoising step, once without
and once with the prompt, and combines the two predictions. With ``cfg_parallel`` the world
is split in two parts (``ctx.split(2)``: whole machines when possible), each part runs one
branch with sequence parallelism on its own sub-context, and the parts swap their results
over the *cross group* (the ranks with the same place in each part), so every rank ends up
with both predictions and the pipeline's own guidance arithmetic runs unchanged.

Pipelines run CFG in one of two ways, each described by a :class:`CFGPlan` (registered per
pipeline class, like :class:`~sf_models.plan.SequenceParallelPlan` per model, and kept in
the module of the model the pipeline is built on, e.g. :data:`sf_models.flux.FLUX_CFG_PLAN`):

``"batched"`` (SD3, CogVideoX): one transformer call on the batch ``[uncond; cond]``. Plain
code and what runs on the rank of part ``p`` (batch ``2B``)::

    out = transformer(x)                                  # plain: the full batch
    half = transformer_sp(x[p*B:(p+1)*B])                 # part p, SP over the part
    out = cat(all_gather(cross, half), dim=0)             # [uncond; cond] again, every rank

A call whose batch does not split in two (SD3's skip-layer-guidance call with one image) runs
whole on both parts, and part 0's result is used everywhere, so all ranks stay bit-identical.

``"paired"`` (Flux and HunyuanVideo true CFG, Wan): two calls per step, cond then uncond, on
the same latents (Note [Deferred first branch])::

    cond = transformer(x, text)            # plain: two calls, one after the other
    uncond = transformer(x, negative)

               call 1 (x, text)           call 2 (x, negative)
    part 0:    record, NaN placeholder    SP(x, text) ------.  all_gather over cross:
    part 1:    record, NaN placeholder    SP(x, negative) --'  fill placeholder <- text
                                                               result; return negative's

Contract with the pipeline (paired): the first call's output is not read before the second
call of the same step returns, the two calls share ``hidden_states`` and ``timestep``, and
tensors passed to the first call are not modified in place before the second (dict arguments
are copied at the first call, as Flux swaps IP-adapter embeds inside its
``joint_attention_kwargs`` dict between the calls). The stock pipelines above keep it; a
violation shows (placeholder read early: NaN output; calls that do not pair: RuntimeError)
instead of giving a silently different image. Diffusers cache hooks (``enable_cache``) are
not supported with paired CFG parallel: part 0 computes the cond branch inside the
pipeline's "uncond" cache context.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import sf_comm
from sf_comm.split import part_layout

from .plan import registered_for
from .wrapper import replace_outputs

__all__ = [
    "CFGParallelModel",
    "CFGPlan",
    "channels_first_output_shape",
    "check_cfg_topology",
    "get_cfg_plan",
    "guidance_scale_above_one",
    "register_cfg_plan",
    "supported_cfg_pipelines",
    "true_cfg",
]

Mode = Literal["batched", "paired"]
# (transformer config, hidden_states shape) -> shape of the transformer's output
OutputShape = Callable[[Any, torch.Size], tuple[int, ...]]
# the pipeline's __call__ arguments (defaults applied) -> None if the call runs CFG, else why not
CallCheck = Callable[[Mapping[str, Any]], str | None]


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class CFGPlan:
    """How one pipeline class runs classifier-free guidance (see the module docstring).

    Attributes:
        mode: "batched" (one transformer call on ``[uncond; cond]``) or "paired" (two calls
            per step, cond then uncond).
        check: the pipeline's ``__call__`` arguments (defaults applied) -> None when that call
            runs classifier-free guidance, else a sentence saying why it does not.
        batched_inputs: ("batched") transformer arguments whose dim 0 is the guidance batch;
            any other argument is passed to both halves unchanged.
        output_shape: ("paired") the transformer's output shape from its config and the
            ``hidden_states`` shape: the deferred first call returns a placeholder of it.
    """

    mode: Mode
    check: CallCheck
    batched_inputs: tuple[str, ...] = ()
    output_shape: OutputShape | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("batched", "paired"):
            raise ValueError(f"CFGPlan.mode must be 'batched' or 'paired', got {self.mode!r}")
        if self.mode == "batched" and "hidden_states" not in self.batched_inputs:
            raise ValueError(
                f"CFGPlan.batched_inputs must include 'hidden_states' for mode 'batched', got "
                f"{self.batched_inputs!r}"
            )
        if self.mode == "paired" and self.output_shape is None:
            raise ValueError("CFGPlan.output_shape is required for mode 'paired'")


_CFG_PLANS: dict[str, CFGPlan] = {}


def register_cfg_plan(pipeline_class_name: str, plan: CFGPlan) -> None:
    """Register ``plan`` for pipelines whose class (or a base class) is named so."""
    _CFG_PLANS[pipeline_class_name] = plan


def supported_cfg_pipelines() -> list[str]:
    """Pipeline class names that ``cfg_parallel=True`` accepts."""
    return sorted(_CFG_PLANS)


def get_cfg_plan(pipe: Any) -> CFGPlan:
    """The CFG plan for ``pipe``'s class (or its nearest registered base class).

    Raises:
        ValueError: none registered; the message lists the supported pipelines.
    """
    plan = registered_for(_CFG_PLANS, pipe)
    if plan is not None:
        return plan
    raise ValueError(
        f"cfg_parallel=True: no CFG-parallel plan for {type(pipe).__name__} (how its guidance "
        f"branches reach the transformer is not described); supported pipelines: "
        f"{supported_cfg_pipelines()}. Use cfg_parallel=False to run every rank on sequence "
        f"parallelism instead"
    )


def check_cfg_topology(topology: sf_comm.Topology) -> None:
    """Raise unless ``topology`` splits into two equal parts, one per guidance branch.

    Raises:
        ValueError: the message names the topology and what would work.
    """
    machines, gpus = topology.shape
    try:
        part_layout(topology, 2)
    except ValueError:
        raise ValueError(
            f"cfg_parallel=True runs the two guidance branches on two equal halves of the "
            f"world, made of whole machines or of half of every machine's GPUs; topology "
            f"{machines}x{gpus} ({machines * gpus} rank{'s' if machines * gpus > 1 else ''}) has neither an even number of machines "
            f"nor of GPUs per machine. Use e.g. {2 * machines}x{gpus} or {machines}x{2 * gpus}"
            f"{f' or {machines}x{gpus - 1}' if gpus > 2 else ''}, or cfg_parallel=False"
        ) from None


# -- the rules shared by the model modules' plans ----------------------------------------------


def guidance_scale_above_one(args: Mapping[str, Any]) -> str | None:
    """A :attr:`CFGPlan.check`: pipelines that guide when ``guidance_scale > 1``."""
    scale = args["guidance_scale"]
    if scale is not None and scale > 1:
        return None
    return f"guidance_scale={scale}: the pipeline runs classifier-free guidance only when it is > 1"


def true_cfg(args: Mapping[str, Any]) -> str | None:
    """A :attr:`CFGPlan.check`: pipelines with true CFG (``true_cfg_scale`` and a negative
    prompt)."""
    # Mirrors the pipelines' own rule: do_true_cfg = true_cfg_scale > 1 and has_neg_prompt.
    negative = args["negative_prompt"] is not None or (
        args["negative_prompt_embeds"] is not None
        and args["negative_pooled_prompt_embeds"] is not None
    )
    if args["true_cfg_scale"] > 1 and negative:
        return None
    return (
        f"true_cfg_scale={args['true_cfg_scale']}, negative prompt "
        f"{'given' if negative else 'missing'}: the pipeline runs true classifier-free guidance "
        f"only with true_cfg_scale > 1 and a negative_prompt (or negative_prompt_embeds and "
        f"negative_pooled_prompt_embeds)"
    )


def channels_first_output_shape(config: Any, hidden: torch.Size) -> tuple[int, ...]:
    """A :attr:`CFGPlan.output_shape` for latent video in and out (Wan, HunyuanVideo):
    [B, C_in, F, H, W] -> [B, C_out, F, H, W]."""
    channels = config.out_channels or config.in_channels
    return (hidden[0], channels, *hidden[2:])


def _sample(out: Any) -> torch.Tensor:
    """The prediction: element 0 of the tuple or ``ModelOutput`` a transformer returns."""
    return out[0]


class CFGParallelModel(torch.nn.Module):
    """A transformer whose guidance branches run on the two halves of the world.

    Takes the same full inputs and returns the same full outputs on every rank as the
    transformer it wraps (see the module docstring for the two modes). Attributes not found
    here are looked up on the wrapped module (``config``, ``dtype``, ``cache_context``, ...).

    Args:
        model: the transformer parallelized on this rank's part (``parallelize(transformer,
            ctx=sub_ctx)``, or ``torch.compile(transformer, backend="streamfusion")`` on it).
        plan: the pipeline's CFG plan.
        ctx: the whole job's context (the cross-group exchange runs on it).
        cross: the group joining the ranks with the same place in both parts, in part order.
        part: this rank's part: 0 computes the first branch (``[uncond; ...]`` half 0, or the
            first call of a pair), 1 the second.
        forward: the plain transformer's ``forward``: its signature names the arguments of a
            call (``model``'s own may take ``*args, **kwargs``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: CFGPlan,
        *,
        ctx: sf_comm.Context,
        cross: sf_comm.Group,
        part: int,
        forward: Callable[..., Any],
    ) -> None:
        super().__init__()
        self.module = model
        self.plan = plan
        self.ctx = ctx
        self.cross = cross
        self.part = part
        self._signature = inspect.signature(forward)
        self._armed = False  # paired: True while a ParallelPipeline call runs
        self._pending: tuple[inspect.BoundArguments, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def begin_call(self) -> None:
        """Start pairing calls (paired mode); called by the pipeline wrapper."""
        self._armed, self._pending = True, None

    def end_call(self, *, check: bool = True) -> None:
        """Stop pairing. With ``check``, an unpaired first call left over is an error: the
        pipeline call did not run classifier-free guidance the way the plan says."""
        pending, self._armed, self._pending = self._pending, False, None
        if check and pending is not None:
            raise RuntimeError(
                "cfg_parallel: the pipeline's last transformer call had no guidance partner "
                "(the placeholder it returned was never filled); this pipeline call did not run "
                "classifier-free guidance the way its CFG plan says"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(*args, **kwargs)
        if self.plan.mode == "batched":
            return self._batched(bound)
        return self._paired(bound)

    def _run(self, bound: inspect.BoundArguments) -> Any:
        return self.module(*bound.args, **bound.kwargs)

    def _exchange(self, out: Any) -> list[torch.Tensor]:
        """Every part's prediction, in part order (one all-gather over the cross group)."""
        return sf_comm.all_gather(self.ctx, self.cross, _sample(out).contiguous()).wait()

    def _batched(self, bound: inspect.BoundArguments) -> Any:
        inputs = bound.arguments
        batch = inputs["hidden_states"].shape[0]
        if batch % 2:
            # Not a [uncond; cond] batch: both parts run it whole; part 0's result everywhere.
            out = self._run(bound)
            return replace_outputs(out, {0: self._exchange(out)[0]})
        half = batch // 2
        rows = slice(self.part * half, (self.part + 1) * half)
        for name in self.plan.batched_inputs:
            value = inputs.get(name)
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] == 1:
                continue  # absent or broadcast over the batch
            if value.shape[0] != batch:
                raise ValueError(
                    f"cfg_parallel: transformer input {name!r} has {value.shape[0]} rows on dim 0, "
                    f"hidden_states has {batch}; cannot split the guidance batch"
                )
            inputs[name] = value[rows]
        out = self._run(bound)
        return replace_outputs(out, {0: torch.cat(self._exchange(out), dim=0)})

    def _paired(self, bound: inspect.BoundArguments) -> Any:
        # Note [Deferred first branch]
        if not self._armed:
            raise RuntimeError(
                "cfg_parallel: call the ParallelPipeline that parallelize(pipe, ...) returned, "
                "not the pipeline or its transformer directly; the transformer alone cannot "
                "tell which calls form a guidance pair"
            )
        if self._pending is None:
            hidden = bound.arguments["hidden_states"]
            shape = self.plan.output_shape(self.module.config, hidden.shape)  # type: ignore[misc]
            placeholder = torch.full(shape, float("nan"), dtype=hidden.dtype, device=hidden.device)
            for name, value in bound.arguments.items():
                if isinstance(value, dict):
                    bound.arguments[name] = dict(value)  # the pipeline may mutate it in between
            self._pending = (bound, placeholder)
            if bound.arguments.get("return_dict", True):
                return Transformer2DModelOutput(sample=placeholder)
            return (placeholder,)
        first, placeholder = self._pending
        self._pending = None
        for name in ("hidden_states", "timestep"):
            a, b = first.arguments.get(name), bound.arguments.get(name)
            same = a is b or (
                isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
            )
            if not same:
                raise RuntimeError(
                    f"cfg_parallel: the two transformer calls of a guidance pair differ in {name!r}; "
                    f"the pipeline does not run paired classifier-free guidance as its plan says"
                )
        out = self._run(first if self.part == 0 else bound)
        first_out, second_out = self._exchange(out)
        if first_out.shape != placeholder.shape or first_out.dtype != placeholder.dtype:
            raise RuntimeError(
                f"cfg_parallel: the first branch returned {tuple(first_out.shape)} "
                f"{first_out.dtype}, its placeholder was {tuple(placeholder.shape)} "
                f"{placeholder.dtype}; the plan's output_shape is wrong for this model"
            )
        placeholder.copy_(first_out)
        return replace_outputs(out, {0: second_out})


# Note [Deferred first branch]
# Flux, HunyuanVideo and Wan call the transformer for the cond branch, then for the uncond
# branch, and only then combine the two. The first call cannot run on one half while the
# other half waits for the second call's inputs, so the first call only records its inputs
# and returns a placeholder tensor (NaN-filled, shaped by the plan). The second call is where
# both branches run at once: part 0 on the recorded inputs, part 1 on the current ones; after
# the swap, the placeholder is filled in place with the first branch's result (the tensor the
# pipeline already holds) and the second branch's result is returned. As the pipeline reads
# neither before the second call returns, it sees exactly what two sequential calls return.
