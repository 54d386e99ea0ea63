"""``streamfusion generate``: a prompt in, an image or video file out, on every rank there is.

The plain code it is equal to (same directory, prompt and seed; up to rounding)::

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    out[0][0]                                # images[0] or frames[0], float32 in [0, 1]

Launched three ways, one code path (:func:`run_rank` on every rank, rank 0 writes):

- under torchrun (one process per GPU, one or several machines): each process joins
  torchrun's process group (NCCL + gloo with CUDA), takes the GPU of its ``LOCAL_RANK``, and
  the topology comes from ``LOCAL_WORLD_SIZE``/``WORLD_SIZE`` (or ``SF_TOPOLOGY`` /
  ``--topology``)::

      torchrun --nproc-per-node 8 -m sf_models.generate --model-dir DIR --prompt "..." --out a.png

- self-launched CPU ranks (``--world N [--topology MxG]``, no torchrun): a pool of N
  processes emulating M machines of G ranks, one-sided shared-memory transport;
- one process (world 1): the pipeline as it is, no parallel wrapper.

Every option left out keeps the pipeline's own default; the options are checked against
the directory's JSON files before any rank starts or any weight loads (Note [Command-line
errors] in :mod:`sf_models._cli_args`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

import torch

from sf_attn import get_strategy, strategy_names
from sf_comm import Topology, transport_names

from .._cli_args import UsageError, world_and_topology
from ..model_dir import ModelDir, inspect_model_dir

__all__ = ["CHECK_MAX_ABS", "DTYPES", "GenerateOptions", "Launch", "generate", "plan_launch", "run"]

# --check: the largest difference allowed against single-process diffusers, per output value
# in [0, 1]. float32: attention's blockwise merges differ from one SDPA call by ~1e-6 per
# layer, and a wrong split moves values by 1e-2 or more. bf16/fp16 round every layer at
# ~4e-3 (8 mantissa bits); through a whole denoising run that reaches a few 1e-2.
CHECK_MAX_ABS = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_LAYOUTS = ("auto", "replicated", "sharded")
DEVICES = ("cpu", "cuda")
_CPU_TRANSPORTS = ("auto", "shm", "shm+gloo", "gloo")
_IMAGE_SUFFIXES = (".png", ".npy")
_VIDEO_SUFFIXES = (".mp4", ".npy")


@dataclasses.dataclass(kw_only=True, slots=True)
class GenerateOptions:
    """What ``streamfusion generate`` takes; None keeps the pipeline's (or the launch's)
    default. Field names are the command's options (``--model-dir`` is ``model_dir``).

    Raises:
        ValueError: a value out of range (the message names the field and what is allowed).
    """

    model_dir: str
    prompt: str
    out: str | None = None  # .png / .mp4 / .npy; None: nothing written (the API returns it)
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None  # None: a random seed, the same on every rank, reported
    strategy: str = "auto"
    ulysses_degree: int | None = None
    text: str = "auto"
    cfg_parallel: bool = False
    compile: bool = False
    offload: bool = False  # diffusers' model CPU offload (Note [Offload])
    dtype: str | None = None  # None: as from_pretrained loads (float32)
    device: str | None = None  # None: cuda under torchrun when present, else cpu
    transport: str = "auto"
    world: int | None = None
    topology: str | None = None
    json: str | None = None
    check: bool = False  # also run the single-process pipeline and compare (CHECK_MAX_ABS)

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "steps", "world", "ulysses_degree"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"GenerateOptions.{name} must be an integer >= 1, got {value!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"GenerateOptions.seed must be in [0, 2**63), got {self.seed!r}")
        for name, allowed in (
            ("strategy", tuple(strategy_names())),
            ("text", TEXT_LAYOUTS),
            ("dtype", (None, *DTYPES)),
            ("device", (None, *DEVICES)),
            ("transport", tuple(transport_names())),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"GenerateOptions.{name} must be one of {list(allowed)}, got "
                    f"{getattr(self, name)!r}"
                )
        if not self.prompt:
            raise ValueError("GenerateOptions.prompt must be a non-empty string")


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class Launch:
    """How the ranks are started: ``mode`` "torchrun", "pool" (self-launched CPU ranks) or
    "single"; the world, topology, device and transport they use."""

    mode: str
    world: int
    topology: Topology
    device: str
    transport: str


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets its variables)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(
        v in env for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    )


def plan_launch(options: GenerateOptions) -> Launch:
    """How to start the ranks for ``options``, from torchrun's variables or the options.

    Raises:
        UsageError: --world/--topology disagree (with each other or with torchrun's world),
            --device cuda without CUDA, several self-launched GPU ranks, or a transport that
            cannot run on the device.
    """
    torchrun = under_torchrun()
    cuda = torch.cuda.is_available()
    device = options.device or ("cuda" if torchrun and cuda else "cpu")
    if device == "cuda" and not cuda:
        raise UsageError(
            "--device", "cuda, but this torch has no usable CUDA device; use --device cpu"
        )
    topo = Topology.parse(options.topology) if options.topology else None
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if options.world is not None and options.world != world:
            raise UsageError(
                "--world",
                f"{options.world}, but torchrun started {world} processes; leave --world out "
                f"under torchrun",
            )
        if topo is None:
            spec = os.environ.get("SF_TOPOLOGY")
            try:
                topo = Topology.parse(spec) if spec else Topology.detect(world_size=world)
            except ValueError as exc:
                raise UsageError("--topology", str(exc)) from None
        world, topo = world_and_topology(
            world, topo, default_world=world, world_source="torchrun's WORLD_SIZE"
        )
    else:
        world, topo = world_and_topology(options.world, topo, default_world=1)
    mode = "torchrun" if torchrun else ("single" if world == 1 else "pool")
    if mode == "pool" and device == "cuda":
        raise UsageError(
            "--device",
            f"cuda with {world} self-launched ranks; start one process per GPU with torchrun "
            f"(torchrun --nproc-per-node {world} -m sf_models.generate ...), or use --device cpu",
        )
    if device == "cpu" and options.transport not in _CPU_TRANSPORTS:
        raise UsageError(
            "--transport",
            f"{options.transport} needs CUDA; on CPU ranks use one of {list(_CPU_TRANSPORTS)}",
        )
    return Launch(mode=mode, world=world, topology=topo, device=device, transport=options.transport)


def check_options(options: GenerateOptions, model: ModelDir, launch: Launch) -> None:
    """Everything about ``options`` that the JSON files and the launch can decide.

    Raises:
        UsageError: naming the option, what is wrong and what is allowed.
    """
    if options.out is not None:
        suffix = os.path.splitext(options.out)[1].lower()
        allowed = _VIDEO_SUFFIXES if model.video else _IMAGE_SUFFIXES
        if suffix not in allowed:
            kind = "videos" if model.video else "images"
            raise UsageError(
                "--out",
                f"{options.out!r}: {model.family} makes {kind}; write one of {', '.join(allowed)}",
            )
    for option, value in (("--height", options.height), ("--width", options.width)):
        problem = None if value is None else model.check_size(value)
        if problem:
            raise UsageError(option, problem)
    if options.frames is not None and (problem := model.check_frames(options.frames)):
        raise UsageError("--frames", problem)
    if options.true_cfg_scale is not None and model.family not in ("flux", "hunyuanvideo"):
        raise UsageError(
            "--true-cfg-scale",
            f"{model.pipeline} has no true_cfg_scale (Flux and HunyuanVideo do); use --guidance",
        )
    _check_parallel(options, model, launch)


def _check_parallel(options: GenerateOptions, model: ModelDir, launch: Launch) -> None:
    sp_topo = launch.topology
    if options.offload and launch.device != "cuda":
        raise UsageError(
            "--offload",
            "moves each model to the GPU only while it runs; on CPU ranks everything already "
            "lives in host memory: drop --offload, or run on CUDA",
        )
    if options.offload and options.compile:
        raise UsageError(
            "--offload", "not with --compile (the offload hooks move weights between calls)"
        )
    if options.compile:
        for option, given in (
            ("--cfg-parallel", options.cfg_parallel),
            ("--ulysses-degree", options.ulysses_degree is not None),
            ("--text", options.text == "sharded"),
        ):
            if given:
                raise UsageError(
                    option,
                    "not with --compile (the compile backend keeps text replicated, picks its "
                    "own degrees and runs no CFG-parallel split); drop one of them",
                )
    if options.text == "sharded":
        _check_text_sharded(model)
    if options.cfg_parallel:
        from sf_comm.split import part_layout

        from ..cfg import check_cfg_topology

        try:
            check_cfg_topology(launch.topology)
        except ValueError as exc:
            raise UsageError("--cfg-parallel", str(exc)) from None
        sp_topo = part_layout(launch.topology, 2)[1]
        _check_guidance_runs(options, model)
    if options.ulysses_degree is not None and options.strategy == "auto":
        raise UsageError(
            "--ulysses-degree", "--strategy auto picks its own degree; name a strategy to set one"
        )
    if options.strategy != "auto" and launch.world > 1:
        try:
            get_strategy(options.strategy).layout(sp_topo, model.heads, options.ulysses_degree)
        except ValueError as exc:
            option = "--strategy" if options.ulysses_degree is None else "--ulysses-degree"
            raise UsageError(option, f"{exc} ({model.family}: {model.heads} heads)") from None


def _check_text_sharded(model: ModelDir) -> None:
    """--text sharded needs a transformer whose plan splits text (by class, no weights)."""
    import diffusers

    from ..plan import get_plan, sharded_text_models

    cls = getattr(diffusers, model.transformer, None)
    if cls is None:
        return  # not a diffusers class: parallelize names what it does not support
    try:
        shards = get_plan(cls).shards_text
    except ValueError:
        return  # no plan: parallelize's message lists the supported models
    if not shards:
        raise UsageError(
            "--text",
            f"sharded, but {model.transformer} keeps text replicated (its attention needs "
            f"every text key on every rank); use --text replicated or auto. Models that shard "
            f"text: {', '.join(sharded_text_models())}",
        )


def _check_guidance_runs(options: GenerateOptions, model: ModelDir) -> None:
    """--cfg-parallel needs a call that runs classifier-free guidance: the pipeline's CFG
    plan decides, on the call's arguments with the pipeline's defaults filled in."""
    import inspect

    import diffusers

    from ..cfg import get_cfg_plan

    cls = getattr(diffusers, model.pipeline)
    signature = inspect.signature(cls.__call__)
    bound = signature.bind_partial(None, **pipeline_arguments(options, model, seed=0))
    bound.apply_defaults()
    reason = get_cfg_plan(cls).check(bound.arguments)
    if reason is not None:
        hint = (
            "give --negative-prompt and --true-cfg-scale > 1"
            if "true_cfg_scale" in signature.parameters
            else "give --guidance > 1"
        )
        raise UsageError("--cfg-parallel", f"this call runs no classifier-free guidance: {hint}")


def pipeline_arguments(options: GenerateOptions, model: ModelDir, *, seed: int) -> dict[str, Any]:
    """The pipeline call's arguments: only the options given, plus the seeded generator."""
    given = {
        "prompt": options.prompt,
        "negative_prompt": options.negative_prompt,
        "height": options.height,
        "width": options.width,
        "num_frames": options.frames,
        "num_inference_steps": options.steps,
        "guidance_scale": options.guidance,
        "true_cfg_scale": options.true_cfg_scale,
    }
    args: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    args["generator"] = torch.Generator("cpu").manual_seed(seed)
    return args


def run(options: GenerateOptions) -> dict[str, Any] | None:
    """Check ``options``, start the ranks, generate, write ``options.out`` on rank 0.

    Returns:
        The summary (see :func:`sf_models._rank.run_rank`) in the launching process
        (rank 0 under torchrun), with the output as ``summary["output"]`` (float32 numpy);
        None on the other torchrun ranks.

    Raises:
        UsageError: a bad option (before any rank starts or weight loads).
        ValueError: a bad model directory (likewise), or a library check on a rank.
    """
    try:
        model = inspect_model_dir(options.model_dir)
    except ValueError as exc:
        raise UsageError("--model-dir", str(exc)) from None
    launch = plan_launch(options)
    check_options(options, model, launch)
    from . import _rank

    if launch.mode == "pool":
        from sf_comm.launch import RankPool

        timeout = float(os.environ.get("SF_TIMEOUT", 300))
        env = {"SF_TOPOLOGY": str(launch.topology), "SF_TIMEOUT": str(timeout)}
        with RankPool(launch.world, env=env) as pool:
            results = pool.run(
                _rank.run_rank,
                options,
                model,
                launch,
                topology=str(launch.topology),
                transport=launch.transport,
                timeout=float(os.environ.get("SF_GENERATE_TIMEOUT", 3600)),
            )
        summary = results[0]
    else:
        summary = _rank.run_in_process(options, model, launch)
    if summary is not None and options.check:
        summary["check"] = check_against_one_process(options, model, launch, summary)
    return summary


def check_against_one_process(
    options: GenerateOptions, model: ModelDir, launch: Launch, summary: dict[str, Any]
) -> dict[str, Any]:
    """Run the plain single-process pipeline (this process, ``launch.device``) with the
    same arguments and seed; the largest difference from ``summary["output"]``."""
    import numpy as np

    from ._rank import load_pipeline, timing

    pipe = load_pipeline(options, launch.device)
    pipe.set_progress_bar_config(disable=True)
    args = pipeline_arguments(options, model, seed=summary["seed"])
    args.update(output_type="np", return_dict=False)
    with timing(pipe, args, torch.device(launch.device)) as phases:
        out = pipe(**args)
    reference = np.asarray(out[0][0], dtype=np.float32)
    max_abs = float(np.abs(summary["output"] - reference).max())
    tolerance = CHECK_MAX_ABS[options.dtype or "fp32"]
    steps = phases.step_times()
    return {
        "max_abs": max_abs,
        "tolerance": tolerance,
        "ok": max_abs <= tolerance,
        "single_process_step_s_median": statistics.median(steps) if steps else None,
    }


def generate(model_dir: str, prompt: str, **options: Any) -> dict[str, Any] | None:
    """A prompt in, an image or video out: :func:`run` with :class:`GenerateOptions`.

    ``sf_models.generate("DIR", "a cat", out="cat.png", seed=0, world=4, topology="2x2")``
    does what ``streamfusion generate --model-dir DIR --prompt "a cat" --out cat.png --seed 0
    --world 4 --topology 2x2`` does, and returns its summary (with the output array).

    Raises:
        ValueError: a bad option or model directory (before any rank starts).
    """
    return run(GenerateOptions(model_dir=model_dir, prompt=prompt, **options))
