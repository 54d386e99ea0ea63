"""Tier 3 (CUDA only): every strategy on the GPU at world size 1, and on 2 processes sharing
the GPU over the torch-symm transport (tools/gpu_bench.py holds the multi-process runner)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import sf_attn
import sf_comm

pytestmark = pytest.mark.gpu

STRATEGIES = ("ulysses", "ring", "usp", "tas", "torus")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_cuda_world_one(strategy: str) -> None:
    """Catches a strategy path that breaks on CUDA tensors (device mismatches, CPU-only ops)."""
    ctx = sf_comm.init(topology="1x1", transport="gloo", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 300, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    txt = tuple(
        torch.randn(2, 7, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    out, txt_out = sf_attn.parallel_attention(q, k, v, ctx=ctx, strategy=strategy, joint=txt)
    ref, _ = sf_attn.reference_attention(*(torch.cat([a, b], 1) for a, b in zip(txt, (q, k, v))))
    # bf16 inputs and outputs: ~1e-2 absolute on unit-scale values
    torch.testing.assert_close(out.double(), ref[:, 7:], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(txt_out.double(), ref[:, :7], atol=2e-2, rtol=2e-2)


def test_strategies_on_two_processes_torch_symm() -> None:
    """Catches a strategy that is exact on CPU transports but not over GPU symmetric memory."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import gpu_bench

    os.environ["SF_BENCH_TRANSPORTS"] = "torch-symm"
    results = gpu_bench.part_strategies_n()
    for key in ("torch-symm/1x2", "torch-symm/2x2"):
        assert isinstance(results[key], dict) and all(
            results[key][s].get("ok") for s in STRATEGIES
        ), results
