"""Tier 3 (CUDA only): ``backend="streamfusion"`` at world size 1 on FLUX.1-sized blocks."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_world_of_one_equals_inductor_on_cuda() -> None:
    """Catches the backend changing what Inductor compiles on CUDA with one rank (a rewritten
    graph, another inner config): the outputs must be bit-identical to plain Inductor's."""
    pytest.importorskip("diffusers")
    from sf_compile.compile_bench import benchmark_world1, flux_stack

    model, inputs = flux_stack(
        "flux1", grid=(32, 32), layers=(1, 1), dtype=torch.bfloat16, device="cuda"
    )
    result = benchmark_world1(model, inputs, repeats=3, warmup=1)
    assert result.max_abs_diff == 0.0
