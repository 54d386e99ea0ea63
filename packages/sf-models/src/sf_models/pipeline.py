"""``parallelize(pipe)``: a stock diffusers pipeline whose transformer runs sequence-parallel.

Plain code, and what every rank runs instead::

    image = pipe(prompt, generator=torch.Generator().manual_seed(s), ...)   # one process

    sp = sf_models.parallelize(pipe, ctx=ctx)                  # every rank, same weights
    out = sp(prompt, generator=torch.Generator().manual_seed(s), ...)   # same arguments
    # every rank: ``image`` (up to floating-point rounding), so ``out.images[0].save(...)``
    sp.close()                                # ``pipe`` is the single-process pipeline again
    ctx.close()                               # the context is the caller's to close

Every rank returns what the pipeline returns in one process. By default (``decode_on="auto"``)
the VAE decode is split across the ranks where the VAE supports it (``"parallel"``,
:mod:`sf_models.vae`, exact), else every rank runs the whole decode (``"all"``);
``decode_on="rank0"`` skips the decode on the other ranks, which return the final latents
(Note [Decode on every rank]).

What :func:`parallelize_pipeline` changes, in place, on ``pipe`` (:meth:`ParallelPipeline.close`
undoes all of it):

- ``pipe.transformer`` (and ``pipe.transformer_2``, Wan 2.2) is replaced by its
  sequence-parallel wrapper (:func:`sf_models.parallelize` on the transformer, or on this
  rank's half of the world with a :class:`~sf_models.cfg.CFGParallelModel` around it for
  ``cfg_parallel``). The wrapper takes the pipeline's full inputs and returns full outputs,
  identical on every rank, so the pipeline's own loop, scheduler and guidance run unchanged.
  The pipeline's config keeps naming the original transformer class; save the pipeline
  before parallelizing it, not after.
- The progress bar is disabled on every rank but 0.

The returned :class:`ParallelPipeline` is a thin wrapper: calling it calls ``pipe`` and adds
what needs a view of the whole call (Note [Same inputs on every rank], ``decode_on="rank0"``,
pairing guidance calls for ``cfg_parallel``). Calling ``pipe`` directly still runs the
transformer in parallel, but decodes on every rank and skips the input check; with paired
``cfg_parallel`` (Flux, HunyuanVideo, Wan) it raises. Once the context is closed, calls of
either raise until ``sp.close()`` gives the single-process pipeline back.

Every rank must make the same calls with the same arguments: the transformer's
communication is collective.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Literal

import torch

import sf_comm

from ._fingerprint import fingerprint, same_fingerprint
from .cfg import CFGParallelModel, CFGPlan, check_cfg_topology, get_cfg_plan
from .plan import TextLayout, get_plan, resolve_text
from .vae import ParallelVAE, parallelize_vae, supported_vaes
from .wrapper import SequenceParallelModel, parallelize_transformer

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["DECODE_ON", "DecodeOn", "ParallelPipeline", "parallelize_pipeline"]

DecodeOn = Literal["auto", "parallel", "all", "rank0"]
DECODE_ON = ("auto", "parallel", "all", "rank0")
TRANSFORMERS = ("transformer", "transformer_2")  # pipeline components run under SP


class _SameInputsCheck:
    """Forward pre-hook on the transformer wrapper: Note [Same inputs on every rank]."""

    def __init__(self, ctx: sf_comm.Context) -> None:
        self.ctx = ctx
        self.armed = False  # set by ParallelPipeline.__call__, cleared by the first call

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not self.armed:
            return
        self.armed = False
        named = [(f"argument {i}", v) for i, v in enumerate(args)] + list(kwargs.items())
        tensors = [(name, t) for name, value in named for t in _tensors(value)]
        if not tensors:
            return
        mine = torch.stack([fingerprint(t) for _, t in tensors])  # [inputs, 4] float64
        every = sf_comm.all_gather(self.ctx, self.ctx.group("world"), mine).wait()
        differ: dict[str, list[int]] = {}
        for rank, theirs in enumerate(every):
            for (name, _), a, b in zip(tensors, every[0], theirs, strict=True):
                if not same_fingerprint(a, b):
                    differ.setdefault(name, []).append(rank)
        if differ:
            found = "; ".join(
                f"{name!r} differs from rank 0's on ranks {r}" for name, r in differ.items()
            )
            raise ValueError(
                f"parallelize(pipe): the ranks gave the transformer different inputs on its first "
                f"call ({found}). Every rank must draw the same noise: pass the same arguments and "
                f"a generator seeded the same on every rank, e.g. "
                f"generator=torch.Generator(device).manual_seed(seed)"
            )


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


class ParallelPipeline:
    """A diffusers pipeline whose transformer runs sequence-parallel across ``ctx``'s ranks.

    Built by :func:`parallelize_pipeline`. Call it like the pipeline, with the same arguments
    on every rank. Attribute reads and writes other than its own go to the pipeline
    (``sp.vae``, ``sp.scheduler = ...``). :meth:`close` (or leaving a ``with`` block) gives
    the single-process pipeline back.

    Attributes:
        pipe: the wrapped pipeline (modified in place, see the module docstring).
        ctx: the job's context.
        decode_on: "parallel", "all" or "rank0" (resolved from "auto").
        cfg_plan: the pipeline's CFG plan with ``cfg_parallel``, else None.
    """

    __slots__ = (
        "_cfg_models",
        "_check",
        "_closed",
        "_hooks",
        "_originals",
        "_progress_disable",
        "_signature",
        "_sp_models",
        "cfg_plan",
        "ctx",
        "decode_on",
        "pipe",
    )

    def __init__(
        self,
        pipe: Any,
        *,
        ctx: sf_comm.Context,
        decode_on: DecodeOn,
        cfg_plan: CFGPlan | None,
        check: _SameInputsCheck,
        cfg_models: list[CFGParallelModel],
        originals: dict[str, torch.nn.Module],
        sp_models: list[SequenceParallelModel | ParallelVAE],
        hooks: list[RemovableHandle],
        progress_disable: tuple[bool, Any] | None,
    ) -> None:
        """See :func:`parallelize_pipeline`; the arguments after ``check`` are what
        :meth:`close` restores: ``originals`` the replaced components by name, ``sp_models``
        the transformer wrappers, ``hooks`` the hooks added to the pipeline's wrappers,
        ``progress_disable`` (whether the progress bar config had "disable", its value) when
        it was changed."""
        for name, value in (
            ("pipe", pipe),
            ("ctx", ctx),
            ("decode_on", decode_on),
            ("cfg_plan", cfg_plan),
            ("_check", check),
            ("_cfg_models", cfg_models),
            ("_originals", originals),
            ("_sp_models", sp_models),
            ("_hooks", hooks),
            ("_progress_disable", progress_disable),
            ("_closed", False),
            ("_signature", inspect.signature(pipe.__call__)),
        ):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name in ParallelPipeline.__slots__:  # not set yet: do not recurse into self.pipe
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ParallelPipeline.__slots__:
            raise AttributeError(f"ParallelPipeline.{name} is read-only")
        setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return (
            f"ParallelPipeline({type(self.pipe).__name__}, {self.ctx!r}, decode_on="
            f"{self.decode_on!r}, cfg_parallel={self.cfg_plan is not None}"
            f"{', closed' if self._closed else ''})"
        )

    def __enter__(self) -> ParallelPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` gave the pipeline back."""
        return bool(self._closed)

    def close(self) -> None:
        """Give the single-process pipeline back: undo what :func:`parallelize_pipeline` did.

        ``pipe.transformer`` (and ``pipe.transformer_2``) is the original module object again,
        with its own attention processors and without the hooks parallelize installed, and
        the progress bar setting is restored, so ``pipe(...)`` runs in one process and gives
        the single-process result. Calling this wrapper afterwards raises; parallelize the
        pipeline again to run it in parallel.

        Not collective (each rank may close on its own) and calling it again does nothing. It
        does not close ``ctx``, which the caller owns: close it afterwards with
        ``ctx.close()`` (or close the context first: this still works, while calls of a
        pipeline still parallelized over a closed context raise).
        """
        if self._closed:
            return
        object.__setattr__(self, "_closed", True)
        for name, original in self._originals.items():
            object.__setattr__(self.pipe, name, original)  # as in parallelize_pipeline
        for model in self._sp_models:
            model.close()
        for hook in self._hooks:
            hook.remove()
        if self._progress_disable is not None:
            had, value = self._progress_disable
            config = dict(getattr(self.pipe, "_progress_bar_config", {}))
            if had:
                config["disable"] = value
            else:
                config.pop("disable", None)
            self.pipe.set_progress_bar_config(**config)

    def _free_model_hooks(self) -> None:
        """The pipeline's ``maybe_free_model_hooks``, run with its original models in place
        (Note [Offload hooks])."""
        pipe = self.pipe
        wrappers = {name: getattr(pipe, name) for name in self._originals}
        for name, original in self._originals.items():
            object.__setattr__(pipe, name, original)
        try:
            type(pipe).maybe_free_model_hooks(pipe)
        finally:
            for name, wrapper in wrappers.items():
                object.__setattr__(pipe, name, wrapper)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline on every rank.

        Returns:
            Every rank, with ``decode_on="all"`` (the default), or rank 0 with "rank0": what
            the pipeline returns for these arguments in one process. Other ranks with
            ``decode_on="rank0"``: what the pipeline returns with ``output_type="latent"``,
            i.e. its usual output object (or tuple, with ``return_dict=False``) holding the
            final latents in the pipeline's latent layout instead of decoded images/frames
            (Flux: packed ``[B, tokens, 4 * C]``; SD3 ``[B, C, H, W]``; CogVideoX
            ``[B, F, C, H, W]``; HunyuanVideo and Wan ``[B, C, F, H, W]``), without running
            the VAE. Those latents are bit-identical to rank 0's.

        Raises:
            ValueError: with ``cfg_parallel``, the call runs no classifier-free guidance (the
                message says which argument); the ranks' transformer inputs differ on the
                first call (e.g. generators seeded differently).
            RuntimeError: this wrapper was closed, or ``ctx`` was closed while the pipeline is
                still parallelized (the message says to call :meth:`close`).
        """
        if self._closed:
            raise RuntimeError(
                f"parallelize(pipe): this ParallelPipeline is closed (close() gave the "
                f"{type(self.pipe).__name__} back); call the pipeline itself for a "
                f"single-process run, or parallelize it again"
            )
        if self.ctx.transport.closed:
            raise RuntimeError(
                f"parallelize(pipe): the context is closed while the {type(self.pipe).__name__} "
                f"is still parallelized; call sp.close() to get the single-process pipeline back "
                f"(then parallelize it again with an open context to run it in parallel)"
            )
        bound = self._signature.bind(*args, **kwargs)
        if self.cfg_plan is not None:
            full = self._signature.bind(*args, **kwargs)
            full.apply_defaults()
            reason = self.cfg_plan.check(full.arguments)
            if reason is not None:
                raise ValueError(
                    f"cfg_parallel=True, but this {type(self.pipe).__name__} call runs no "
                    f"classifier-free guidance ({reason}). Enable guidance, or parallelize the "
                    f"pipeline with cfg_parallel=False to use every rank for sequence parallelism"
                )
        if self.decode_on == "rank0" and self.ctx.rank != 0:
            bound.arguments["output_type"] = "latent"
        self._check.armed = True
        for model in self._cfg_models:
            model.begin_call()
        # Note [Offload hooks]: the pipeline's own hook reset sees the original models
        object.__setattr__(self.pipe, "maybe_free_model_hooks", self._free_model_hooks)
        try:
            out = self.pipe(*bound.args, **bound.kwargs)
        except BaseException:
            for model in self._cfg_models:
                model.end_call(check=False)
            raise
        finally:
            self._check.armed = False
            object.__delattr__(self.pipe, "maybe_free_model_hooks")
        for model in self._cfg_models:
            model.end_call()
        return out


def parallelize_pipeline(
    pipe: Any,
    *,
    ctx: sf_comm.Context,
    strategy: str = "auto",
    text: TextLayout = "auto",
    cfg_parallel: bool = False,
    decode_on: DecodeOn = "auto",
    ulysses_degree: int | None = None,
) -> ParallelPipeline:
    """Run a stock diffusers pipeline's transformer sequence-parallel across ``ctx``'s ranks.

    ``sf_models.parallelize(pipe, ...)`` calls this. Every rank must build the same pipeline
    (same weights) and call this with the same arguments; process groups are created here.

    Args:
        pipe: a diffusers pipeline whose ``transformer`` (and ``transformer_2``, if set) has a
            sequence-parallel plan: FluxPipeline, StableDiffusion3Pipeline, CogVideoXPipeline,
            HunyuanVideoPipeline, WanPipeline and others built on those transformers. A
            closed :class:`ParallelPipeline` stands for its pipeline.
        ctx: the job's communication context.
        strategy: the ``sf_attn.parallel_attention`` strategy ("auto", "ulysses", "ring",
            "usp", "tas").
        text: the text layout of every transformer ("auto", "replicated", "sharded"; see
            :func:`sf_models.parallelize`).
        cfg_parallel: run the two classifier-free-guidance branches on the two halves of the
            world, each half doing sequence parallelism (:mod:`sf_models.cfg`).
        decode_on: every rank returns what the pipeline returns in one process with
            "parallel" (the VAE decode split across the ranks, :mod:`sf_models.vae`) and
            "all" (every rank decodes it all); "auto" (the default) is "parallel" where the
            VAE supports it and the world is > 1, else "all"; "rank0": only rank 0 decodes,
            other ranks skip the VAE and return latents (see :meth:`ParallelPipeline.__call__`
            and Note [Decode on every rank]).
        ulysses_degree: the Ulysses (head-scatter) degree of a named strategy, None for the
            strategy's own; the Ring degree is the sequence-parallel world over it (with
            ``cfg_parallel``, half the world).

    Returns:
        A :class:`ParallelPipeline` wrapping ``pipe``, which is modified in place (its
        transformer replaced by the parallel one, progress bar off on ranks other than 0)
        until :meth:`ParallelPipeline.close`.

    Raises:
        ValueError: a bad ``decode_on``, or "parallel" with a VAE that has no parallel
            decode; no transformer, or one without a plan (the message
            lists the supported models); a bad ``text``, or "sharded" for a transformer that
            keeps text replicated; a ``ulysses_degree`` that is not a positive int, is given
            with "auto", or that the strategy cannot lay out on the (half) topology or that
            exceeds the heads (the message lists the degrees that fit); the pipeline is
            already parallelized; with ``cfg_parallel``: the pipeline has no CFG plan (lists
            the supported ones), or the topology does not split into two equal halves, or the
            strategy cannot split the model's heads on a half (the messages say what would
            work).
    """
    if isinstance(pipe, ParallelPipeline):
        pipe = pipe.pipe  # still parallelized: refused below as "already parallelized"
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be one of {DECODE_ON}, got {decode_on!r}")
    names = [n for n in TRANSFORMERS if getattr(pipe, n, None) is not None]
    if not names:
        raise ValueError(
            f"parallelize: {type(pipe).__name__} has no transformer component; pipelines are "
            f"parallelized through their DiT (components {list(TRANSFORMERS)})"
        )
    for name in names:
        if isinstance(getattr(pipe, name), SequenceParallelModel | CFGParallelModel):
            raise ValueError(
                f"parallelize: {type(pipe).__name__}.{name} is already parallelized; use the "
                f"ParallelPipeline the first parallelize(pipe, ...) returned (or close() it "
                f"first)"
            )
        transformer = getattr(pipe, name)
        resolve_text(transformer, get_plan(transformer), text)  # fail before any collective
    if decode_on == "rank0" and "output_type" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(
            f"decode_on='rank0' needs the pipeline's output_type argument to skip decoding on "
            f"other ranks; {type(pipe).__name__} has none: use decode_on='all'"
        )
    cfg_plan = get_cfg_plan(pipe) if cfg_parallel else None
    if cfg_plan is not None:
        check_cfg_topology(ctx.topology)

    vae_name = type(getattr(pipe, "vae", None)).__name__
    if decode_on == "auto":  # Note [Decode on every rank]
        decode_on = "parallel" if vae_name in supported_vaes() and ctx.world_size > 1 else "all"
    if decode_on == "parallel" and vae_name not in supported_vaes():
        raise ValueError(
            f"decode_on='parallel': no parallel decode for {vae_name} yet (supported VAEs: "
            f"{supported_vaes()}); use decode_on='all' or 'rank0'"
        )

    check = _SameInputsCheck(ctx)
    cfg_models: list[CFGParallelModel] = []
    sp_models: list[SequenceParallelModel | ParallelVAE] = []
    originals: dict[str, torch.nn.Module] = {}
    hooks: list[RemovableHandle] = []
    if cfg_plan is not None:
        sub, cross = ctx.split(2)  # collective: creates the part and cross process groups
    try:
        for name in names:
            transformer = getattr(pipe, name)
            wrapper: torch.nn.Module
            try:
                model = parallelize_transformer(
                    transformer,
                    ctx=ctx if cfg_plan is None else sub,
                    strategy=strategy,
                    text=text,
                    ulysses_degree=ulysses_degree,
                )
            except ValueError as exc:
                if cfg_plan is None:
                    raise
                raise ValueError(
                    f"cfg_parallel=True: each half of topology {ctx.topology.shape[0]}x"
                    f"{ctx.topology.shape[1]} runs sequence parallelism on "
                    f"{sub.topology.shape[0]}x{sub.topology.shape[1]}: {exc}"
                ) from exc
            sp_models.append(model)
            wrapper = model
            if cfg_plan is not None:
                wrapper = CFGParallelModel(
                    model,
                    cfg_plan,
                    ctx=ctx,
                    cross=cross,
                    part=sub.index,
                    forward=transformer.forward,
                )
                cfg_models.append(wrapper)
            hooks.append(wrapper.register_forward_pre_hook(check, with_kwargs=True))
            # Plain attribute set: DiffusionPipeline.__setattr__ would re-register the component
            # under the wrapper's class in the pipeline config.
            object.__setattr__(pipe, name, wrapper)
            originals[name] = transformer
        if decode_on == "parallel":
            parallel_vae = parallelize_vae(pipe.vae, ctx=ctx)
            sp_models.append(parallel_vae)
            object.__setattr__(pipe, "vae", parallel_vae)  # as for the transformers
            originals["vae"] = parallel_vae.vae
    except BaseException:  # e.g. transformer_2 refused: give transformer back too
        for name, original in originals.items():
            object.__setattr__(pipe, name, original)
        for made in sp_models:
            made.close()
        raise

    progress_disable = None
    if ctx.rank != 0:
        config = dict(getattr(pipe, "_progress_bar_config", {}))
        progress_disable = ("disable" in config, config.get("disable"))
        pipe.set_progress_bar_config(**{**config, "disable": True})
    return ParallelPipeline(
        pipe,
        ctx=ctx,
        decode_on=decode_on,
        cfg_plan=cfg_plan,
        check=check,
        cfg_models=cfg_models,
        originals=originals,
        sp_models=sp_models,
        hooks=hooks,
        progress_disable=progress_disable,
    )


# Note [Same inputs on every rank]
# Each rank runs the whole pipeline: text encoding, noise, scheduler. The parallel transformer
# assumes every rank passes it the same full inputs (it shards them by rank), and returns the
# same output to every rank, so the ranks stay in lockstep exactly when they start from the
# same noise: a generator seeded the same on every rank (or the same global seed). The usual
# bug is rank-dependent noise (a seed derived from the rank, or an unseeded global RNG after
# rank-dependent setup): each rank would then denoise a different image and the result would
# be a mix. On the first transformer call of each pipeline call, every rank all-gathers a
# fingerprint of each tensor input (4 float64 numbers per input; one tiny exchange per
# pipeline call) and all ranks raise the same ValueError if any differ. Stochastic scheduler
# steps later in the call (CogVideoX's DPM) draw from the same generator, so they stay equal.


# Note [Decode on every rank]
# parallelize(pipe) defaults to decode_on="auto": "parallel" where the pipeline's VAE has a
# parallel decode (sf_models.vae: the latent's rows split across the ranks, exact, the image
# gathered on every rank), else "all". With "all" every rank runs the whole pipeline, VAE decode
# included, and returns exactly what the pipeline returns in one process (the same images on
# every rank, up to floating-point rounding against one process; bit-identical across ranks).
# Code written for one process, ``pipe(...).images[0].save(...)``, then runs unchanged under a
# launcher, which is what users of a diffusers pipeline expect; with "rank0" as the default,
# every other rank got a latent tensor and failed on ``.images[0].save``. The decode is not
# split: each rank repeats it, concurrently, so it adds no wall time over one process, only
# one decode's compute and memory on every rank. decode_on="rank0" opts out of that: the
# other ranks skip the VAE (output_type="latent") and return the final latents, for jobs whose
# other ranks discard the output (long videos, where the decode's memory is the concern).


# Note [Offload hooks]
# With diffusers' model CPU offload (``pipe.enable_model_cpu_offload()``, ``generate
# --offload``) accelerate hooks sit on the pipeline's models, and the wrappers reach them:
# they call the models' own forward and decode. At the end of every call the pipeline resets
# the hooks (``maybe_free_model_hooks``: remove them from every component, add them again).
# Seen through the wrappers, which pass attribute reads to the model, a component would look
# hooked but could not be unhooked, and the new hook would land on the wrapper, where the
# VAE's decode never calls it. So during a call the pipeline's reset runs with the original
# models in place, and the wrappers go back afterwards.
