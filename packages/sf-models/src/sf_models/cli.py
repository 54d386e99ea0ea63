"""The ``streamfusion`` command.

streamfusion generate            a prompt in, an image or video out (the main job)
streamfusion make-tiny           a complete tiny pipeline directory per model family
streamfusion run                 the transformer alone on every strategy, checked against one process
streamfusion trace               a Perfetto trace and timeline of one layer
streamfusion simulate            per-step latency of every strategy against xDiT's USP, no devices
streamfusion emulate             any torch.distributed program on emulated machines (root)
streamfusion bench comm          shm (one-sided) vs gloo collectives, medians and ratios
streamfusion bench attention     every strategy on every transport, medians and ratios
streamfusion bench vae           the parallel VAE decode on 1, 2, 4 ranks: time, peak memory
streamfusion bench memory        a transformer forward's peak activation per rank vs one process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from diffusers.utils import constants as _hub

from sf_attn import get_strategy, strategy_names
from sf_comm import Topology

from . import emulate_cmd, generate_cmd, simulate_cmd
from ._cli_args import (
    EmulateSpec,
    UsageError,
    command_parser,
    cpu_transport,
    drop_image_processor_note,
    emulate_spec,
    inner_backend,
    latent_size,
    nonneg_int,
    number_above,
    out_dir,
    pixels_per_token,
    positive_int,
    pretrained_dir,
    run_command,
    sizes_mb,
    topology,
    world_and_topology,
)
from .generate import under_torchrun

# Options are checked before anything runs; errors are one line (Note [Command-line errors]
# in sf_models._cli_args).

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- combinations (raise UsageError) ----------------------------------------------------------


def _world_and_topology(args: argparse.Namespace) -> tuple[int, Topology]:
    """--world and --topology, each defaulting from the other (neither: 4 ranks as 2x2).

    For the sub-commands that start their own CPU ranks: under torchrun each process would
    run the whole job on a pool of its own, so that is refused.
    """
    if under_torchrun():
        raise ValueError(
            f"streamfusion {args.command} starts its own CPU ranks; under torchrun (one process "
            f"per GPU) use `python -m sf_models.generate ...` (streamfusion generate)"
        )
    spec: EmulateSpec | None = getattr(args, "emulate", None)
    if spec is not None:
        if args.world is not None or args.topology is not None:
            raise UsageError(
                "--emulate", "sets the machines and ranks; drop --world and --topology"
            )
        return spec.topology.world_size, spec.topology
    return world_and_topology(args.world, args.topology, default_world=4)


def _emulation(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """The started :class:`sf_comm.Emulation` of ``--emulate`` (a ``with`` block that
    removes it), or a block that gives None without it."""
    spec: EmulateSpec | None = getattr(args, "emulate", None)
    if spec is None:
        return contextlib.nullcontext()
    from sf_comm.emulate import Emulation, EmulationUnavailable

    emulation = Emulation(
        spec.topology, inter_gbps=spec.inter_gbps, inter_latency_us=spec.inter_latency_us
    )
    try:
        return emulation.start()
    except EmulationUnavailable as exc:
        raise UsageError("--emulate", str(exc)) from None


def _transport_under(args: argparse.Namespace) -> str:
    """``--transport``, defaulting to shm, or shm+gloo under ``--emulate`` (where plain shm
    would carry the bytes between emulated machines through memory, past their links)."""
    if getattr(args, "emulate", None) is None:
        return args.transport or "shm"
    if args.transport == "shm":
        raise UsageError(
            "--transport",
            "shm moves bytes between emulated machines through shared memory, past the "
            "emulated links; under --emulate use shm+gloo (the default) or gloo",
        )
    return args.transport or "shm+gloo"


def _check_heads(
    strategies: Iterable[str],
    topo: Topology,
    heads: int,
    option: str,
    ulysses_degree: int | None = None,
) -> None:
    """Each strategy can lay out ``heads`` heads on ``topo`` ("auto" picks one that can)."""
    for name in strategies:
        if name == "auto":
            continue
        try:
            get_strategy(name).layout(topo, heads, ulysses_degree)
        except ValueError as exc:
            message = str(exc)
            if f"topology {topo}" not in message:
                message += f" (topology {topo})"
            raise UsageError(option, message) from None


def _check_run(
    args: argparse.Namespace, topo: Topology, strategies: tuple[str, ...], cfg_scale: float
) -> None:
    """What ``streamfusion run`` cannot run, found before the model is built."""
    from sf_comm.split import part_layout

    from .job import SMALL_FLUX

    per_token = pixels_per_token(args.model)
    for option, value, step in zip(("--height", "--width"), (args.height, args.width), per_token):
        if value % step:
            near = (value // step * step, (value // step + 1) * step)
            raise UsageError(
                option,
                f"{value} px is not a multiple of {step} ({args.model} takes "
                f"{per_token[0]}x{per_token[1]} px per token); e.g. "
                + " or ".join(str(v) for v in near if v),
            )
    sp_topo = topo
    if args.cfg_parallel:
        if cfg_scale <= 1:
            raise UsageError(
                "--cfg-scale", f"--cfg-parallel needs a guidance scale > 1, got {cfg_scale:g}"
            )
        try:
            sp_topo = part_layout(topo, 2)[1]
        except ValueError as exc:
            raise UsageError("--cfg-parallel", str(exc)) from None
    heads = SMALL_FLUX["num_attention_heads"]
    if args.config:
        with open(os.path.join(args.config, _hub.CONFIG_NAME)) as f:
            heads = json.load(f).get("num_attention_heads")
    if isinstance(heads, int):  # else diffusers' default, which the ranks check
        _check_heads(strategies, sp_topo, heads, "--strategy")


# -- the sub-commands -------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    world, topo = _world_and_topology(args)
    if args.emulate is not None and args.what != "attention":
        raise UsageError(
            "--emulate",
            f"applies to bench attention (and run); bench {args.what} runs its ranks on this "
            f"host as they are",
        )
    if args.what == "memory":
        from . import memory_bench

        if world not in (1, 2, 4):
            raise UsageError(
                "--world",
                f"bench memory runs on 1, 2 or 4 ranks (its model has 4 heads), got {world}",
            )
        worlds = tuple(w for w in (2, 4) if w <= world)
        rows = memory_bench.run(args.model, grid=args.grid, worlds=worlds)
        print(
            f"peak activation memory of one transformer forward ({args.model}-shaped, 4 heads "
            f"x 32, {args.grid[0]}x{args.grid[1]} tokens"
            f"{' per frame, 4 frames' if args.model == 'wan' else ''}), float32, CPU ranks"
        )
        print(memory_bench.format_table(rows))
    elif args.what == "vae":
        from . import vae_bench

        worlds = tuple(sorted({w for w in (1, 2, 4) if w < world} | {world}))
        rows = vae_bench.run(worlds, latent=args.latent, iters=args.iters, shape=args.model)
        cls, _, frames = vae_bench.SHAPES[args.model]
        print(
            f"parallel VAE decode ({cls}, {args.model}-shaped, narrow channels), latent "
            f"{f'{frames}x' if frames else ''}{args.latent[0]}x{args.latent[1]}, float32, CPU "
            f"ranks (1xN); median of the slowest rank per call"
        )
        print(vae_bench.format_table(rows))
    elif args.what == "comm":
        from sf_comm import collective_bench as bench

        sizes = tuple(int(mb * 2**20) for mb in args.sizes_mb)
        smallest = 4 * world  # all_gather sends 1/world of the buffer: >= one float32 per rank
        if min(sizes) < smallest:
            raise UsageError(
                "--sizes-mb",
                f"{min(args.sizes_mb):g} MB is {min(sizes)} bytes; each size needs 4 bytes per "
                f"rank, at least {smallest / 2**20:.2g} MB on {world} ranks",
            )
        rows = bench.run(
            world, sizes=sizes, iters=args.iters, topology=str(topo) if args.topology else None
        )
        print(
            f"collectives on {world} CPU ranks, shm (one-sided) vs gloo (two-sided); "
            "median of the slowest rank per call"
        )
        print(bench.format_table(rows))
    else:
        from sf_attn import strategy_bench as abench

        _check_heads(abench.STRATEGIES, topo, args.heads, "--heads")
        shape = (args.batch, args.seq, args.heads, args.head_dim)
        spec: EmulateSpec | None = args.emulate
        with _emulation(args) as emulation:
            rows = abench.run(
                world,
                str(topo),
                shape,
                _DTYPES[args.dtype],
                iters=args.iters,
                text=args.text,
                text_layouts=("replicated", "sharded")
                if args.text_layout == "both"
                else (args.text_layout,),
                emulation=emulation,
            )
        links = (
            f"; emulated machines, each NIC {spec.inter_gbps:g} Gbit/s"
            + (f", {spec.inter_latency_us:g} us" if spec.inter_latency_us else "")
            if spec
            else ""
        )
        print(
            f"attention {shape} + {args.text} joint text tokens, {args.dtype}, on {world} CPU "
            f"ranks, topology {topo}{links}; median of the slowest rank per call"
        )
        print(abench.format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import job

    world, topo = _world_and_topology(args)
    transport = _transport_under(args)
    strategies = tuple(strategy_names()) if args.strategy == "all" else (args.strategy,)
    cfg_scale = (
        args.cfg_scale if args.cfg_scale is not None else (3.5 if args.cfg_parallel else 1.0)
    )
    _check_run(args, topo, strategies, cfg_scale)
    dtype = _DTYPES[args.dtype]
    print(
        f"streamfusion run: Flux-architecture DiT ({args.config or 'small config, random weights'}), "
        f"{args.height}x{args.width} px, {args.steps} steps, {args.dtype}; {world} CPU ranks, "
        f"{'emulated machines' if args.emulate else 'emulated topology'} {topo}, transport "
        f"{transport}" + (f", each NIC {args.emulate.inter_gbps:g} Gbit/s" if args.emulate else "")
    )
    if cfg_scale > 1:
        print(
            f"true classifier-free guidance, scale {cfg_scale}"
            + (
                ": the two passes on the two halves of the ranks (CFG parallel)"
                if args.cfg_parallel
                else ""
            )
        )
    with _emulation(args) as emulation:
        report = job.run(
            world=world,
            topology=str(topo),
            transport=transport,
            emulation=emulation,
            strategies=strategies,
            config=args.config,
            height=args.height,
            width=args.width,
            text=args.text,
            steps=args.steps,
            dtype=dtype,
            cfg_scale=cfg_scale,
            cfg_parallel=args.cfg_parallel,
            compile_inner=args.compile,
            out=args.out,
        )
    name, p_u = report["plan"]
    sp_world = world // 2 if args.cfg_parallel else world
    print(
        f"{report['tokens']} image tokens + {report['text']} text tokens; plan for strategy=auto: "
        f"{name} (Ulysses degree {p_u}, Ring degree {sp_world // p_u}), text "
        f"{report['text_layout']}"
    )
    print(f"single process: {report['single_step_s'] * 1e3:.1f} ms/step")
    head = f"{'strategy':<9} {'ms/step':>9} {'vs 1 proc':>10} {'rel err':>9} {'MB/step sent by rank 0':>23}"
    print(head + "\n" + "-" * len(head))
    for strategy, row in report["strategies"].items():
        print(
            f"{strategy:<9} {row['step_s'] * 1e3:9.1f} {report['single_step_s'] / row['step_s']:9.2f}x "
            f"{row['rel_err']:9.1e} {row['bytes_sent_rank0_per_step'] / 1e6:23.1f}"
        )
    tol = 1e-4 if args.dtype == "fp32" else 3e-2
    worst = max(row["rel_err"] for row in report["strategies"].values())
    verdict = "OK" if worst <= tol else "MISMATCH"
    print(f"{verdict}: max relative error vs single process {worst:.1e} (tolerance {tol:g})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "run.json")
    with open(path, "w") as f:
        json.dump({"world": world, "topology": str(topo), **report}, f, indent=1)
    print(f"wrote {path}")
    return 0 if worst <= tol else 1


def _cmd_trace(args: argparse.Namespace) -> int:
    from sf_attn import tracerun
    from sf_comm.trace import format_counters

    _, topo = _world_and_topology(args)
    if args.strategy == "auto" and args.ulysses_degree is not None:
        raise UsageError(
            "--ulysses-degree", "--strategy auto picks its own degree; name a strategy to set one"
        )
    option = "--heads" if args.ulysses_degree is None else "--ulysses-degree"
    _check_heads((args.strategy,), topo, args.heads, option, args.ulysses_degree)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    json_path, png_path, counters = tracerun.run(
        strategy=args.strategy,
        topology=str(topo),
        transport=args.transport,
        shape=shape,
        dtype=_DTYPES[args.dtype],
        out=args.out,
        ulysses_degree=args.ulysses_degree,
    )
    print(
        f"traced {args.strategy} on {topo} ({args.transport}), {shape}: {json_path} (chrome://tracing "
        f"or ui.perfetto.dev), {png_path}"
    )
    print(format_counters(counters))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(__doc__)

    def ranks(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--world", type=positive_int, default=None, help="number of CPU ranks (default 4)"
        )
        p.add_argument(
            "--topology", type=topology, default=None, help="MACHINESxGPUS to emulate (default 2x2)"
        )

    def emulate_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--emulate",
            type=emulate_spec,
            default=None,
            metavar="MxG:GBPS[:LATENCY_US]",
            help="run the ranks as M emulated machines of G (network namespaces, each NIC "
            "GBPS Gbit/s; needs root; see streamfusion emulate)",
        )

    def common(p: argparse.ArgumentParser, seq: int, heads: int) -> None:
        ranks(p)
        p.add_argument("--batch", type=positive_int, default=1)
        p.add_argument("--seq", type=positive_int, default=seq, help="global sequence length")
        p.add_argument("--heads", type=positive_int, default=heads)
        p.add_argument("--head-dim", type=positive_int, default=64)
        p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
        p.add_argument("--iters", type=positive_int, default=5)

    generate_cmd.add_parsers(sub)

    run = sub.add_parser(
        "run", help="the transformer alone: a DiT denoising on several ranks, checked against one"
    )
    ranks(run)
    run.add_argument("--model", choices=["flux"], default="flux")
    run.add_argument(
        "--config",
        type=pretrained_dir,
        default=None,
        help="local from_pretrained directory of the transformer",
    )
    step_h, step_w = pixels_per_token("flux")
    run.add_argument(
        "--height", type=positive_int, default=512, help=f"pixels, a multiple of {step_h}"
    )
    run.add_argument(
        "--width", type=positive_int, default=512, help=f"pixels, a multiple of {step_w}"
    )
    run.add_argument("--text", type=nonneg_int, default=64, help="text tokens")
    run.add_argument("--steps", type=positive_int, default=4)
    run.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    run.add_argument(
        "--strategy",
        choices=[*strategy_names(), "all"],
        default="all",
        help="attention strategy; all runs each in turn",
    )
    run.add_argument(
        "--cfg-scale",
        type=number_above(1, or_equal=True),
        default=None,
        help="true classifier-free guidance scale (> 1 runs a negative-prompt pass)",
    )
    run.add_argument(
        "--compile",
        type=inner_backend,
        nargs="?",
        const="inductor",
        default=None,
        metavar="INNER",
        help='run torch.compile(backend="streamfusion") with this inner backend (default '
        "inductor; minutes on CPU) instead of sf_models.parallelize",
    )
    run.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="run the two guidance passes on the two halves of the ranks (default scale 3.5)",
    )
    run.add_argument(
        "--transport",
        type=cpu_transport,
        default=None,
        help="shm, shm+gloo, gloo or auto (default shm; under --emulate shm+gloo)",
    )
    emulate_option(run)
    run.add_argument("--out", type=out_dir, default="out", help="directory for results")
    run.set_defaults(fn=_cmd_run)

    tr = sub.add_parser(
        "trace", help="trace one attention layer on every rank: Chrome JSON + timeline PNG"
    )
    common(tr, seq=4096, heads=8)
    tr.add_argument("--strategy", choices=strategy_names(), default="torus")
    tr.add_argument("--ulysses-degree", type=positive_int, default=None)
    tr.add_argument("--transport", type=cpu_transport, default="shm")
    tr.add_argument("--out", type=out_dir, default="out")
    tr.set_defaults(fn=_cmd_trace)

    simulate_cmd.add_parser(sub)
    emulate_cmd.add_parser(sub)

    bench = sub.add_parser("bench", help="side-by-side benchmarks")
    bench.add_argument("what", choices=["comm", "attention", "vae", "memory"])
    common(bench, seq=4096, heads=24)
    bench.add_argument(
        "--sizes-mb", type=sizes_mb, default="0.0625,1,16,64", help="comm: message sizes in MB"
    )
    bench.add_argument(
        "--text", type=nonneg_int, default=0, help="attention: joint text tokens (MMDiT)"
    )
    bench.add_argument(
        "--text-layout",
        choices=["replicated", "sharded", "both"],
        default="both",
        help="attention: how the joint text is laid out across ranks (default: both, side by side)",
    )
    bench.add_argument(
        "--latent", type=latent_size, default=(64, 64), help="vae: latent HxW (64x64: 512 px)"
    )
    bench.add_argument(
        "--model",
        choices=["flux", "wan"],
        default="flux",
        help="memory, vae: the transformer's or VAE's shape",
    )
    bench.add_argument(
        "--grid",
        type=latent_size,
        default=(64, 64),
        help="memory: HxW tokens (Flux: the image; Wan: per frame of 4 frames)",
    )
    emulate_option(bench)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``streamfusion``; returns the exit status (Note [Command-line errors])."""
    drop_image_processor_note()
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
