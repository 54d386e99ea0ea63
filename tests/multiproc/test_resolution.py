"""Tier 2: one resolution path. The plan a job prints, the plan ``parallel_attention`` runs
and the plan the compiler's overlap pass uses are one object for the same layer.

Every call of the cached resolution is recorded on each rank (a spy around
``sf_attn.resolution._resolve``, which ``resolve`` calls at call time).
"""

from __future__ import annotations

from typing import Any

import torch

import sf_attn
import sf_attn.resolution as resolution
import sf_comm


def _recording(fn: Any) -> tuple[Any, list[Any]]:
    seen: list[Any] = []

    def spy(*args: Any) -> Any:
        out = fn(*args)
        seen.append(out)
        return out

    return spy, seen


def _same_plan_everywhere(ctx: sf_comm.Context, strategy: str) -> dict[str, bool]:
    from sf_compile.ops import register_context
    from sf_compile.overlap import overlap_plan

    batch, seq, heads, dim, text = 2, 24, 4, 8, 5
    layer = dict(heads=heads, head_dim=dim, dtype=torch.float32, batch=batch, text_len=text)
    real = resolution._resolve
    resolution._resolve, seen = _recording(real)  # type: ignore[assignment]
    try:
        printed = sf_attn.resolve(ctx, seq_len=seq, strategy=strategy, **layer)  # type: ignore[arg-type]
        q = torch.randn(batch, seq, heads, dim)
        t = torch.randn(batch, text, heads, dim)
        shards = [sf_attn.shard(q, ctx) for _ in range(3)]
        sf_attn.parallel_attention(*shards, ctx=ctx, strategy=strategy, joint=(t, t, t))
        run = seen[-1]
        compiled = overlap_plan(register_context(ctx), strategy, tokens=seq, **layer)  # type: ignore[arg-type]
    finally:
        resolution._resolve = real  # type: ignore[assignment]
    return {
        "printed is run": printed is run,
        # None: nothing to overlap (Ulysses degree 1 or torus); else the very same plan
        "compiled is run": compiled is run if compiled is not None else strategy == "auto",
    }


def _job_plan_is_the_run_plan(ctx: sf_comm.Context) -> list[bool]:
    from sf_models import job, parallelize

    model = job.build_model(None, torch.float32)
    inputs = job.make_inputs(model, 128, 128, 7, torch.float32)
    sp = parallelize(model, ctx=ctx, strategy="auto")
    # what `run` prints
    printed = job.attention_plan(ctx, model, inputs, torch.float32, text=sp.state.text)
    velocity = job.cfg_velocity(sp, inputs, 1.0)
    real = resolution._resolve
    resolution._resolve, seen = _recording(real)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            velocity(inputs["hidden_states"], torch.ones(1))
    finally:
        resolution._resolve = real  # type: ignore[assignment]
    return [bool(seen), *(run is printed for run in seen)]


def test_job_prints_the_plan_its_layers_run(ranks) -> None:
    """Catches the main job printing a plan resolved without the layer's batch, text length
    or text layout (sharded text is sequence), which could differ from the strategy its
    attention layers ran."""
    for rank, checks in enumerate(
        ranks(4).run(_job_plan_is_the_run_plan, topology="2x2", transport="shm")
    ):
        assert all(checks), (rank, checks)


def test_printed_run_and_compiled_plans_are_one_object(ranks) -> None:
    """Catches the three call sites resolving ``auto`` with different arguments (the API
    passed batch and text length, the job and the compiler did not), so that the plan
    printed, run and compiled could differ."""
    for strategy in ("usp", "auto"):
        results = ranks(4).run(_same_plan_everywhere, strategy, topology="2x2", transport="shm")
        for rank, checks in enumerate(results):
            assert all(checks.values()), (strategy, rank, checks)
