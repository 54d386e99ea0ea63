"""Faults: a mistake on the ``streamfusion`` command line fails up front, in one line.

Each bad invocation runs the real command in a subprocess and must end with exit status 2,
exactly one non-empty line on stderr that names the option (and the bad value), no
traceback, nothing written to the working directory, and cheaply: the command and
everything it started must use under CHECK_CPU_S seconds of CPU. CPU time rather than wall
time, because other jobs share this 2-core box (a 5 s command has taken 27 s of wall time).
Every subprocess pays ~5 CPU-s of imports (torch, diffusers), so a representative case per
sub-command runs by default and the rest with ``--run-slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

STREAMFUSION = [sys.executable, "-m", "sf_models.cli"]

# An error costs the imports, ~5 CPU-s; a pool of 4 ranks alone costs ~10 CPU-s more (each
# rank imports torch), a model build and a reference denoising more still.
CHECK_CPU_S = 12.0
# A command that got past its checks is killed (with any ranks it started) after this.
TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad command line, the words its error line must contain, and the bug it catches."""

    argv: str
    says: tuple[str, ...]
    bug: str
    slow: bool = True


BAD = [
    # run
    Bad("run --strategy zigzag", ("--strategy", "zigzag", "torus"), "35 s then a traceback", False),
    Bad("run --transport foo", ("--transport", "foo", "shm"), "unknown transport at rank start"),
    Bad("run --transport nccl", ("--transport", "nccl", "CPU"), "CUDA-only transport on CPU"),
    Bad("run --config /nonexistent", ("--config", "/nonexistent"), "hub lookup", False),
    Bad("run --config {empty}", ("--config", "config.json"), "directory without config"),
    Bad("run --config {no_weights}", ("--config", "weights"), "config without weights"),
    Bad("run --topology abc", ("--topology", "abc", "MACHINESxGPUS"), "topology traceback"),
    Bad("run --topology 0x4", ("--topology", "0x4"), "zero machines"),
    Bad("run --world 3 --topology 2x2", ("--topology", "2x2", "3"), "world/topology mismatch"),
    Bad("run --world -2", ("--world", "-2", ">= 1"), "negative world"),
    Bad("run --world 0", ("--world", "'0'", ">= 1"), "world 0 ran 4 ranks"),
    Bad("run --world abc", ("--world", "abc"), "argparse usage block"),
    Bad("run --out /dev/null/x", ("--out", "/dev/null/x"), "output written after the run"),
    Bad("run --height 17", ("--height", "17", "16"), "17 px ran at 16 px", False),
    Bad("run --height 0", ("--height", "'0'"), "height 0 printed nan"),
    Bad("run --width 100", ("--width", "100", "16"), "width rounded down silently"),
    Bad("run --steps 0", ("--steps", "'0'"), "steps 0 failed late"),
    Bad("run --text -1", ("--text", "-1", ">= 0"), "negative text length"),
    Bad("run --cfg-scale 0.5", ("--cfg-scale", "0.5", ">= 1"), "scale < 1 silently ignored"),
    Bad("run --cfg-scale nan", ("--cfg-scale", "nan"), "nan guidance scale"),
    Bad("run --cfg-parallel --world 3", ("--cfg-parallel", "1x3"), "odd CFG split"),
    Bad("run --cfg-parallel --cfg-scale 1", ("--cfg-scale", "1"), "CFG parallel, no guidance"),
    Bad("run --world 16 --strategy ulysses", ("--strategy", "ulysses", "8"), "heads split late"),
    Bad("run --compile nope", ("--compile", "nope", "inductor"), "unknown inner backend"),
    Bad("run --dtype fp64", ("--dtype", "fp64", "fp32"), "argparse usage block"),
    Bad("run --model sd3", ("--model", "sd3", "flux"), "argparse usage block"),
    Bad("run --frobnicate", ("--frobnicate", "streamfusion run"), "usage block, top prog"),
    # trace
    Bad("trace --strategy zigzag", ("--strategy", "zigzag"), "traceback from the ranks"),
    Bad("trace --ulysses-degree 3", ("--ulysses-degree", "3", "[1, 2, 4]"), "degree not laid out"),
    Bad("trace --strategy auto --ulysses-degree 2", ("--ulysses-degree",), "degree ignored"),
    Bad("trace --ulysses-degree 0", ("--ulysses-degree", "'0'"), "degree 0"),
    Bad("trace --heads 0", ("--heads", "'0'"), "zero heads"),
    Bad("trace --seq -4", ("--seq", "-4"), "negative sequence"),
    Bad("trace --world 8 --topology 2x2", ("--topology", "2x2", "8"), "--world ignored"),
    Bad("trace --transport foo", ("--transport", "foo"), "unknown transport at rank start"),
    Bad("trace --out /dev/null/x", ("--out", "/dev/null/x"), "output fails after the trace"),
    # simulate
    Bad("simulate --gpus-per-machine 0", ("--gpus-per-machine", "'0'"), "0 used 8", False),
    Bad("simulate --gpus-per-machine 3", ("--gpus-per-machine", "3", "p4de"), "NIC traceback"),
    Bad("simulate --machines 0", ("--machines", "'0'"), "exit status 1"),
    Bad("simulate --height 8", ("--height", "8", "16"), "smaller than a token"),
    Bad("simulate --height 0", ("--height", "'0'"), "height 0 used the native size"),
    Bad("simulate --model wan --frames 0", ("--frames", "'0'"), "zero frames"),
    Bad("simulate --seconds 0", ("--seconds", "'0'"), "zero-length clip"),
    Bad("simulate --seconds 3", ("--seconds", "flux"), "traceback: image model"),
    Bad("simulate --frames 5", ("--frames", "5", "flux"), "frames of an image model"),
    Bad("simulate --steps 0", ("--steps", "'0'"), "steps 0 silently dropped"),
    Bad("simulate --plot /dev/null/x.png", ("--plot", "/dev/null/x.png"), "plot after the run"),
    Bad("simulate --plot {tmp}/x.xyz", ("--plot", "xyz", "png"), "unknown image format"),
    Bad("simulate --hardware tpu", ("--hardware", "tpu", "p4de"), "argparse usage block"),
    # bench
    Bad("bench comm --sizes-mb abc", ("--sizes-mb", "abc"), "int(float()) traceback", False),
    Bad("bench comm --sizes-mb 1,-2", ("--sizes-mb", "1,-2"), "negative size"),
    Bad("bench comm --sizes-mb 0.000001", ("--sizes-mb", "1e-06"), "empty per-rank part"),
    Bad("bench comm --world 0", ("--world", "'0'"), "world 0 ran 4 ranks"),
    Bad("bench comm --iters 0", ("--iters", "'0'"), "zero iterations"),
    Bad("bench attention --heads 2", ("--heads", "ulysses", "2"), "heads split on the ranks"),
    Bad("bench attention --world 4 --topology 2x3", ("--topology", "2x3", "4"), "mismatch"),
    Bad("bench attention --batch 0", ("--batch", "'0'"), "zero batch"),
    Bad("bench attention --head-dim -1", ("--head-dim", "-1"), "negative head dim"),
    Bad("bench everything", ("what", "memory", "comm"), "argparse usage block"),
    Bad("bench memory --world 3", ("--world", "1, 2 or 4"), "heads a world cannot split"),
    Bad("bench attention --emulate 2x2", ("--emulate", "2x2:0.4"), "an emulation without a rate"),
    Bad("bench attention --emulate 2x2:0", ("--emulate", "> 0"), "a link that moves nothing"),
    Bad("bench attention --emulate 2x2:1 --world 4", ("--emulate", "--world"), "two world sizes"),
    Bad("bench vae --emulate 2x2:1", ("--emulate", "bench attention"), "an emulation ignored"),
    Bad("run --emulate 2x2:1 --transport shm", ("--transport", "shm+gloo"), "shm past the links"),
    Bad("bench memory --grid 0x4", ("--grid", "0x4"), "an empty sequence"),
    Bad("bench vae --latent 0x4", ("--latent", "0x4"), "an empty latent decoded"),
    Bad("bench", ("what",), "argparse usage block"),
    # the command itself
    Bad("", ("command",), "argparse usage block"),
    Bad("frobnicate", ("frobnicate", "simulate"), "argparse usage block"),
]


def _streamfusion(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the command; returns it and the CPU seconds it and everything it started used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        [*STREAMFUSION, *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and the ranks it started
        out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), cpu


@pytest.mark.parametrize(
    "bad", [pytest.param(b, id=b.argv or "(none)", marks=[pytest.mark.slow] * b.slow) for b in BAD]
)
def test_bad_option_is_one_line_exit_2(bad: Bad, tmp_path: Path) -> None:
    """Catches a bad option (or combination) that starts the job anyway, fails late with a
    traceback, prints argparse's usage block, exits with a status other than 2, or writes
    anything, e.g. `run --strategy zigzag` (35 s then 76 lines), `run --world 0` (4 ranks),
    `run --height 17` (16 px under a 17 px header), `simulate --gpus-per-machine 0` (8)."""
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    paths = {"tmp": tmp_path, "empty": tmp_path / "empty", "no_weights": no_weights}
    argv = bad.argv.format(**paths).split()
    proc, cpu_s = _streamfusion(argv, cwd)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (bad.bug, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, bad.bug
    assert len(lines) == 1 and lines[0].strip(), (bad.bug, proc.stderr)
    assert "error" in lines[0], lines[0]
    for word in bad.says:
        assert word in lines[0], (bad.bug, word, lines[0])
    assert cpu_s < CHECK_CPU_S, (bad.bug, f"{cpu_s:.1f} CPU-s: did it start the job?")
    assert not list(cwd.iterdir()), (bad.bug, "wrote output before failing")


@pytest.mark.parametrize(
    "sub",
    [
        pytest.param("run", id="run"),
        *(
            pytest.param(s, id=s, marks=pytest.mark.slow)
            for s in ("", "trace", "simulate", "bench")
        ),
    ],
)
def test_help_still_works(sub: str, tmp_path: Path) -> None:
    """Catches the one-line error parser swallowing --help (it must print usage, exit 0)."""
    proc, _ = _streamfusion([*sub.split(), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: streamfusion") and proc.stderr == ""


def test_valid_simulate_still_runs(tmp_path: Path) -> None:
    """Catches the checks rejecting a valid command (here the cheapest one, no ranks)."""
    proc, _ = _streamfusion(["simulate", "--model", "flux", "--machines", "2", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["topology"]["machines"] == 2 and out["strategies"]["auto"]["latency_s"] > 0


def test_value_error_on_the_ranks_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Catches a ValueError that only the ranks can raise (it comes back inside a RankError
    with every rank's traceback) reaching the user as a traceback instead of one line, exit 2."""
    from sf_attn import tracerun
    from sf_comm.launch import RankError, RankFailure
    from sf_models.cli import main

    def fail(**_: object) -> None:
        detail = "ValueError: heads do not split\nTraceback (most recent call last):\n  ...\n"
        raise RankError("record", [RankFailure(0, "error", detail)], [None])

    monkeypatch.setattr(tracerun, "run", fail)
    assert main(["trace", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "streamfusion trace: error: heads do not split\n"
