"""Sequence-parallel plans: how one diffusers transformer class runs with its tokens split.

A model is described by a declarative :class:`SequenceParallelPlan` (which forward inputs
are split along which dim, which are replicated, which outputs are gathered, and how its
attention is swapped) registered under the model's class name with :func:`register_plan`.
Adding a model is one module holding its plan and one :func:`register_plan` line (see
:mod:`sf_models.flux`), imported by :mod:`sf_models.parallelize`, which is what makes the
registry complete (the package imports it, so any ``import sf_models...`` does).

Equivalent plain code (what every rank computes, up to floating-point rounding)::

    out = model(**inputs)                      # the original model on the full inputs

What runs on each rank (:class:`sf_models.wrapper.SequenceParallelModel`)::

    for name, dim in plan.split_inputs:  inputs[name] = shard(inputs[name], ctx, dim)
    if text == "sharded":                      # Note [Text layouts]
        for name, dim in plan.sharded_text_inputs:  inputs[name] = shard(inputs[name], ctx, dim)
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
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeVar

import torch

import sf_attn
import sf_comm

__all__ = [
    "TEXT_LAYOUTS",
    "Attach",
    "SequenceParallelPlan",
    "ShardState",
    "TextLayout",
    "get_plan",
    "register_plan",
    "registered_for",
    "resolve_text",
    "sharded_text_models",
    "supported_models",
]

TextLayout = Literal["auto", "replicated", "sharded"]
TEXT_LAYOUTS = ("auto", "replicated", "sharded")  # parallelize(..., text=); Note [Text layouts]

T = TypeVar("T")


class Removable(Protocol):
    """What a plan's ``attach`` leaves in :attr:`ShardState.hooks`: a torch hook handle, or
    anything else :meth:`SequenceParallelModel.close` undoes by calling ``remove()``."""

    def remove(self) -> None: ...


@dataclasses.dataclass(kw_only=True, slots=True)
class ShardState:
    """Per-model state shared by the wrapper, its hooks and its attention processors.

    Attributes:
        ctx: the communication context.
        strategy: the ``sf_attn.parallel_attention`` strategy name.
        active: True only while a parallel forward runs (Note [Inactive processors]).
        lengths: full (unsplit) length of every split or replicated input along its plan dim,
            for the current call, e.g. ``{"hidden_states": 35, "encoder_hidden_states": 6}``;
            a split submodule output is keyed by the submodule's name (``"rope"``) and a split
            submodule input by ``"<submodule>.<argument>"`` (``"blocks.0.hidden_states"``).
            Sharded text inputs are recorded with their full length too.
        text: the text layout, resolved: "replicated" or "sharded" (Note [Text layouts]).
        ulysses_degree: the Ulysses degree asked for (``parallelize(..., ulysses_degree=)``),
            or None for the strategy's own; the Ring degree is the world over it.
        hooks: handles of every hook the plan installed (its ``attach`` and the submodule
            hooks), removed by :meth:`sf_models.wrapper.SequenceParallelModel.close`.
        presplit: split points whose tokens arrive already split in the current call (a
            sharded patch embedding made them), with their full length
            (Note [Sharded patch embedding]).
    """

    ctx: sf_comm.CommContext
    strategy: str
    text: str = "replicated"
    ulysses_degree: int | None = None
    active: bool = False
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)
    hooks: list[Removable] = dataclasses.field(default_factory=list)
    presplit: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.text not in TEXT_LAYOUTS[1:]:
            raise ValueError(
                f"ShardState.text must be a resolved layout, one of {list(TEXT_LAYOUTS[1:])}; "
                f"got {self.text!r} (resolve 'auto' with sf_models.plan.resolve_text)"
            )
        degree = self.ulysses_degree
        if degree is not None and (type(degree) is not int or degree < 1):
            raise ValueError(
                f"parallelize: ulysses_degree must be a positive int or None (the strategy's "
                f"own), got {degree!r}"
            )

    def resolve(
        self,
        *,
        heads: int,
        head_dim: int,
        seq_len: int,
        text_len: int = 0,
        dtype: torch.dtype,
        batch: int = 1,
    ) -> sf_attn.Resolution:
        """What ``parallel_attention`` runs for one attention layer of the model: the same
        :func:`sf_attn.resolve` call (same cached object), with this state's strategy,
        Ulysses degree and text layout (sharded text is sequence in front of the image).

        Args:
            heads, head_dim, dtype, batch: the layer.
            seq_len: the whole (unsplit) image/video token count.
            text_len: the whole joint text token count (0: none).

        Raises:
            ValueError: sf_attn's: "auto" with a Ulysses degree, or a degree or head count
                the strategy cannot lay out on the context's topology (the message lists the
                degrees that fit).
        """
        sharded = self.text == "sharded"
        return sf_attn.resolve(
            self.ctx,
            seq_len=seq_len + text_len if sharded else seq_len,
            heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            batch=batch,
            text_len=0 if sharded else text_len,
            strategy=self.strategy,
            ulysses_degree=self.ulysses_degree,
        )

    def text_rows(self, length: int) -> int:
        """How many of ``length`` text tokens this rank holds: all of them with replicated
        text, its chunk (``sf_attn.chunk_sizes(length, world)[rank]``) with sharded text."""
        if self.text == "replicated":
            return length
        return sf_attn.chunk_sizes(length, self.ctx.world_size)[self.ctx.rank]


Attach = Callable[[torch.nn.Module, ShardState], None]


def _check_module_inputs(field: str, value: Mapping[str, Mapping[str, int]]) -> None:
    for module, dims in value.items():
        if not isinstance(module, str) or not isinstance(dims, Mapping):
            raise ValueError(
                f"SequenceParallelPlan.{field} must map submodule name -> "
                f"{{argument: dim}}; got {module!r}: {dims!r}"
            )
        _check_dims(f"{field}[{module!r}]", dims, str)


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
        sharded_text_inputs: the replicated inputs that are split instead (``sf_attn.shard``
            along the given dim) when the model runs with ``text="sharded"``; empty: the model
            supports replicated text only (Note [Text layouts]). Every name must also be in
            ``replicated_inputs`` (the layout it leaves).
        sharded_text_module_inputs: like ``split_module_inputs``, applied only with
            ``text="sharded"``: text that the model builds inside ``forward`` (CogVideoX cuts it
            from ``patch_embed``'s stream) is split on its way into a submodule.
        sharded_text_module_outputs: like ``split_module_outputs``, applied only with
            ``text="sharded"`` (HunyuanVideo's text leaves its token refiner whole and is split
            there).
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
        patch_convolutions: submodule name of a patch-embedding convolution (kernel = stride,
            no padding, its output flattened to tokens by ``flatten(2).transpose(1, 2)``) ->
            the split point its tokens reach (a ``split_module_outputs`` name, or
            ``"<submodule>.<argument>"`` of ``split_module_inputs``): the convolution then
            embeds only this rank's patches and the split point passes them on as they are
            (Note [Sharded patch embedding]).
        attach: ``attach(model, state)`` swaps the model's attention for a sequence-parallel
            one that reads ``state``; it validates the model (heads vs strategy) and raises
            ValueError for what it cannot run. Hooks it registers go to ``state.hooks``, and
            the processors it installs are :class:`sf_models._swap.SequenceParallelProcessor`
            objects, so that ``close()`` can undo both.
    """

    split_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    replicated_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    sharded_text_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    sharded_text_module_inputs: Mapping[str, Mapping[str, int]] = dataclasses.field(
        default_factory=dict
    )
    sharded_text_module_outputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    output_dims: Mapping[int, int] = dataclasses.field(default_factory=lambda: {0: 1})
    unsupported_inputs: tuple[str, ...] = ()
    split_module_inputs: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    split_module_outputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    gather_module_outputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    patch_convolutions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    attach: Attach

    def __post_init__(self) -> None:
        if not (self.split_inputs or self.split_module_inputs or self.split_module_outputs):
            raise ValueError(
                "SequenceParallelPlan.split_inputs is empty and so are split_module_inputs and "
                "split_module_outputs; at least one input must be split"
            )
        _check_dims("split_inputs", self.split_inputs, str)
        _check_dims("replicated_inputs", self.replicated_inputs, str)
        _check_dims("sharded_text_inputs", self.sharded_text_inputs, str)
        _check_dims("output_dims", self.output_dims, int)
        _check_module_inputs("split_module_inputs", self.split_module_inputs)
        _check_module_inputs("sharded_text_module_inputs", self.sharded_text_module_inputs)
        _check_dims("split_module_outputs", self.split_module_outputs, str)
        _check_dims("sharded_text_module_outputs", self.sharded_text_module_outputs, str)
        _check_dims("gather_module_outputs", self.gather_module_outputs, str)
        points = {
            *self.split_module_outputs,
            *(f"{m}.{a}" for m, d in self.split_module_inputs.items() for a in d),
        }
        stray_points = sorted(set(self.patch_convolutions.values()) - points)
        if stray_points:
            raise ValueError(
                f"SequenceParallelPlan.patch_convolutions leads to {stray_points}, which are not "
                f"split points; use one of {sorted(points)}"
            )
        both = sorted(set(self.split_inputs) & set(self.replicated_inputs))
        if both:
            raise ValueError(f"SequenceParallelPlan: inputs {both} are both split and replicated")
        stray = sorted(set(self.sharded_text_inputs) - set(self.replicated_inputs))
        if stray:
            raise ValueError(
                f"SequenceParallelPlan.sharded_text_inputs {stray} are not in replicated_inputs "
                f"{sorted(self.replicated_inputs)}; only replicated inputs can be sharded instead"
            )
        if not callable(self.attach):
            raise ValueError(f"SequenceParallelPlan.attach must be callable, got {self.attach!r}")
        # Frozen plans are shared by every model of a class: make the maps read-only too.
        for name in (
            "split_inputs",
            "replicated_inputs",
            "sharded_text_inputs",
            "output_dims",
            "split_module_outputs",
            "sharded_text_module_outputs",
            "gather_module_outputs",
            "patch_convolutions",
        ):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for name in ("split_module_inputs", "sharded_text_module_inputs"):
            nested = {m: MappingProxyType(dict(d)) for m, d in getattr(self, name).items()}
            object.__setattr__(self, name, MappingProxyType(nested))

    @property
    def shards_text(self) -> bool:
        """Whether the model supports ``text="sharded"`` (Note [Text layouts])."""
        return bool(
            self.sharded_text_inputs
            or self.sharded_text_module_inputs
            or self.sharded_text_module_outputs
        )


_PLANS: dict[str, SequenceParallelPlan] = {}


def register_plan(class_name: str, plan: SequenceParallelPlan) -> None:
    """Register ``plan`` for models whose class (or a base class) is named ``class_name``."""
    _PLANS[class_name] = plan


def supported_models() -> list[str]:
    """Class names that :func:`sf_models.parallelize` accepts."""
    return sorted(_PLANS)


def get_plan(model: torch.nn.Module) -> SequenceParallelPlan:
    """The plan registered for ``model``'s class (or the nearest registered base class).

    Raises:
        ValueError: no plan is registered; the message lists the supported classes.
    """
    plan = registered_for(_PLANS, model)
    if plan is not None:
        return plan
    raise ValueError(
        f"parallelize: no sequence-parallel plan for {type(model).__name__}; "
        f"supported models: {supported_models()}"
    )


def sharded_text_models() -> list[str]:
    """Class names whose plan supports ``text="sharded"``."""
    return sorted(name for name, plan in _PLANS.items() if plan.shards_text)


def resolve_text(model: torch.nn.Module, plan: SequenceParallelPlan, text: str) -> str:
    """The text layout ``model`` runs with for ``parallelize(..., text=text)``: "sharded" or
    "replicated"; "auto" is "sharded" where ``plan`` supports it (Note [Text layouts]).

    Raises:
        ValueError: ``text`` is not one of :data:`TEXT_LAYOUTS`, or it is "sharded" and the
            plan keeps text replicated (the message names the models that support it).
    """
    if text not in TEXT_LAYOUTS:
        raise ValueError(f"parallelize: text must be one of {list(TEXT_LAYOUTS)}, got {text!r}")
    supported = plan.shards_text
    if text == "sharded" and not supported:
        raise ValueError(
            f"parallelize: text='sharded' is not supported by {type(model).__name__}, whose "
            f"text tokens stay replicated; models that support it: {sharded_text_models()}. "
            f"Use text='replicated' or 'auto'"
        )
    if text == "auto":
        return "sharded" if supported else "replicated"
    return text


def registered_for(registry: Mapping[str, T], obj: object) -> T | None:
    """``registry``'s entry for ``obj``'s class (or ``obj`` itself, if a class), or for its
    nearest base class, by class name (plans are registered by name so that modules need not
    import the classes)."""
    for cls in (obj if isinstance(obj, type) else type(obj)).__mro__:
        if cls.__name__ in registry:
            return registry[cls.__name__]
    return None


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

# Note [Sharded patch embedding]
# Embedding every patch on every rank makes one full-sequence tensor at the full hidden
# width per call, the largest tensor of the step at high world sizes. Where the patch
# embedding is a convolution whose kernel equals its stride (a linear map of each patch on
# its own) followed by flatten(2).transpose(1, 2), a pre-hook instead hands the convolution
# only this rank's patches, laid side by side in a strip one patch tall (pure data movement on
# the latent, whose width is channels x patch volume, not the hidden width): the convolution
# then returns [B, D, 1, .., 1, L_local], which the model flattens into this rank's tokens in
# order. The hook records the full token count in ``state.presplit`` under the split point
# the tokens reach, and that split point records it in ``state.lengths`` and passes the
# tokens on unsplit. Each token is the same dot product over the same patch as before.
# A positional table added inside the embedding module must then be cut to the same rows:
# SD3's plan overrides its PatchEmbed's ``cropped_pos_embed`` on the instance to return this
# rank's rows. CogVideoX's patch embedding folds frames into the batch before its
# convolution (a token chunk that spans frames is no strip), so it still embeds every patch.


# Note [Text layouts]
# Joint-attention models (Flux, SD3, ...) carry text tokens beside the image tokens. Two
# layouts, chosen by parallelize(..., text=):
# - "replicated": every rank holds all text tokens and runs the text stream's per-token layers
#   (embedder, projections, MLPs, norms) on all of them; the attention gets the whole text as
#   ``joint=`` and returns the whole text output on every rank.
# - "sharded" (xDiT's layout): the plan's ``sharded_text_inputs`` are split across the ranks
#   like the image tokens, so each rank runs the text stream's per-token layers on its own
#   text chunk only (nothing is computed twice), and the attention gets this rank's text chunk
#   as ``joint=`` with ``text="sharded"`` and returns this rank's text rows. Processors that
#   cut a stream at the text length use :meth:`ShardState.text_rows` (the local length).
# A model that builds its text inside ``forward`` lists ``sharded_text_module_inputs`` or
# ``sharded_text_module_outputs`` instead (split on the way into or out of a submodule; full
# length under "<submodule>.<argument>" or "<submodule>").
# "auto" is "sharded" where the plan lists either, else "replicated": the text
# stream is small next to the image stream, but its per-token layers are as wide, and under
# replication every rank pays for all of them. A plan may list them only if its model has no
# layer that mixes text tokens outside the attention after the split (true of Flux, SD3 and
# CogVideoX, whose text stream is per-token everywhere else, and of HunyuanVideo after its
# token refiner, which runs on the whole prompt before the split). Wan keeps text replicated:
# its cross-attention needs every text key on every rank.
