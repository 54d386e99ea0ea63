"""Faults: ``streamfusion generate`` / ``make-tiny`` refuse bad input up front, in one line.

Same contract as :mod:`tests.faults.test_cli` (exit status 2, one stderr line naming the
option and the value, no traceback, nothing written, under CHECK_CPU_S CPU seconds so no
rank started and no weight loaded), on real tiny pipeline directories: every check reads
the directory's JSON files only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .test_cli import CHECK_CPU_S, Bad, _streamfusion

GEN = "generate --prompt fox --out {cwd}/o.png --model-dir"
BAD = [
    Bad(f"{GEN} /nonexistent", ("--model-dir", "/nonexistent", "not a directory"), "hub", False),
    Bad(f"{GEN} {{empty}}", ("--model-dir", "model_index.json"), "from_pretrained traceback"),
    Bad(f"{GEN} {{sdxl}}", ("StableDiffusionXLPipeline", "FluxPipeline", "WanPipeline"), "ran"),
    Bad(f"{GEN} {{flux}} --height 17", ("--height", "17", "16 or 20"), "rounded silently", False),
    Bad(f"{GEN} {{flux}} --width 102", ("--width", "102", "100 or 104"), "rounded silently"),
    Bad(f"{GEN} {{flux}} --frames 5", ("--frames", "images", "wan"), "frames ignored", False),
    Bad(
        "generate --prompt fox --out {cwd}/o.mp4 --model-dir {wan} --frames 6",
        ("--frames", "6", "5 or 9"),
        "frames rounded silently",
    ),
    Bad(f"{GEN} {{flux}} --device cuda", ("--device", "cuda", "cpu"), "CUDA error late", False),
    Bad(f"{GEN} {{flux}} --world 3 --topology 2x2", ("--topology", "2x2", "3"), "mismatch"),
    Bad(f"{GEN} {{flux}} --strategy zigzag", ("--strategy", "zigzag", "torus"), "late"),
    Bad(f"{GEN} {{flux}} --transport foo", ("--transport", "foo", "shm"), "late", False),
    Bad(f"{GEN} {{flux}} --transport nccl", ("--transport", "nccl", "CPU"), "CUDA-only on CPU"),
    Bad(f"{GEN} {{flux}} --world 8 --strategy ulysses", ("--strategy", "ulysses"), "heads"),
    Bad(f"{GEN} {{flux}} --ulysses-degree 2", ("--ulysses-degree", "auto"), "degree ignored"),
    Bad(f"{GEN} {{flux}} --world 3 --cfg-parallel", ("--cfg-parallel", "1x3"), "odd CFG split"),
    Bad(
        f"{GEN} {{flux}} --world 4 --cfg-parallel",
        ("--cfg-parallel", "negative-prompt", "true-cfg-scale"),
        "CFG parallel with no guidance ran the whole job",
        False,
    ),
    Bad(f"{GEN} {{flux}} --world 4 --compile --cfg-parallel", ("--compile",), "combination"),
    Bad(f"{GEN} {{flux}} --world 4 --offload", ("--offload", "CUDA"), "offload on CPU ranks"),
    Bad(
        "generate --prompt fox --out {cwd}/o.mp4 --model-dir {wan} --true-cfg-scale 3",
        ("--true-cfg-scale", "WanPipeline"),
        "ignored",
    ),
    Bad(
        "generate --prompt fox --out {cwd}/o.mp4 --model-dir {wan} --world 2 --text sharded",
        ("--text", "sharded", "replicated", "FluxTransformer2DModel"),
        "weights loaded on every rank before the ranks refused the layout",
    ),
    Bad(
        "generate --prompt fox --out {cwd}/o.mp4 --model-dir {flux}",
        ("--out", "o.mp4", ".png"),
        "an image written as a video",
    ),
    Bad(
        "generate --prompt fox --out {cwd}/o.png --model-dir {wan}",
        ("--out", "o.png", ".mp4"),
        "a video written as one PNG",
    ),
    Bad(f"{GEN} {{flux}} --seed -1", ("--seed", "-1"), "negative seed"),
    Bad(f"{GEN} {{flux}} --dtype fp64", ("--dtype", "fp64"), "argparse usage block"),
    Bad("generate --prompt fox --model-dir {flux}", ("--out",), "nothing written"),
    Bad("make-tiny {cwd}/t --model sdxl", ("--model", "sdxl", "flux"), "usage block", False),
    Bad("make-tiny {flux} --model flux", ("dir", "not an empty directory"), "overwrote"),
]


@pytest.fixture(scope="module")
def dirs(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-dirs")
    (root / "empty").mkdir()
    sdxl = root / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return {
        "empty": root / "empty",
        "sdxl": sdxl,
        "flux": Path(tiny_pipeline("flux")),
        "wan": Path(tiny_pipeline("wan")),
    }


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b, id=b.argv.replace(GEN, "").strip(), marks=[pytest.mark.slow] * b.slow)
        for b in BAD
    ],
)
def test_bad_generate_option_is_one_line_exit_2(
    bad: Bad, dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Catches a bad generate option that loads weights or starts ranks before failing, fails
    with a traceback, or rounds/ignores a value silently (e.g. 17 px rendered at 16)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    argv = bad.argv.format(cwd=cwd, **dirs).split()
    proc, cpu_s = _streamfusion(argv, cwd)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (bad.bug, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, bad.bug
    assert len(lines) == 1 and "error" in lines[0], (bad.bug, proc.stderr)
    for word in bad.says:
        assert word in lines[0], (bad.bug, word, lines[0])
    assert cpu_s < CHECK_CPU_S, (bad.bug, f"{cpu_s:.1f} CPU-s: did it start the job?")
    assert not list(cwd.iterdir()), (bad.bug, "wrote output before failing")


def test_world_disagreeing_with_torchrun_is_one_line(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Catches --world being ignored (or the job starting) when torchrun started a different
    number of processes: the variables torchrun sets make this process rank 0 of 2."""
    env = {
        **os.environ,
        "TORCHELASTIC_RUN_ID": "test",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    cmd = [sys.executable, "-m", "sf_models.generate", "--model-dir", str(dirs["flux"])]
    cmd += ["--prompt", "fox", "--out", str(tmp_path / "o.png"), "--world", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and "--world" in line and "torchrun started 2" in line, line


def test_self_launching_commands_refuse_torchrun(tmp_path: Path) -> None:
    """Catches `streamfusion run` under torchrun running the whole job once per process, each
    on a rank pool of its own (N jobs where one was meant), silently."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0"}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    cmd = [sys.executable, "-m", "sf_models.cli", "run", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and "torchrun" in line and "sf_models.generate" in line, line
    assert not (tmp_path / "o").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGKILL, id="SIGKILL"),
        pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
    ],
)
def test_killing_generate_stops_its_ranks(
    dirs: dict[str, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    """Catches self-launched ranks outliving the command that started them: killed (SIGKILL)
    or terminated (SIGTERM, a scheduler's stop) mid-denoising, the ranks kept running the
    whole job as orphans (a rank reads its pipe's EOF only between jobs)."""
    cmd = [sys.executable, "-m", "sf_models.cli", "generate", "--model-dir", str(dirs["flux"])]
    cmd += ["--prompt", "fox", "--world", "2", "--steps", "5000", "--out", str(tmp_path / "o.png")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ranks: list[int] = []
    try:
        seen = b""
        assert proc.stderr is not None
        while b"it/s" not in seen and b"s/it" not in seen:  # the progress bar: denoising
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"the command ended before denoising: {seen[-2000:]!r}"
            seen += chunk
        ranks = _children(proc.pid)
        assert ranks, "no rank processes found"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), "ranks outlived the command"
    finally:
        proc.kill()
        for r in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(r, signal.SIGKILL)
