"""What the ``streamfusion`` sub-commands share: argument checks and one-line errors.

The argparse ``type=`` callables for single values, :class:`UsageError` for combinations of
options, and the parser class and runner that turn every mistake into one line (Note
[Command-line errors]). :mod:`sf_models.cli` builds the command from them, and
:mod:`sf_models.simulate_cmd` its ``simulate`` sub-command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from diffusers.utils import constants as _hub

from sf_attn.sim.models import get_model
from sf_comm import Topology, transport_names
from sf_comm.launch import RankError

# The transports whose factories take the CPU tensors of a rank pool ("auto" is shm there);
# nccl, nvshmem and torch-symm need CUDA tensors (sf_comm.context).
_CPU_TRANSPORTS = ("auto", "shm", "shm+gloo", "gloo")

# Note [Command-line errors]
#     A mistake on the command line ends as ONE line on stderr, ``streamfusion <sub>: error:
#     argument --opt: <value and what is allowed> (see streamfusion <sub> --help)``, exit
#     status 2, no traceback, before any model is built or rank started. Single values are
#     checked by the ``type=`` callables below, argparse's own errors by _Parser.error,
#     combinations of options by a check at the top of each handler (cli._check_run,
#     cli._check_heads, simulate_cmd.check; they raise UsageError). A ValueError the library
#     raises later, in this process or on a rank (an impossible combination only the ranks
#     see), ends the same way without the --help hint (run_command); any other exception is a
#     bug and keeps its traceback.


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (Note [Command-line errors]); sub-commands inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # args.parser: the chosen sub-command's parser (its default overrides the root's).
        self.set_defaults(parser=self)

    def error_line(self, message: str) -> str:
        return f"{self.prog}: error: {message} (see {self.prog} --help)"

    def error(self, message: str) -> NoReturn:
        self.exit(2, self.error_line(message) + "\n")


class UsageError(ValueError):
    """A combination of options that cannot work, found before anything runs."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"argument {option}: {message}")


# -- single values (argparse ``type=``) -------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    """A ``type=`` for integers >= ``low``."""

    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def number_above(low: float, *, or_equal: bool = False) -> Callable[[str], float]:
    """A ``type=`` for finite numbers > ``low`` (>= ``low`` with ``or_equal``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (value == low and not or_equal):
            bound = ">=" if or_equal else ">"
            raise argparse.ArgumentTypeError(f"expected a number {bound} {low:g}, got {text!r}")
        return value

    return parse


def topology(text: str) -> Topology:
    """A ``type=`` for ``MACHINESxGPUS`` (:meth:`sf_comm.Topology.parse`)."""
    try:
        return Topology.parse(text)
    except ValueError as exc:
        message = str(exc)
        raise argparse.ArgumentTypeError(
            message if repr(text) in message else f"{text!r}: {message}"
        ) from None


def cpu_transport(text: str) -> str:
    """A ``type=`` for a registered transport that runs on the CPU ranks of a rank pool."""
    known = transport_names()
    cpu = ", ".join(n for n in known if n in _CPU_TRANSPORTS)
    if text in known and text in _CPU_TRANSPORTS:
        return text
    if text in known:
        raise argparse.ArgumentTypeError(
            f"transport {text!r} needs CUDA; these run on CPU ranks: {cpu}"
        )
    raise argparse.ArgumentTypeError(
        f"unknown transport {text!r}; these run on CPU ranks: {cpu} (known: {', '.join(known)})"
    )


def inner_backend(text: str) -> str:
    """A ``type=`` for a ``torch.compile`` backend the streamfusion backend can hand on to."""
    from torch._dynamo import list_backends

    if text == "streamfusion" or text not in list_backends(exclude_tags=()):
        main = ", ".join(n for n in list_backends() if n != "streamfusion")
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {text!r}; choose one of {main}, or a debug backend "
            "such as eager (torch._dynamo.list_backends(exclude_tags=()))"
        )
    return text


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def out_dir(text: str) -> str:
    """A ``type=`` for a directory that exists or can be created, and can be written.

    Nothing is created here: the command creates it when it writes.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    base = _nearest_existing(text)
    if not os.path.isdir(base):
        raise argparse.ArgumentTypeError(
            f"cannot create directory {text!r}: {base} is not a directory"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write directory {text!r}: {base} is read-only")
    return text


def out_file(text: str) -> str:
    """A ``type=`` for a file that can be written in an existing directory."""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file name, got {text!r}")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: directory {parent} does not exist"
        )
    writable = os.access(text, os.W_OK) if os.path.exists(text) else os.access(parent, os.W_OK)
    if not writable:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def pretrained_dir(text: str) -> str:
    """A ``type=`` for a local ``from_pretrained`` directory: config.json and weights."""
    weights = (
        _hub.SAFETENSORS_WEIGHTS_NAME,
        _hub.SAFE_WEIGHTS_INDEX_NAME,
        _hub.WEIGHTS_NAME,
        _hub.WEIGHTS_INDEX_NAME,
    )
    expected = f"a local from_pretrained directory with {_hub.CONFIG_NAME} and {weights[0]}"
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory; expected {expected}")
    config = os.path.join(text, _hub.CONFIG_NAME)
    try:
        with open(config) as f:
            ok = isinstance(json.load(f), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds no readable {_hub.CONFIG_NAME} (a JSON object); expected {expected}"
        )
    if not any(os.path.isfile(os.path.join(text, w)) for w in weights):
        raise argparse.ArgumentTypeError(
            f"{text!r} holds no weights ({', '.join(weights)}); expected {expected}"
        )
    return text


def latent_size(text: str) -> tuple[int, int]:
    """A ``type=`` for a latent size ``HxW`` (each >= 1)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH in latent rows, e.g. 64x64, got {text!r}"
        )
    return h, w


def sizes_mb(text: str) -> tuple[float, ...]:
    """A ``type=`` for a comma-separated list of positive sizes in MB."""
    try:
        sizes = tuple(float(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes in MB, each > 0 (e.g. 0.0625,1,16), got {text!r}"
        )
    return sizes


# -- combinations (raise UsageError) ----------------------------------------------------------


def pixels_per_token(model: str) -> tuple[int, int]:
    """Pixels (height, width) of one token of ``model``: VAE factor x patch.

    16 x 16 for flux (8x VAE, 2x2 latents packed per token), the 16 that
    :func:`sf_models.job.make_inputs` divides by.
    """
    cfg = get_model(model)
    return cfg.vae_spatial * cfg.patch[1], cfg.vae_spatial * cfg.patch[2]


class _NoImageProcessorFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def drop_image_processor_note() -> None:
    """Silence transformers' note that its image processors fall back to PIL without
    torchvision: it prints on every import of a diffusers pipeline (they import them), on
    every rank, and concerns no text-to-image/video path. Other warnings stay."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoImageProcessorFallback) for f in logger.filters):
        logger.addFilter(_NoImageProcessorFallback())


def world_and_topology(
    world: int | None,
    topo: Topology | None,
    *,
    default_world: int,
    world_source: str = "--world",
) -> tuple[int, Topology]:
    """The ranks and their topology from --world and --topology, each defaulting from the
    other (neither: ``default_world`` ranks, 4 as 2x2, else 1xN).

    Raises:
        UsageError: the topology's ranks are not the world (``world_source`` says where the
            world came from).
    """
    if world is None:
        world = topo.world_size if topo else default_world
    if topo is None:
        topo = Topology.parse("2x2" if world == 4 else f"1x{world}")
    if topo.world_size != world:
        raise UsageError(
            "--topology",
            f"{topo} has {topo.world_size} ranks but {world_source} is {world}; use a "
            f"MACHINESxGPUS split whose product is {world}",
        )
    return world, topo


# -- running a command ------------------------------------------------------------------------


def command_parser(description: str | None) -> tuple[argparse.ArgumentParser, Any]:
    """The ``streamfusion`` parser and its sub-command table (``table.add_parser(name, ...)``;
    each sub-command sets its handler with ``set_defaults(fn=...)``)."""
    parser = _Parser(
        prog="streamfusion",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser, parser.add_subparsers(dest="command", required=True)


def _library_error(exc: Exception) -> str | None:
    """The message of a ValueError raised here or on a rank (inside a RankError), else None."""
    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, RankError):
        for failure in exc.failures:
            if failure.kind == "error" and failure.detail.startswith("ValueError: "):
                message = failure.detail.split("\nTraceback (most recent call last):")[0]
                return message.removeprefix("ValueError: ")
    return None


def _terminate_as_exit() -> None:
    """SIGTERM (a job scheduler, ``kill``) unwinds like Ctrl-C: ``with`` blocks close, so a
    command's rank pool is stopped and its files removed instead of left running."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def terminate(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminate)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run the sub-command ``argv`` names; returns the exit status (Note [Command-line errors]).

    Args:
        parser: from :func:`command_parser`, with its sub-commands added.
        argv: the arguments after ``streamfusion`` (None: ``sys.argv[1:]``).
    """
    _terminate_as_exit()
    args: Any
    args, extra = parser.parse_known_args(argv)
    sub: _Parser = args.parser
    if extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        status = int(args.fn(args))
        sys.stdout.flush()  # inside the try: a closed pipe is seen here, not at exit
        return status
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as shell tools do, and keep the
        # interpreter's final flush from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe
    except UsageError as exc:
        line = sub.error_line(str(exc))
    except (ValueError, RankError) as exc:
        message = _library_error(exc)
        if message is None:
            raise
        line = f"{sub.prog}: error: {message}"
    print(" ".join(line.split("\n")), file=sys.stderr)
    return 2


@dataclasses.dataclass(frozen=True, slots=True)
class EmulateSpec:
    """``--emulate MxG:GBPS[:LATENCY_US]``: the machines and their links (sf_comm.Emulation)."""

    topology: Topology
    inter_gbps: float
    inter_latency_us: float = 0.0


def emulate_spec(text: str) -> EmulateSpec:
    """A ``type=`` for ``--emulate MxG:GBPS[:LATENCY_US]``, e.g. ``2x2:0.4`` or ``2x2:0.4:200``."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        topo = Topology.parse(parts[0])
        gbps = float(parts[1])
        latency = float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MACHINESxGPUS:GBIT_PER_S[:LATENCY_US], e.g. 2x2:0.4 or 2x2:0.4:200, "
            f"got {text!r}"
        ) from None
    if not (gbps > 0 and latency >= 0) or gbps == float("inf"):
        raise argparse.ArgumentTypeError(
            f"the link rate must be > 0 Gbit/s and the latency >= 0 us, got {text!r}"
        )
    return EmulateSpec(topo, gbps, latency)
