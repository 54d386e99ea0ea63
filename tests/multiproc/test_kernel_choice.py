"""Tier 2: every rank runs the kernel the job agreed on (Note [Kernel choice by measurement]).

Two correct fake kernels whose speed depends on the rank: alone, even ranks would take one
and odd ranks the other; ``parallel_attention`` must make every rank take the one with the
better slowest-rank time, and still be exact.
"""

from __future__ import annotations

import time

import torch

import sf_attn
import sf_comm
from sf_attn.backends import (
    AttentionBackend,
    _input_class,
    reference_attention,
    register_backend,
    unregister_backend,
)


def _kernel(delay: float):  # type: ignore[no-untyped-def]
    def fn(q, k, v, scale, key_mask):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        return reference_attention(q, k, v, scale=scale, key_mask=key_mask, dtype=torch.float32)

    return fn


def _agreed(ctx: sf_comm.Context) -> tuple[str, str, float]:
    import sf_attn.backends as backends

    even = ctx.rank % 2 == 0
    flash = unregister_backend("cpu-flash")
    kernels = {  # (alone on this rank: seconds of the probe)
        "fast-on-even": 0.0 if even else 0.03,  # slowest rank: 30 ms
        "fast-on-odd": 0.06 if even else 0.0,  # slowest rank: 60 ms
    }
    for name, delay in kernels.items():
        register_backend(
            AttentionBackend(name=name, fn=_kernel(delay), devices=frozenset({"cpu"})),
            before="meta",
        )
    try:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
        alone = min(kernels, key=kernels.__getitem__)
        out = sf_attn.parallel_attention(
            *(sf_attn.shard(t, ctx) for t in (q, k, v)), ctx=ctx, strategy="ring", seq_len=16
        )
        ref = sf_attn.shard(reference_attention(q, k, v)[0], ctx)
        chosen = backends._CHOSEN[_input_class(q, False)]
        return alone, chosen, float((out.double() - ref).abs().max())
    finally:
        for name in kernels:
            unregister_backend(name)
        register_backend(flash, before="meta")


def test_ranks_agree_on_one_kernel(ranks) -> None:
    """Catches ranks each taking their own fastest kernel: replicated results assembled from
    several ranks (text outputs) would then mix kernels that round differently."""
    results = ranks(2).run(_agreed, topology="1x2", transport="shm")
    assert {alone for alone, _, _ in results} == {"fast-on-even", "fast-on-odd"}  # would differ
    assert [chosen for _, chosen, _ in results] == ["fast-on-even", "fast-on-even"]
    assert all(err < 1e-5 for _, _, err in results), results
