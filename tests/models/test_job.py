"""Tier 2: the main job (``streamfusion run``) end to end, with and without CFG parallel."""

from __future__ import annotations

import pytest
import torch

from sf_models import job
from sf_models.cli import main


def test_run_job_matches_single_process_with_cfg_parallel(tmp_path) -> None:
    """Catches the main job reporting success while its ranks diverge from one process, and a
    CFG-parallel split that swaps or drops a guidance branch (the error would be ~1e-1)."""
    report = job.run(
        world=4,
        topology="2x2",
        transport="shm",
        strategies=("torus",),
        config=None,
        height=80,
        width=64,
        text=5,
        steps=2,
        dtype=torch.float32,
        cfg_scale=3.0,
        cfg_parallel=True,
        out=str(tmp_path),
    )
    assert report["tokens"] == 20
    assert report["strategies"]["torus"]["rel_err"] < 1e-4
    assert (tmp_path / "trace-torus.json").stat().st_size > 0
    assert (tmp_path / "timeline-torus.png").stat().st_size > 0


def test_cli_rejects_impossible_cfg_split(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a CFG-parallel run that starts ranks on a topology it cannot halve."""
    assert main(["run", "--cfg-parallel", "--world", "3", "--topology", "1x3"]) == 2
    assert "2 must divide the machines (1) or the GPUs per machine (3)" in capsys.readouterr().err
