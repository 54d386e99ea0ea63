"""``streamfusion simulate``: per-step latency of a whole DiT step for every strategy.

Costs one denoising step of a real model's architecture (:mod:`sf_attn.sim.models`) on a
topology preset with :func:`sf_attn.sim.step.simulate_step` (no devices needed) and prints
xDiT's USP as deployed (the baseline, ``xdit-usp``), then per strategy and for ``auto`` its
transport, text layout, step latency and speedup over the baseline, and the lower bound
``max(compute/P, unavoidable comm)``. ``--json`` prints the same as JSON, ``--plot`` draws
latency against the number of machines (1..8). ``--explain`` says what the planner chose and
which term dominates. ``--sweep inter-efficiency`` prints (and with ``--plot`` draws) every
strategy's speedup over the baseline against the inter-machine links' efficiency.
``--calibration`` prints the simulator's prediction of xDiT's published FLUX.1-dev numbers
next to them (docs/simulator.md).

Wired into the ``streamfusion`` command by :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._cli_args import (
    UsageError,
    command_parser,
    number_above,
    out_file,
    pixels_per_token,
    positive_int,
    run_command,
)

# Native size of each model when --height/--width/--frames are not given.
_DEFAULT_SIZE = {
    "flux": (1024, 1024, 1),
    "sd3": (1024, 1024, 1),
    "cogvideox": (480, 720, 49),
    "hunyuanvideo": (720, 1280, 129),
    "wan": (720, 1280, 81),
}
_HARDWARE = ("p4de", "p5", "h100-ib", "h200-ib")
PLOT_MACHINES = range(1, 9)
SWEEPS = ("inter-efficiency",)
# --sweep inter-efficiency with no values: e_max of every inter-machine curve, 0.3 .. 1.0
DEFAULT_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def sweep_spec(text: str) -> tuple[str, tuple[float, ...]]:
    """A ``type=`` for ``--sweep``: ``inter-efficiency`` (0.3 .. 1.0 by 0.1),
    ``inter-efficiency=LO:HI:STEP`` or ``inter-efficiency=V1,V2,...``; every value in (0, 1]
    (the large-message efficiency of the inter-machine links)."""
    name, equals, values = text.partition("=")
    if name not in SWEEPS:
        raise argparse.ArgumentTypeError(
            f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)} "
            "(e.g. inter-efficiency or inter-efficiency=0.3:1.0:0.1)"
        )
    if not equals:
        return name, DEFAULT_SWEEP
    try:
        if ":" in values:
            parts = [float(v) for v in values.split(":")]
            if len(parts) != 3 or not parts[2] > 0 or parts[0] > parts[1]:
                raise ValueError
            lo, hi, step = parts
            count = round((hi - lo) / step) + 1
            points = tuple(
                round(lo + i * step, 10) for i in range(count) if lo + i * step <= hi + 1e-9
            )
        else:
            points = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name} values must be LO:HI:STEP with LO <= HI and STEP > 0, or V1,V2,..., "
            f"got {values!r}"
        ) from None
    bad = [v for v in points if not 0 < v <= 1]
    if bad or not points:
        raise argparse.ArgumentTypeError(
            f"{name} values must lie in (0, 1] (a fraction of line rate), got {values!r}"
        )
    return name, points


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on the ``streamfusion`` sub-command parsers; returns its parser.

    The handler is set with ``set_defaults(fn=run)``: ``args.fn(args)`` returns the exit code,
    or raises ValueError (UsageError for bad options), which
    :func:`sf_models._cli_args.run_command` prints as one line.
    """
    from sf_attn.sim.models import MODELS

    p = subparsers.add_parser(
        "simulate",
        help="per-step latency of a DiT step for every strategy on a topology preset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="flux")
    p.add_argument(
        "--height", type=positive_int, default=None, help="pixels (default: the model's native)"
    )
    p.add_argument(
        "--width", type=positive_int, default=None, help="pixels (default: the model's native)"
    )
    frames = p.add_mutually_exclusive_group()
    frames.add_argument(
        "--frames", type=positive_int, default=None, help="video frames (video models)"
    )
    frames.add_argument(
        "--seconds",
        type=number_above(0),
        default=None,
        help="video length; frames = seconds * model fps + 1 (CogVideoX: 8 fps)",
    )
    p.add_argument("--hardware", choices=_HARDWARE, default="p4de", help="topology preset")
    p.add_argument("--machines", type=positive_int, default=1)
    p.add_argument(
        "--gpus-per-machine",
        type=positive_int,
        default=None,
        help="use fewer GPUs per machine than the preset's 8 (e.g. 4 for 4x H100)",
    )
    p.add_argument("--two-sided", action="store_true", help="cost two-sided send/recv transfers")
    p.add_argument(
        "--text",
        choices=["auto", "replicated", "sharded"],  # sf_attn.sim.step.TEXT_CHOICES
        default="auto",
        help="joint text layout (auto: the strategy rows as sf_models.parallelize runs the "
        "model, sharded for joint text, replicated for cross-attention text; the auto row "
        "weighs both layouts of joint text)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="also print the total for N steps"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument(
        "--explain",
        action="store_true",
        help="say what the planner chose and which term dominates (inter-machine transfer, "
        "intra-machine transfer, compute, overheads)",
    )
    p.add_argument(
        "--sweep",
        type=sweep_spec,
        default=None,
        metavar="inter-efficiency[=LO:HI:STEP|=V1,V2,...]",
        help="speedup of every strategy over the baseline against the inter-machine links' "
        "efficiency (default 0.3..1.0); with --plot, drawn",
    )
    p.add_argument(
        "--plot", type=out_file, default=None, metavar="OUT.png", help="latency vs machines 1..8"
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="print predicted vs published xDiT FLUX.1-dev numbers on 4x H100 and exit",
    )
    p.set_defaults(fn=run)
    return p


def _size(args: argparse.Namespace) -> tuple[int, int, int]:
    from sf_attn.sim.models import get_model

    cfg = get_model(args.model)
    height, width, frames = _DEFAULT_SIZE[args.model]
    height = args.height if args.height is not None else height
    width = args.width if args.width is not None else width
    if args.seconds is not None:
        frames = cfg.frames_for(args.seconds)
    elif args.frames is not None:
        frames = args.frames
    elif not cfg.is_video:
        frames = 1
    return height, width, frames


def _topology(args: argparse.Namespace, machines: int | None = None) -> Any:
    from sf_comm import Topology

    topo = Topology.preset(args.hardware, machines=machines or args.machines)
    if args.gpus_per_machine is not None:
        topo = topo.replace(gpus_per_machine=args.gpus_per_machine)
    return topo


def check(args: argparse.Namespace) -> None:
    """Options that cannot be costed together, found before anything is simulated.

    Raises:
        UsageError: naming the option, the value and what is allowed.
    """
    from sf_attn.sim.models import MODELS, get_model

    cfg = get_model(args.model)
    video = ", ".join(name for name in sorted(MODELS) if get_model(name).is_video)
    if not cfg.is_video and args.seconds is not None:
        raise UsageError("--seconds", f"{args.model} makes images; video models: {video}")
    if not cfg.is_video and args.frames not in (None, 1):
        raise UsageError(
            "--frames", f"{args.model} makes images (1 frame), got {args.frames}; video: {video}"
        )
    per_token = pixels_per_token(args.model)
    for option, value, step in zip(("--height", "--width"), (args.height, args.width), per_token):
        if value is not None and value < step:
            raise UsageError(
                option, f"{value} px is smaller than one {args.model} token ({step} px)"
            )
    try:
        _topology(args)
    except ValueError as exc:
        raise UsageError(
            "--gpus-per-machine",
            f"{args.gpus_per_machine} does not fit the {args.hardware} preset: {exc}",
        ) from None
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if ext and ext not in kinds:
            raise UsageError(
                "--plot", f"cannot draw {ext!r} files; use one of {', '.join(sorted(kinds))}"
            )


def _transport(name: str) -> str:
    return {"one-sided": "1-sided", "two-sided": "2-sided"}.get(name, name)


def format_table(result: Any, *, one_sided: bool, steps: int | None = None) -> str:
    """The ``streamfusion simulate`` table for a :class:`sf_attn.sim.step.StepResult`."""
    from sf_attn.sim.models import get_model
    from sf_attn.sim.step import BASELINE_NAME

    cfg = get_model(result.model)
    topo = result.topology
    size = f"{result.height}x{result.width} px"
    if cfg.is_video:
        size += f", {result.frames} frames ({(result.frames - 1) / cfg.fps:.3g} s at {cfg.fps} fps)"
    lines = [
        f"{cfg.name} ({cfg.hf_repo}): {size} -> {result.tokens} tokens + {cfg.text_len} text "
        f"({cfg.text_mode}, {result.text}); {cfg.layers} blocks, {cfg.heads} heads x {cfg.head_dim}",
        f"{topo.name}: {topo.machines} machine(s) x {topo.gpus_per_machine} GPUs = "
        f"{topo.world_size} ranks, {'one' if one_sided else 'two'}-sided transfers",
    ]
    vs = f"vs {BASELINE_NAME}"
    head = (
        f"{'strategy':<18} {'transport':<9} {'text':<10} {'P_u x P_r':>9} {'ms/step':>10} "
        f"{vs:>11} {'attn ms':>9} {'other ms':>9}"
    )
    if steps:
        head += f" {f'{steps} steps s':>12}"
    lines += [head, "-" * len(head)]

    def row(label: str, s: Any, speed: float | None) -> str:
        other = s.latency_s - s.attention_s
        text = (
            f"{label:<18} {_transport(s.transport):<9} {s.text:<10} {s.degrees[0]:>4} x "
            f"{s.degrees[1]:<3} {s.latency_s * 1e3:10.1f} "
            f"{(f'{speed:.2f}x' if speed else 'n/a'):>11} {s.attention_s * 1e3:9.1f} "
            f"{other * 1e3:9.1f}"
        )
        if steps:
            text += f" {steps * s.latency_s:12.2f}"
        if s.uneven_heads:
            text += "  * uneven head groups"
        return text

    if result.baseline is not None:
        lines.append(row(f"{BASELINE_NAME} (base)", result.baseline, 1.0))
    else:
        lines.append(f"{BASELINE_NAME:<18} n/a (USP cannot split {cfg.heads} heads here)")
    for name, s in result.strategies.items():
        if s is None:
            lines.append(
                f"{name:<18} {'':<9} {'':<10} {'n/a':>9} {'n/a':>10}   "
                f"(cannot split {cfg.heads} heads here)"
            )
            continue
        label = f"{name} ({s.chosen})" if name == "auto" else name
        lines.append(row(label, s, result.speedup(name)))
    lines.append(
        f"{'lower bound':<18} {'':<9} {'':<10} {'':>9} {result.bound_s * 1e3:10.1f}  "
        f"= max(compute/P {result.compute_bound_s * 1e3:.1f}, "
        f"unavoidable comm {result.comm_bound_s * 1e3:.1f})"
    )
    return "\n".join(lines)


_TERM_NAMES = {
    "inter": "inter-machine transfer",
    "intra": "intra-machine transfer",
    "compute": "compute",
    "overheads": "overheads",
}


def format_explain(result: Any) -> str:
    """``--explain``: the planner's choice for this point and the term that dominates it.

    The terms are :func:`sf_attn.sim.step.step_terms` (busy seconds per kind of work over the
    step); the reason names the largest for the choice and for the baseline, and the
    runner-up strategy at its default degrees.
    """
    from sf_attn.sim.step import BASELINE_NAME, step_terms

    auto = result.strategies.get("auto")
    if auto is None:
        return "explain: auto was not simulated"
    topo = result.topology
    lines = [
        f"explain ({result.model}, {topo.name} {topo.machines} x {topo.gpus_per_machine}): "
        f"auto picks {auto.chosen} {auto.degrees[0]} x {auto.degrees[1]} "
        f"({auto.transport}, text {auto.text}), {auto.latency_s * 1e3:.1f} ms/step"
        + (
            f", {result.speedup('auto'):.2f}x over {BASELINE_NAME} "
            f"({result.baseline.latency_s * 1e3:.1f} ms)"
            if result.baseline is not None
            else ""
        )
    ]
    for label, s in (("auto", auto), (BASELINE_NAME, result.baseline)):
        if s is None:
            continue
        terms = step_terms(result.model, s)
        top = max(terms, key=lambda k: terms[k])
        parts = ", ".join(f"{_TERM_NAMES[k]} {v * 1e3:.1f}" for k, v in terms.items())
        lines.append(f"  {label:<9} ms busy per step: {parts} -> {_TERM_NAMES[top]} dominates")
    others = sorted(
        (s.latency_s, name)
        for name, s in result.strategies.items()
        if s is not None and name != "auto" and name != auto.chosen
    )
    if others:
        latency, name = others[0]
        lines.append(
            f"  runner-up: {name} at its default degrees, {latency * 1e3:.1f} ms/step "
            f"({(latency / auto.latency_s - 1) * 100:+.0f}% over the pick)"
        )
    if len(result.auto_by_text) > 1:
        other = next(t for t in result.auto_by_text if t != auto.text)
        delta = result.auto_by_text[other] / auto.latency_s - 1
        lines.append(
            f"  text {auto.text}: the best plan with text {other} takes "
            f"{result.auto_by_text[other] * 1e3:.1f} ms/step ({delta * 100:+.1f}%)"
        )
    if result.baseline is not None and auto.latency_s >= result.baseline.latency_s:
        lines.append(f"  nothing beats {BASELINE_NAME} here: auto runs its configuration")
    return "\n".join(lines)


def sweep_inter_efficiency(args: argparse.Namespace, values: tuple[float, ...]) -> list[Any]:
    """One :class:`sf_attn.sim.step.StepResult` per inter-machine efficiency in ``values``
    (every inter-machine curve's ``e_max`` set to it, its ``m_half`` kept)."""
    from sf_attn.sim.step import simulate_step

    height, width, frames = _size(args)
    base = _topology(args)
    out = []
    for e in values:
        topo = base.replace(links=base.links.with_inter_efficiency(e))
        out.append(
            simulate_step(
                args.model,
                topo,
                height=height,
                width=width,
                frames=frames,
                one_sided=not args.two_sided,
                text=args.text,
            )
        )
    return out


def format_sweep(values: tuple[float, ...], results: list[Any], preset: Any) -> str:
    """The ``--sweep inter-efficiency`` table: per efficiency, the baseline's step and every
    strategy's speedup over it, and what auto picks (``preset``: the unswept topology)."""
    from sf_attn.sim.step import BASELINE_NAME

    first = results[0]
    topo = first.topology
    names = [n for n in first.strategies if n != "auto"]
    links = _topology_links(preset)
    lines = [
        f"speedup over {BASELINE_NAME} vs inter-machine link efficiency (e_max of every "
        f"inter-machine curve; the preset's: {links}); {first.model} "
        f"{first.height}x{first.width}"
        + (f"x{first.frames}f" if first.frames > 1 else "")
        + f", {topo.name} {topo.machines} x {topo.gpus_per_machine}",
    ]
    head = f"{'e_max':>5} {BASELINE_NAME + ' ms':>12} " + " ".join(f"{n:>8}" for n in names)
    head += f" {'auto':>8}  auto picks"
    lines += [head, "-" * len(head)]
    for e, res in zip(values, results):
        base = res.baseline
        cells = []
        for n in [*names, "auto"]:
            speed = res.speedup(n)
            cells.append(f"{(f'{speed:.2f}x' if speed else 'n/a'):>8}")
        auto = res.strategies["auto"]
        pick = f"{auto.chosen} {auto.degrees[0]}x{auto.degrees[1]}" if auto else "n/a"
        base_ms = f"{base.latency_s * 1e3:12.1f}" if base else f"{'n/a':>12}"
        lines.append(f"{e:5.2f} {base_ms} " + " ".join(cells) + f"  {pick}")
    return "\n".join(lines)


def _topology_links(topo: Any) -> str:
    links = topo.links
    return f"two-sided {links.inter_all_to_all.e_max:g}, one-sided {links.inter_one_sided.e_max:g}"


def plot_sweep(values: tuple[float, ...], results: list[Any], path: str) -> None:
    """Speedup over the baseline vs inter-machine efficiency, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sf_attn.sim.step import BASELINE_NAME

    first = results[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in first.strategies:
        pts = [(e, r.speedup(name)) for e, r in zip(values, results)]
        xs = [e for e, v in pts if v is not None]
        ys = [v for _, v in pts if v is not None]
        if not xs:
            continue
        style: dict[str, Any] = {"linewidth": 2.5, "color": "black"} if name == "auto" else {}
        ax.plot(xs, ys, marker="o", label=name, **style)
    ax.axhline(1.0, linestyle="--", color="gray", label=BASELINE_NAME)
    topo = first.topology
    ax.set_xlabel("inter-machine link efficiency e_max (fraction of line rate)")
    ax.set_ylabel(f"speedup over {BASELINE_NAME}")
    what = f"{first.model} {first.height}x{first.width}" + (
        f"x{first.frames}f" if first.frames > 1 else ""
    )
    ax.set_title(f"{what} on {topo.name} {topo.machines} x {topo.gpus_per_machine}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_calibration(rows: Any) -> str:
    from sf_attn.sim.calibration import XDIT_PIPELINE_OVERHEAD_S, XDIT_STEPS

    lines = [
        f"FLUX.1-dev 1024x1024, {XDIT_STEPS} steps, 4x H100 (h100-ib preset, one machine), "
        f"two-sided, text sharded as in xDiT; predicted = {XDIT_STEPS} x step + "
        f"{XDIT_PIPELINE_OVERHEAD_S:g} s outside the transformer",
        f"{'configuration':<20} {'GPUs':>4} {'published s':>12} {'predicted s':>12} "
        f"{'error':>7}  used for",
    ]
    for r in rows:
        lines.append(
            f"{r.label:<20} {r.gpus:>4} {r.published_s:12.2f} {r.predicted_s:12.2f} "
            f"{r.error * 100:+6.1f}%  {'fit' if r.fitted else 'check (held out)'}"
        )
    return "\n".join(lines)


def format_heldout(rows: Any) -> str:
    """The held-out HunyuanVideo check: seconds, and the speedup over one GPU (which does not
    depend on the kernel rate or on the work outside the transformer the same way)."""
    from sf_attn.sim.calibration import HUNYUANVIDEO_STEPS

    one = rows[0]
    lines = [
        f"held out: HunyuanVideo 1280x720, 129 frames, {HUNYUANVIDEO_STEPS} steps, 1-8 H100 "
        f"(xDiT's published figures; predicted = {HUNYUANVIDEO_STEPS} x step, nothing added "
        "outside the transformer)",
        f"{'configuration':<20} {'GPUs':>4} {'published s':>12} {'predicted s':>12} "
        f"{'error':>7} {'published x':>12} {'predicted x':>12}",
    ]
    for r in rows:
        lines.append(
            f"{r.label:<20} {r.gpus:>4} {r.published_s:12.1f} {r.predicted_s:12.1f} "
            f"{r.error * 100:+6.1f}% {one.published_s / r.published_s:12.2f} "
            f"{one.predicted_s / r.predicted_s:12.2f}"
        )
    return "\n".join(lines)


def plot(args: argparse.Namespace, path: str) -> None:
    """Step latency vs machines (1..8) for every strategy, auto and the bound, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sf_attn.sim.step import BASELINE_NAME, simulate_step

    height, width, frames = _size(args)
    machines = list(PLOT_MACHINES)
    series: dict[str, list[float | None]] = {}
    bound: list[float] = []
    for m in machines:
        res = simulate_step(
            args.model,
            _topology(args, m),
            height=height,
            width=width,
            frames=frames,
            one_sided=not args.two_sided,
            text=args.text,
        )
        base = res.baseline
        series.setdefault(BASELINE_NAME, []).append(None if base is None else base.latency_s * 1e3)
        for name, s in res.strategies.items():
            series.setdefault(name, []).append(None if s is None else s.latency_s * 1e3)
        bound.append(res.bound_s * 1e3)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series.items():
        xs = [m for m, v in zip(machines, values) if v is not None]
        ys = [v for v in values if v is not None]
        style: dict[str, Any] = {"linewidth": 2.5, "color": "black"} if name == "auto" else {}
        if name == BASELINE_NAME:
            style = {"linestyle": ":", "color": "gray"}
        ax.plot(xs, ys, marker="o", label=name, **style)
    ax.plot(machines, bound, linestyle="--", color="gray", label="lower bound")
    ax.set_yscale("log")
    ax.set_xlabel(f"machines ({args.hardware}, {_topology(args, 1).gpus_per_machine} GPUs each)")
    ax.set_ylabel("ms per denoising step")
    what = f"{args.model} {height}x{width}" + (f"x{frames}f" if frames > 1 else "")
    ax.set_title(f"{what}: simulated step latency ({'two' if args.two_sided else 'one'}-sided)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The ``streamfusion simulate`` handler; returns the exit code."""
    from sf_attn.sim.calibration import xdit_flux_calibration, xdit_hunyuanvideo_check
    from sf_attn.sim.step import simulate_step

    if args.calibration:
        print(format_calibration(xdit_flux_calibration()))
        print()
        print(format_heldout(xdit_hunyuanvideo_check()))
        return 0
    check(args)
    if args.sweep is not None:
        _, values = args.sweep
        results = sweep_inter_efficiency(args, values)
        if args.json:
            print(
                json.dumps(
                    {
                        "sweep": "inter-efficiency",
                        "points": [
                            {"inter_efficiency": e, **r.to_json()} for e, r in zip(values, results)
                        ],
                    },
                    indent=1,
                )
            )
        else:
            print(format_sweep(values, results, _topology(args)))
            if args.explain:
                for e, r in zip(values, results):
                    print(f"-- e_max {e:g}")
                    print(format_explain(r))
        if args.plot:
            plot_sweep(values, results, args.plot)
            if not args.json:
                print(f"wrote {args.plot}")
        return 0
    height, width, frames = _size(args)
    result = simulate_step(
        args.model,
        _topology(args),
        height=height,
        width=width,
        frames=frames,
        one_sided=not args.two_sided,
        text=args.text,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(format_table(result, one_sided=not args.two_sided, steps=args.steps))
        if args.explain:
            print(format_explain(result))
    if args.plot:
        plot(args, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``simulate`` on its own (``python -m sf_models.simulate_cmd ...``): the same
    command as ``streamfusion simulate ...``."""
    parser, commands = command_parser(None)
    add_parser(commands)
    return run_command(parser, ["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
