"""Tier 1: sf_models' modules import in a fresh interpreter and its plan registries are
complete whatever is imported first (import circles: tests/unit/test_imports.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sf_models

PACKAGE = Path(sf_models.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Catches a module that fails to import on its own (a name imported from where it no
    longer lives), and plan registries that are complete only after some other module was
    imported: the first import here is of the plan registry module, not of the models."""
    code = f"""
import importlib, json
import sf_models.plan, sf_models.cfg
registered = [sf_models.plan.supported_models(), sf_models.cfg.supported_cfg_pipelines()]
for name in {[m for m in MODULES if m != "__init__"]!r}:
    importlib.import_module("sf_models." + name)
print(json.dumps(registered))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    models, pipelines = json.loads(done.stdout.strip().splitlines()[-1])
    assert models == [
        "CogVideoXTransformer3DModel",
        "FluxTransformer2DModel",
        "HunyuanVideoTransformer3DModel",
        "SD3Transformer2DModel",
        "WanTransformer3DModel",
    ]
    assert pipelines == [
        "CogVideoXPipeline",
        "FluxPipeline",
        "HunyuanVideoPipeline",
        "StableDiffusion3Pipeline",
        "WanPipeline",
    ]


def test_simulated_text_layout_is_the_models() -> None:
    """Catches ``streamfusion simulate --text auto`` costing a layout other than the one
    ``parallelize(..., text="auto")`` runs: for every simulated model with a plan, the
    simulated layout is "sharded" exactly where the plan shards text."""
    from sf_attn.sim.models import get_model
    from sf_attn.sim.step import rows_text
    from sf_models.plan import sharded_text_models

    classes = {
        "flux": "FluxTransformer2DModel",
        "sd3": "SD3Transformer2DModel",
        "cogvideox": "CogVideoXTransformer3DModel",
        "hunyuanvideo": "HunyuanVideoTransformer3DModel",
        "wan": "WanTransformer3DModel",
    }
    sharded = set(sharded_text_models())
    for model, cls in classes.items():
        assert (rows_text(get_model(model), "auto") == "sharded") == (cls in sharded), model
        assert rows_text(get_model(model), "replicated") == "replicated"
