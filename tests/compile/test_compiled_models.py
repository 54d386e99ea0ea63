"""Tier 2: ``torch.compile(model, backend="streamfusion")`` on 2 and 4 CPU ranks.

Every rank builds the same random-weight model and full inputs from a shared seed, runs it
eagerly (the single-process reference) and compiled, and compares. The compiled model must
take and return full tensors on every rank, like eager, with the token sequence split inside.

Most tests use ``inner_backend="eager"`` (Dynamo + the FX pass, then the rewritten graph run
as is: seconds); one per world size hands the graph to Inductor (tens of seconds, marked
``compile``), which checks the custom ops' fake implementations and strides as well.

Tolerance: float32 throughout. Only attention differs from the reference arithmetically
(sf_attn's blockwise online-softmax merges vs SDPA over all keys, ~1e-7 relative per layer;
measured 1.2e-7 to 1.8e-7 relative to the largest output here). 1e-5 leaves margin for
summation order (Inductor fuses differently) while a wrong slice, a dropped or duplicated
token block, a mis-sliced positional embedding or RoPE row moves outputs by ~1e-2 or more.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sf_attn.hybrid
import sf_comm

from .models import FLUX_HEADS, FLUX_IMAGE_TOKENS, FLUX_TEXT, build

REL_TOL = 1e-5  # see the module docstring
TOPOLOGY = {2: "1x2", 4: "2x2"}


def _run(ctx: sf_comm.Context, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """On every rank: eager reference, compiled run, and this rank's attention work in
    sf_attn: (query, key) pairs x heads."""
    torch._dynamo.reset()
    model, kwargs, output = build(name)
    pairs = {"all": 0}
    original = sf_attn.hybrid.attention_with_lse

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        pairs["all"] += q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return original(q, k, v, **kw)

    # torch.compile annotates options as str/int/bool/callable values; the backend also
    # takes a Context.
    all_options: dict[str, Any] = {"ctx": ctx, **options}
    with torch.no_grad():
        ref = output(model(**kwargs))
        compiled = torch.compile(model, backend="streamfusion", dynamic=False, options=all_options)
        start = time.perf_counter()
        outs = output(compiled(**kwargs))  # first call compiles
        compile_s = time.perf_counter() - start
        sf_attn.hybrid.attention_with_lse = counting
        try:
            again = output(compiled(**kwargs))
        finally:
            sf_attn.hybrid.attention_with_lse = original
    every = [sf_comm.all_gather(ctx, ctx.group("world"), o.contiguous()).wait() for o in outs]
    return dict(
        rel_err=[((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, ref)],
        shapes_ok=all(o.shape == r.shape for o, r in zip(outs, ref)),
        same_on_every_rank=all(torch.equal(e[0], t) for e in every for t in e),
        deterministic=all(torch.equal(a, b) for a, b in zip(outs, again)),
        pairs=pairs["all"],
        compile_s=compile_s,
    )


def _check(results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        assert res["shapes_ok"], (rank, res)
        assert max(res["rel_err"]) < REL_TOL, (rank, res)
        assert res["same_on_every_rank"], (rank, res)
        assert res["deterministic"], (rank, res)


def _check_work(
    results: list[dict[str, Any]], world: int, full: int, rows: int, rows_off: int = 1
) -> None:
    """(query, key) pairs, joint-text queries included (each text row has one owner, Note
    [Text rows owned once]): computed once in total, ~1/world on each rank (within
    ``rows_off`` query rows' share of ``rows``: tokens and text rows do not split evenly)."""
    pairs = [res["pairs"] for res in results]
    assert sum(pairs) == full, (pairs, full)
    for rank, p in enumerate(pairs):
        assert abs(p / full - 1 / world) <= rows_off / rows, (rank, p / full)


# TinyDiT: 2 blocks x batch 2 x 4 heads x 35 x 35 self-attention pairs (cross-attention to
# text runs locally on each rank's query rows and is not counted here).
DIT_TOKENS = 35
DIT_FULL_PAIRS = 2 * 2 * 4 * DIT_TOKENS * DIT_TOKENS


@pytest.mark.parametrize("world", [2, 4])
def test_tiny_dit_matches_eager(ranks, world: int, tmp_path: Path) -> None:
    """Catches, on the hand-written DiT (patchify reshape, learned positional embedding,
    adaLN timestep modulation, fused QKV, RMS-normed q/k, self- and cross-attention, pooled
    mean output, unpatchify reshape): a wrong split or gather anywhere, the positional
    embedding not sliced to the rank's rows, the timestep sliced, the pooled mean taken over
    one rank's tokens, outputs that differ between ranks, and attention work that is not
    split (each rank must do ~1/world of the query x key pairs, all of them done once).
    Also checks the debug dump lists what was sharded, replaced and gathered."""
    options = {"inner_backend": "eager", "debug": str(tmp_path)}
    results = ranks(world).run(_run, "tiny_dit", options, topology=TOPOLOGY[world], transport="shm")
    _check(results)
    _check_work(results, world, DIT_FULL_PAIRS, DIT_TOKENS)
    dumps = sorted(tmp_path.iterdir())
    assert [d.name for d in dumps] == [f"rank{r}_graph000.txt" for r in range(world)]
    text = dumps[-1].read_text()
    for line in (
        f"streamfusion: rank {world - 1} of {world}",
        "l_self_parameters_pos_embed_: tokens on dim 1 (35)",  # sliced where it enters
        "reshape: tokens on dim 1 (35)",  # the patchify reshape forms the tokens
        "attn: streamfusion::attention (35 tokens)",
        "local (keys/values whole)",  # cross-attention to text
        "mean: mean over the token dim needs all tokens",
        "reshape_3: reshape merges or splits the token dim",  # unpatchify
        "=== rewritten graph (this rank) ===",
    ):
        assert line in text, line
    assert "l_t_" not in text.split("sharded where they enter")[1].split("sliced")[0]


@pytest.mark.compile
def test_tiny_dit_inductor(ranks) -> None:
    """Catches what only Inductor sees: custom-op fake implementations whose shapes or
    strides differ from the real ops (Inductor asserts them), layouts Inductor re-derives
    from stale metadata, and ops it cannot call. 2 ranks, Inductor as the inner backend."""
    results = ranks(2).run(_run, "tiny_dit", {}, topology="1x2", transport="shm", timeout=600)
    _check(results)
    _check_work(results, 2, DIT_FULL_PAIRS, DIT_TOKENS)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["flux", "wan"])
def test_diffusers_models_match_eager(ranks, name: str, world: int) -> None:
    """Catches, on stock diffusers models traced by Dynamo: Flux's joint text+image stream
    (text must stay whole on every rank while image tokens are split; RoPE tables cut to the
    same joint layout; the single-stream block's text slice) and Wan's 3-D patch embedding
    (tokens formed by flatten), in-place RoPE writes and cross-attention to text. Each rank's
    attention work, text queries included, must be ~1/world, every pair done once."""
    results = ranks(world).run(
        _run, name, {"inner_backend": "eager"}, topology=TOPOLOGY[world], transport="shm"
    )
    _check(results)
    if name == "flux":  # 2 joint attentions (dual + single block) x batch 2 x 4 heads
        seq = FLUX_IMAGE_TOKENS + FLUX_TEXT  # queries and keys: text + image
        _check_work(results, world, 2 * 2 * FLUX_HEADS * seq * seq, seq, rows_off=2)
    else:  # Wan: 2 self-attentions x batch 2 x 4 heads x 45 x 45 (cross-attention is local)
        _check_work(results, world, 2 * 2 * 4 * 45 * 45, 45)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ulysses", "ring", "usp", "tas"])
def test_every_strategy(ranks, strategy: str) -> None:
    """Catches a strategy the backend passes wrongly to sf_attn (all must give the eager
    numbers and split the work) on 4 ranks, 2x2."""
    results = ranks(4).run(
        _run,
        "tiny_dit",
        {"inner_backend": "eager", "strategy": strategy},
        topology="2x2",
        transport="shm",
    )
    _check(results)
    _check_work(results, 4, DIT_FULL_PAIRS, DIT_TOKENS)


def _overlap_on_off(ctx: sf_comm.Context, name: str) -> dict[str, Any]:
    """Compile with the overlap schedule on and off (the inner backend records the rewritten
    graph and runs it as is); both outputs, the overlapped ops, leftover exchanges."""
    from sf_compile.overlap import pending

    outs, finishes = {}, {}
    for overlap in (True, False):
        torch._dynamo.reset()
        model, kwargs, output = build(name)
        graphs: list[torch.fx.GraphModule] = []

        def record(
            gm: torch.fx.GraphModule, example_inputs: Any, graphs: list[Any] = graphs
        ) -> Any:
            graphs.append(gm)
            return gm.forward

        with torch.no_grad():
            ref = output(model(**kwargs))
            options: dict[str, Any] = {"ctx": ctx, "inner_backend": record, "overlap": overlap}
            compiled = torch.compile(model, backend="streamfusion", dynamic=False, options=options)
            outs[overlap] = output(compiled(**kwargs))
        finishes[overlap] = sum(
            n.target is torch.ops.streamfusion.attention_overlapped.default
            for gm in graphs
            for n in gm.graph.nodes
        )
    return dict(
        bit_equal=all(torch.equal(a, b) for a, b in zip(outs[True], outs[False])),
        rel_err=[((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outs[True], ref)],
        overlapped_ops=finishes[True],
        plain_graph_overlapped_ops=finishes[False],
        left_pending=len(pending()),
    )


@pytest.mark.parametrize("name", ["tiny_dit", pytest.param("flux", marks=pytest.mark.slow)])
def test_overlap_schedule_gives_the_same_numbers(ranks, name: str) -> None:
    """Catches the overlapped schedule (V's exchange started early, Q/K's after their
    norms, the ring and the way back in a separate op) computing anything different from
    the plain op: same exchanges, same ring, so bit-identical outputs, on 4 ranks (2x2, where
    the planner picks a layout with a Ulysses exchange). Also catches an exchange started and
    never finished (a leak that would pair wrong tensors on the next call)."""
    results = ranks(4).run(_overlap_on_off, name, topology="2x2", transport="shm")
    for rank, res in enumerate(results):
        assert res["bit_equal"], (rank, res)
        assert max(res["rel_err"]) < REL_TOL, (rank, res)
        assert res["overlapped_ops"] == 2 and res["plain_graph_overlapped_ops"] == 0, (rank, res)
        assert res["left_pending"] == 0, (rank, res)


def _compile_barrier(ctx: sf_comm.Context, slow_s: float, timeout_s: float) -> tuple[float, str]:
    """Rank 0 "compiles" for ``slow_s``; how long each rank waits in the barrier, and why not."""
    from sf_compile.backend import COMPILE_TIMEOUT_ENV, _compiled_barrier

    os.environ[COMPILE_TIMEOUT_ENV] = str(timeout_s)
    try:
        if ctx.rank == 0:
            time.sleep(slow_s)
        start = time.perf_counter()
        try:
            _compiled_barrier(ctx)
            error = ""
        except sf_comm.CommTimeout as exc:
            error = str(exc)
        return time.perf_counter() - start, error
    finally:
        del os.environ[COMPILE_TIMEOUT_ENV]


def test_ranks_leave_the_backend_together(ranks) -> None:
    """Catches a rank starting the compiled graph's first collective while another still
    compiles (its wait would count against the transport's short timeout, and fail with
    cold Inductor caches): ranks must wait for each other after compiling, with their own
    long timeout, and say so clearly when that runs out."""
    waits = ranks(2).run(_compile_barrier, 1.0, 60.0, topology="1x2", transport="shm")
    assert waits[1][0] > 0.8 and waits[0][0] < 0.5 and not waits[0][1] and not waits[1][1], waits
    waits = ranks(2).run(_compile_barrier, 1.5, 0.3, topology="1x2", transport="shm")
    assert "waited 0s for the other ranks to finish compiling (1 of 2 done" in waits[1][1], waits
    assert not waits[0][1], waits
