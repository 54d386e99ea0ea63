"""What every rank of ``streamfusion generate`` runs (:func:`run_rank`), and what it measures.

Each rank loads the whole pipeline, parallelizes it (:func:`sf_models.parallelize`, or the
``streamfusion`` compile backend with ``--compile``), calls it with the same arguments and
the same seeded generator (Note [Same inputs on every rank] in :mod:`sf_models.pipeline`),
and rank 0 decodes and writes the output. Around the call it times the phases the pipeline
goes through without changing what it computes: ``encode_prompt`` (text encoding), the
first transformer call to the last step's ``callback_on_step_end`` (denoising, and each
step), ``vae.decode`` (decode); and it counts the bytes this rank's transport sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import resource
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

import sf_attn
import sf_comm

from ..model_dir import ModelDir
from ..pipeline import DecodeOn
from ..plan import TextLayout
from . import DTYPES, GenerateOptions, Launch, pipeline_arguments

__all__ = ["load_pipeline", "run_in_process", "run_rank", "timing"]


@dataclasses.dataclass(slots=True)
class _Phases:
    """Wall-clock marks of one pipeline call (seconds from ``time.perf_counter``)."""

    sync: Callable[[], None]
    encode_s: float = 0.0
    decode_s: float = 0.0
    first_call: float | None = None
    step_ends: list[float] = dataclasses.field(default_factory=list)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def timed(self, fn: Callable[..., Any], field: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + self.now() - start)

        return wrapper

    def denoise_s(self) -> float:
        """First transformer call to the last step's end."""
        if self.first_call is None or not self.step_ends:
            return 0.0
        return self.step_ends[-1] - self.first_call

    def step_times(self) -> list[float]:
        if self.first_call is None:
            return []
        marks = [self.first_call, *self.step_ends]
        return [b - a for a, b in itertools.pairwise(marks)]


@contextlib.contextmanager
def timing(pipe: Any, call_args: dict[str, Any], device: torch.device) -> Iterator[_Phases]:
    """Time ``pipe``'s phases during the block; ``call_args`` gains the step callback."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    phases = _Phases(sync=sync)

    def first_call(module: Any, args: Any) -> None:
        if phases.first_call is None:
            phases.first_call = phases.now()

    def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        phases.step_ends.append(phases.now())
        return {}

    call_args["callback_on_step_end"] = step_end
    handle = pipe.transformer.register_forward_pre_hook(first_call)
    pipe.encode_prompt = phases.timed(pipe.encode_prompt, "encode_s")
    pipe.vae.decode = phases.timed(pipe.vae.decode, "decode_s")
    try:
        yield phases
    finally:
        handle.remove()
        del pipe.encode_prompt  # the instance attributes shadowed the methods
        del pipe.vae.decode


def load_pipeline(options: GenerateOptions, device: torch.device | str) -> Any:
    """``DiffusionPipeline.from_pretrained(options.model_dir)`` on ``device``, quietly; with
    ``options.offload``, each model is on ``device`` only while it runs (Note [Offload])."""
    from .._cli_args import drop_image_processor_note

    drop_image_processor_note()
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if (
        dist.is_initialized() and dist.get_rank() != 0
    ):  # one copy of the libraries' warnings, from rank 0
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    # The loading bars (one per component and shard) would bury the denoising bar.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = DTYPES[options.dtype] if options.dtype else None
    pipe = DiffusionPipeline.from_pretrained(options.model_dir, torch_dtype=dtype)
    if options.offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


# Note [Offload]
# ``--offload`` is diffusers' model CPU offload: every model of the pipeline stays in host
# memory and moves to the GPU when its forward (or the VAE's decode) starts; starting the
# next model in the pipeline's order (text encoders, transformer, VAE) moves the previous one
# back. So the text encoders (T5-XXL: ~9 GiB in bf16, a Llama in HunyuanVideo) leave the GPU
# once the prompt is encoded, and the transformer before the decode. It works under the
# parallel wrappers because they call the models' own forward and decode, where the hooks
# sit; it costs a host-to-device copy of each model per call, so it is for a GPU that cannot
# hold every model at once, and the peak memory per rank in the summary shows what it saved.


def _parallel(pipe: Any, ctx: sf_comm.Context, options: GenerateOptions) -> Any:
    """The pipeline as the ranks run it: parallelized, compiled, or (world 1) itself."""
    if options.compile:
        backend_options: Any = {"ctx": ctx, "strategy": options.strategy}
        compiled = torch.compile(
            pipe.transformer, backend="streamfusion", dynamic=False, options=backend_options
        )
        # Plain attribute set: DiffusionPipeline.__setattr__ would re-register the component.
        object.__setattr__(pipe, "transformer", compiled)
        if ctx.rank != 0:
            pipe.set_progress_bar_config(disable=True)
        return pipe
    if ctx.world_size == 1:
        return pipe
    from ..parallelize import parallelize

    return parallelize(
        pipe,
        ctx=ctx,
        strategy=options.strategy,
        ulysses_degree=options.ulysses_degree,
        text=cast("TextLayout", options.text),
        cfg_parallel=options.cfg_parallel,
        decode_on=_decode_on(pipe),
    )


def _decode_on(pipe: Any) -> DecodeOn:
    """Split the decode across the ranks where the VAE can be (the five families' VAEs);
    else only rank 0 decodes (it alone writes the output)."""
    from ..vae import supported_vaes

    return "parallel" if type(pipe.vae).__name__ in supported_vaes() else "rank0"


def _shared_seed(ctx: sf_comm.Context, seed: int | None) -> int:
    """``seed``, or rank 0's random draw, the same on every rank."""
    if seed is not None:
        return seed
    mine = torch.tensor([secrets.randbelow(2**31)], dtype=torch.int64, device=ctx.device)
    if ctx.world_size == 1:
        return int(mine.item())
    every = sf_comm.all_gather(ctx, ctx.group("world"), mine).wait()
    return int(every[0].item())


def _per_rank(ctx: sf_comm.Context, values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (the same count on each), in rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world_size == 1:
        return [mine.tolist()]
    return [row.tolist() for row in sf_comm.all_gather(ctx, ctx.group("world"), mine).wait()]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def _resolution_summary(used: list[sf_attn.Resolution], ctx: Any, options: Any) -> dict[str, Any]:
    if ctx.world_size == 1:
        return {"name": "none", "why": "one rank: the pipeline runs as it is"}
    if not used:
        return {"name": options.strategy, "why": "no attention layer ran"}
    first = used[0]
    summary: dict[str, Any] = {
        "name": first.name,
        "ulysses_degree": first.ulysses_degree,
        "ring_degree": first.ring_degree,
        "layer_shapes": len(used),
    }
    if first.plan is not None:
        plan = first.plan
        summary["why"] = (
            f"auto: the planner's best of {len(plan.candidates)} candidates on topology "
            f"{ctx.topology}, predicted {plan.predicted_s * 1e3:.3g} ms per attention layer vs "
            f"{plan.baseline_s * 1e3:.3g} ms for {sf_attn.baseline_strategy()} at its default "
            f"degrees ({plan.baseline_s / plan.predicted_s:.2f}x)"
        )
    elif options.ulysses_degree is not None:
        summary["why"] = f"--strategy {options.strategy} --ulysses-degree {options.ulysses_degree}"
    else:
        summary["why"] = f"--strategy {options.strategy}, its default degrees"
    if len({(r.name, r.ulysses_degree) for r in used}) > 1:
        summary["others"] = [(r.name, r.ulysses_degree, r.ring_degree) for r in used[1:]]
    return summary


def _text_layout(module: Any) -> str | None:
    for _ in range(4):  # the SP wrapper, possibly inside the CFG-parallel one
        state = getattr(module, "state", None)
        if state is not None and hasattr(state, "text"):
            return str(state.text)
        module = getattr(module, "module", None)
        if module is None:
            return None
    return None


def _write(path: str, array: np.ndarray, model: ModelDir) -> None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".png":
        from diffusers.image_processor import VaeImageProcessor

        VaeImageProcessor.numpy_to_pil(array[None])[0].save(path)
    else:
        from diffusers.utils import export_to_video

        # macro_block_size 2: keep the size as made (even sizes suit yuv420p)
        export_to_video(list(array), path, fps=model.fps, macro_block_size=2)


@torch.no_grad()
def run_rank(
    ctx: sf_comm.Context, options: GenerateOptions, model: ModelDir, launch: Launch
) -> dict[str, Any] | None:
    """Generate on this rank; rank 0 writes ``options.out`` and returns the summary.

    Returns:
        Rank 0: ``{"output": float32 array, ...}`` with the strategy and degrees chosen and
        why, per-step latencies, phase wall times, every rank's peak memory and bytes sent
        per step, the seed and the output path. Other ranks: None.
    """
    device = ctx.device
    start = time.perf_counter()
    pipe = load_pipeline(options, device)
    load_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sp = _parallel(pipe, ctx, options)
    seed = _shared_seed(ctx, options.seed)
    args = pipeline_arguments(options, model, seed=seed)
    args["output_type"] = "np"
    args["return_dict"] = False
    before = ctx.transport.stats.snapshot()
    with sf_attn.recording_resolutions() as used, timing(pipe, args, device) as phases:
        call_start = phases.now()
        out = sp(**args)
        total_s = phases.now() - call_start
    sent = ctx.transport.stats - before
    steps = max(len(phases.step_ends), 1)
    bytes_sent, peaks = zip(
        *_per_rank(ctx, [sum(sent.bytes_sent.values()) / steps, _peak_memory(device)])
    )
    step_times = phases.step_times()
    if ctx.rank != 0:
        return None
    array = np.asarray(out[0][0], dtype=np.float32)
    if options.out:
        _write(options.out, array, model)
    return {
        "output": array,
        "out": options.out,
        "model_dir": options.model_dir,
        "family": model.family,
        "pipeline": model.pipeline,
        "prompt": options.prompt,
        "seed": seed,
        "launch": launch.mode,
        "world": ctx.world_size,
        "topology": str(ctx.topology),
        "device": str(device),
        "transport": ctx.transport.name,
        "dtype": str(next(iter(pipe.transformer.parameters())).dtype).removeprefix("torch."),
        "strategy": _resolution_summary(used, ctx, options),
        "text_layout": _text_layout(pipe.transformer),
        "cfg_parallel": options.cfg_parallel,
        "compiled": options.compile,
        "decode_on": getattr(sp, "decode_on", "all"),
        "steps": len(step_times),
        "step_s": step_times,
        # compiled: the first step compiles; its time says nothing about the steps after it
        "step_s_median": _median(step_times[1:] if options.compile else step_times),
        "phases_s": {
            "load": load_s,
            "text_encoding": phases.encode_s,
            "denoising": phases.denoise_s(),
            "decode": phases.decode_s,
            "call": total_s,
        },
        "peak_memory_bytes": list(peaks),
        "peak_memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "bytes_sent_per_step": list(bytes_sent),
        "output_shape": list(array.shape),
    }


def run_in_process(
    options: GenerateOptions, model: ModelDir, launch: Launch
) -> dict[str, Any] | None:
    """:func:`run_rank` in this process: torchrun's rank, or the only one (world 1)."""
    created = not dist.is_initialized()  # sf_comm.init makes the process group if none is
    timeout = float(os.environ.get("SF_TIMEOUT", 300))
    ctx = sf_comm.init(
        topology=launch.topology,
        transport=launch.transport,
        device=launch.device,
        timeout=timeout,
    )
    try:
        return run_rank(ctx, options, model, launch)
    finally:
        ctx.close()
        if created and dist.is_initialized():
            dist.destroy_process_group()
