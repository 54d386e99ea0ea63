"""``parallelize``: run a diffusers transformer or pipeline with its token sequence split
across ranks.

The one public transform. It dispatches on what it is given: a pipeline goes to
:func:`sf_models.pipeline.parallelize_pipeline`, a transformer to
:func:`sf_models.wrapper.parallelize_transformer`, which applies the model's
:class:`~sf_models.plan.SequenceParallelPlan` (what it splits and the plain-code equivalent:
:mod:`sf_models.plan`).

This module imports every built-in model module, each of which registers its plans (the
sequence-parallel plan, and the CFG plans of the pipelines built on it); the package imports
this module, so the registries are complete as soon as ``sf_models`` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import torch

import sf_comm

from . import cogvideox, flux, hunyuanvideo, sd3, wan  # noqa: F401  (register their plans)
from .pipeline import DecodeOn, ParallelPipeline, parallelize_pipeline
from .plan import TextLayout
from .vae import ParallelVAE, parallelize_vae
from .wrapper import SequenceParallelModel, parallelize_transformer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

__all__ = ["parallelize"]


@overload
def parallelize(model: AutoencoderKL, *, ctx: sf_comm.CommContext) -> ParallelVAE: ...


@overload
def parallelize(
    model: torch.nn.Module,
    *,
    ctx: sf_comm.CommContext,
    strategy: str = "auto",
    text: TextLayout = "auto",
    ulysses_degree: int | None = None,
) -> SequenceParallelModel: ...


@overload
def parallelize(
    model: DiffusionPipeline,
    *,
    ctx: sf_comm.Context,
    strategy: str = "auto",
    text: TextLayout = "auto",
    cfg_parallel: bool = False,
    decode_on: DecodeOn = "auto",
    ulysses_degree: int | None = None,
) -> ParallelPipeline: ...


def parallelize(
    model: Any,
    *,
    ctx: sf_comm.CommContext,
    strategy: str = "auto",
    text: TextLayout = "auto",
    cfg_parallel: bool = False,
    decode_on: DecodeOn = "auto",
    ulysses_degree: int | None = None,
) -> SequenceParallelModel | ParallelPipeline | ParallelVAE:
    """Wrap a diffusers transformer so its token sequence is split across ``ctx``'s ranks.

    Given a diffusers pipeline instead (``DiffusionPipeline``), parallelizes its transformer
    in place and returns a :class:`~sf_models.pipeline.ParallelPipeline`; ``cfg_parallel`` and
    ``decode_on`` apply to pipelines only (see :func:`sf_models.pipeline.parallelize_pipeline`).
    By default every rank then gets the pipeline's full output (images, frames), as one
    process would.

    Every rank calls the returned module with the same full inputs and gets the same full
    outputs as ``model`` would return, up to floating-point rounding. ``model``'s attention
    processors are replaced in place; called directly (outside the wrapper) it still computes
    the original model (Note [Inactive processors] in :mod:`sf_models.plan`). ``close()`` on
    the returned object gives ``model`` (or the pipeline) back unparallelized; it does not
    close ``ctx``.

    Args:
        model: a supported diffusers transformer (see :func:`sf_models.supported_models`) or a
            diffusers pipeline built on one, identical (same weights) on every rank.
        ctx: the communication context (:func:`sf_comm.init`; for a transformer also a part
            of one, ``ctx.split``).
        strategy: ``sf_attn.parallel_attention`` strategy: "ulysses", "ring", "usp", "tas"
            or "auto".
        text: where the text tokens of a joint-attention model live (Note [Text layouts] in
            :mod:`sf_models.plan`): "replicated" (whole on every rank, which runs the text
            stream's per-token layers on all of them), "sharded" (split across the ranks like
            the image tokens, so no text compute is repeated; the models of
            :func:`sf_models.plan.sharded_text_models`: Flux, SD3, CogVideoX, HunyuanVideo), or
            "auto" ("sharded" where the model supports it, else "replicated").
        cfg_parallel: (pipelines) run the two classifier-free-guidance branches on the two
            halves of the world (:mod:`sf_models.cfg`).
        decode_on: (pipelines) "auto" (the default: "parallel" where the VAE has a parallel
            decode, else "all"), "parallel" (the decode split across the ranks), "all" (every
            rank decodes it all) -- each returns what the pipeline returns in one process on
            every rank -- or "rank0" (other ranks skip the VAE and return latents; Note
            [Decode on every rank] in :mod:`sf_models.pipeline`).
        ulysses_degree: the Ulysses (head-scatter) degree P_u of a named strategy ("usp",
            "tas", "torus"; "ulysses" allows the world only, "ring" 1), or None for the
            strategy's default; the Ring degree is then ``world / P_u`` (with
            ``cfg_parallel``, the half world over it). See
            :meth:`~sf_models.wrapper.SequenceParallelModel.attention_plan` for what the
            layers run.

    Given a diffusers VAE (``AutoencoderKL``), returns a :class:`~sf_models.vae.ParallelVAE`
    whose ``decode`` splits the latent's rows across the ranks, exactly (:mod:`sf_models.vae`).

    Returns:
        The wrapping :class:`SequenceParallelModel` (a pipeline: a ``ParallelPipeline``; a
        VAE: a ``ParallelVAE``).

    Raises:
        ValueError: the model class has no plan (the message lists the supported ones), the
            strategy is unknown, or it cannot split the model's heads on ``ctx``'s topology
            (sf_attn's message, naming the heads and what fits); ``text`` is not one of
            "auto", "replicated", "sharded", or is "sharded" for a model that keeps text
            replicated (the message lists the models that support it); ``ulysses_degree`` is
            not a positive int, is given with "auto", or the strategy cannot lay it out on the
            topology or it exceeds the heads (the message names the degree and lists those
            that fit); for a pipeline, see ``parallelize_pipeline``; ``cfg_parallel`` given
            with a bare transformer.
    """
    if _is_pipeline(model):
        return parallelize_pipeline(  # the pipeline overload takes a Context
            model,
            ctx=ctx,  # type: ignore[arg-type]
            strategy=strategy,
            text=text,
            cfg_parallel=cfg_parallel,
            decode_on=decode_on,
            ulysses_degree=ulysses_degree,
        )
    if _is_vae(model):
        return parallelize_vae(model, ctx=ctx)
    if cfg_parallel:
        raise ValueError(
            "parallelize: cfg_parallel=True needs the pipeline (it splits the pipeline's "
            f"guidance branches), got a {type(model).__name__}: call parallelize(pipe, ...)"
        )
    return parallelize_transformer(
        model, ctx=ctx, strategy=strategy, text=text, ulysses_degree=ulysses_degree
    )


def _is_vae(model: Any) -> bool:
    """A diffusers autoencoder (any ``AutoencoderKL*``; unsupported ones get a clear error)."""
    return type(model).__name__.startswith("AutoencoderKL")


def _is_pipeline(model: Any) -> bool:
    """A diffusers ``DiffusionPipeline``, or a pipeline already wrapped by parallelize()."""
    return any(
        cls.__name__ in ("DiffusionPipeline", "ParallelPipeline") for cls in type(model).__mro__
    )
