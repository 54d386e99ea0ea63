"""The ``streamfusion generate`` and ``streamfusion make-tiny`` sub-commands.

``generate`` parses the options into :class:`sf_models.generate.GenerateOptions`, runs
:func:`sf_models.generate.run` and prints its summary (rank 0 only); ``make-tiny`` writes a
complete tiny pipeline directory (:func:`sf_models.tiny.make_tiny`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from sf_attn import strategy_names
from sf_comm import transport_names

from ._cli_args import number_above, out_file, positive_int, topology
from .generate import DEVICES, DTYPES, TEXT_LAYOUTS, GenerateOptions, run
from .model_dir import FAMILIES

__all__ = ["add_parsers", "format_summary"]


def _nonneg_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def _transport(text: str) -> str:
    known = transport_names()
    if text in ("auto", *known):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown transport {text!r}; choose auto or one of {', '.join(known)}"
    )


def _new_dir(text: str) -> str:
    if os.path.exists(text) and (not os.path.isdir(text) or os.listdir(text)):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not an empty directory")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent} is not writable")
    return text


def _cmd_generate(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateOptions)}
    given["topology"] = str(args.topology) if args.topology else None
    options = GenerateOptions(**given)
    summary = run(options)
    if summary is None:  # torchrun ranks other than 0 print nothing
        return 0
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "output"}, f, indent=1)
        print(f"summary: {args.json}")
    check = summary.get("check")
    if check is not None:
        verdict = "OK" if check["ok"] else "MISMATCH"
        single, parallel = check["single_process_step_s_median"], summary["step_s_median"]
        if single and parallel:
            print(
                f"single process: {single * 1e3:.1f} ms/step; {summary['world']} ranks: "
                f"{single / parallel:.2f}x"
            )
        print(
            f"{verdict}: max abs difference vs single-process diffusers {check['max_abs']:.1e} "
            f"(tolerance {check['tolerance']:g})"
        )
        return 0 if check["ok"] else 1
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    path = make_tiny(args.dir, args.model, seed=args.seed)
    print(f"wrote a tiny {args.model} pipeline (random weights, local tokenizers) to {path}")
    return 0


_DECODE_WHERE = {"parallel": "split across the ranks", "rank0": "on rank 0", "all": "whole"}


def _mib(values: list[float]) -> str:
    return ", ".join(f"{v / 2**20:.0f}" for v in values)


def format_summary(s: dict[str, Any]) -> str:
    """The lines ``streamfusion generate`` prints after the progress bar."""
    strategy = s["strategy"]
    if strategy["name"] == "none":
        how = strategy["why"]
    else:
        how = (
            f"{strategy['name']} (Ulysses degree {strategy['ulysses_degree']}, Ring degree "
            f"{strategy['ring_degree']}), text {s['text_layout'] or 'replicated'}"
            f"{', CFG parallel (the guidance branches on the two halves)' if s['cfg_parallel'] else ''}"
            f"{', torch.compile(backend=streamfusion)' if s['compiled'] else ''}; "
            f"{strategy['why']}"
        )
    phases = s["phases_s"]
    step = s["step_s_median"]
    lines = [
        f"{s['pipeline']} from {s['model_dir']}, seed {s['seed']}, {s['dtype']}, "
        f"{s['world']} rank(s) ({s['launch']}), topology {s['topology']}, {s['device']}, "
        f"transport {s['transport']}",
        f"strategy: {how}",
        f"denoising: {s['steps']} steps, {step * 1e3:.1f} ms/step (median"
        + (f"; the first, which compiles: {s['step_s'][0]:.1f} s)" if s["compiled"] else ")")
        if step is not None
        else f"denoising: {s['steps']} step(s), no median",
        f"wall time: text encoding {phases['text_encoding']:.2f} s, denoising "
        f"{phases['denoising']:.2f} s, decode {phases['decode']:.2f} s "
        f"({_DECODE_WHERE.get(s['decode_on'], s['decode_on'])}; load {phases['load']:.2f} s)",
        f"peak memory per rank ({s['peak_memory_kind']}), MiB: {_mib(s['peak_memory_bytes'])}",
        "sent per step per rank, MB: "
        + ", ".join(f"{b / 1e6:.2f}" for b in s["bytes_sent_per_step"]),
        f"output {'x'.join(map(str, s['output_shape']))}: {s['out'] or '(not written)'}",
    ]
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    """Add ``generate`` and ``make-tiny`` to the ``streamfusion`` sub-command table."""
    gen = sub.add_parser(
        "generate",
        help="a prompt in, an image or video out (local diffusers pipeline directory)",
        description="Generate with a local diffusers pipeline (Flux, SD3, CogVideoX, "
        "HunyuanVideo, Wan) split across ranks: under torchrun (one process per GPU), on "
        "self-launched CPU ranks (--world/--topology), or in one process. Options left out "
        "keep the pipeline's defaults.",
    )
    gen.add_argument("--model-dir", required=True, help="diffusers pipeline directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=positive_int, default=None, help="pixels")
    gen.add_argument("--width", type=positive_int, default=None, help="pixels")
    gen.add_argument("--frames", type=positive_int, default=None, help="video models only")
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps")
    gen.add_argument("--guidance", type=number_above(0, or_equal=True), default=None)
    gen.add_argument(
        "--true-cfg-scale",
        type=number_above(0, or_equal=True),
        default=None,
        help="Flux, HunyuanVideo: true classifier-free guidance (with --negative-prompt)",
    )
    gen.add_argument("--seed", type=_nonneg_seed, default=None, help="torch.Generator('cpu') seed")
    gen.add_argument("--strategy", choices=strategy_names(), default="auto")
    gen.add_argument("--ulysses-degree", type=positive_int, default=None)
    gen.add_argument("--text", choices=TEXT_LAYOUTS, default="auto", help="text token layout")
    gen.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="the two guidance branches on the two halves of the ranks",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        help='torch.compile(backend="streamfusion") instead of sf_models.parallelize',
    )
    gen.add_argument(
        "--offload",
        action="store_true",
        help="diffusers' model CPU offload: each model on the GPU only while it runs",
    )
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    gen.add_argument("--device", choices=DEVICES, default=None)
    gen.add_argument("--transport", type=_transport, default="auto")
    gen.add_argument(
        "--world", type=positive_int, default=None, help="self-launched CPU ranks (default 1)"
    )
    gen.add_argument("--topology", type=topology, default=None, help="MACHINESxGPUS")
    gen.add_argument("--out", type=out_file, required=True, help="FILE.png, FILE.mp4 or FILE.npy")
    gen.add_argument("--json", type=out_file, default=None, help="write the summary here too")
    gen.add_argument(
        "--check",
        action="store_true",
        help="also run the single-process pipeline and compare (exit 1 on a mismatch)",
    )
    gen.set_defaults(fn=_cmd_generate)

    tiny = sub.add_parser(
        "make-tiny",
        help="write a complete tiny pipeline directory (random weights, local tokenizers)",
    )
    tiny.add_argument("dir", type=_new_dir, help="new (or empty) directory")
    tiny.add_argument("--model", choices=FAMILIES, required=True)
    tiny.add_argument("--seed", type=_nonneg_seed, default=0)
    tiny.set_defaults(fn=_cmd_make_tiny)
