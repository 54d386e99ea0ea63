"""Tier 2: ``sf_models.parallelize`` on a tiny diffusers ``FluxTransformer2DModel``.

Every rank builds the same random-weight model and inputs from a shared seed, runs the
parallelized model on the full inputs and compares its (full) output with the original model
run in one process on the same inputs (tolerance: see ``tests/models/_common.py``; measured
here 2e-7, while rank 0's RoPE rows on every rank give 9e-3), with the text tokens replicated
on every rank or sharded like the image tokens (``text=``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel

import sf_comm
from sf_attn import chunk_sizes
from sf_models.flux import FLUX_PLAN
from sf_models.parallelize import parallelize
from sf_models.plan import SequenceParallelPlan, TextLayout, supported_models

from ._common import (
    STRATEGIES,
    WORLDS,
    assert_matches,
    check_work_split,
    compare,
    error_messages,
)

BATCH, GRID, TEXT = 2, (5, 7), 6  # 35 image tokens: uneven over 2 and 4 ranks
IMG = GRID[0] * GRID[1]
HEADS = 4
LAYERS = 2  # one dual-stream + one single-stream block, one attention each


def make_model(heads: int = HEADS) -> Any:  # a FluxTransformer2DModel (diffusers is untyped)
    torch.manual_seed(0)  # same weights on every rank
    model: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    return model.eval()


def make_inputs(text: int = TEXT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cols = GRID[1]
    img_ids = torch.zeros(IMG, 3)
    img_ids[:, 1] = torch.arange(IMG) // cols
    img_ids[:, 2] = torch.arange(IMG) % cols
    txt_ids = torch.zeros(text, 3)
    txt_ids[:, 0] = torch.arange(text)  # distinct text positions: a misplaced RoPE row shows
    return dict(
        hidden_states=torch.randn(BATCH, IMG, 16, generator=g),
        encoder_hidden_states=torch.randn(BATCH, text, 32, generator=g),
        pooled_projections=torch.randn(BATCH, 32, generator=g),
        timestep=torch.rand(BATCH, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def make_model_for_text(text: int) -> Any:
    """:func:`make_model` (the helpers pass ``make_inputs``' arguments to both builders)."""
    return make_model()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_flux_matches_single_process(ranks, world: int, topo: str, strategy: str) -> None:
    """Catches a wrong sequence split inside Flux: RoPE rows not matching the rank's image
    chunk, the single-stream block's text part sharded instead of replicated, text output that
    differs per rank, a dropped/duplicated uneven last chunk (35 tokens), or an output gathered
    in the wrong order. Also catches the installed processors changing what the original model
    computes when called outside the wrapper, and the positional / tuple-output path breaking.
    """
    # Positional arguments and return_dict=False take the tuple path through the wrapper.
    results = ranks(world).run(
        compare,
        strategy,
        make_model,
        make_inputs,
        positional=True,
        text="replicated",
        topology=topo,
        transport="shm",
    )
    assert_matches(results)
    assert all(r["text_rows"] == TEXT for r in results), results  # every rank: all text


@pytest.mark.parametrize("text", [TEXT, 3])  # over 4 ranks: 2, 2, 1, 1 and 1, 1, 1, 0 tokens
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_text_matches_single_process(ranks, strategy: str, text: int) -> None:
    """Catches a wrong text split under ``text="sharded"``: RoPE rows of the wrong text tokens
    (txt_ids not split like encoder_hidden_states), the single-stream block cutting its
    [text, image] stream at the full text length instead of this rank's share, text chunks
    of uneven size (6 over 4 ranks) or an empty one (3 over 4) dropped or misplaced, and the
    text stream still computed whole on every rank (the text embedder must see only this
    rank's chunk).
    """
    results = ranks(4).run(
        compare,
        strategy,
        make_model_for_text,
        make_inputs,
        text,
        text="sharded",
        topology="2x2",
        transport="shm",
    )
    assert_matches(results)
    for rank, res in enumerate(results):
        assert res["text_layout"] == "sharded", (rank, res)
        assert res["text_rows"] == chunk_sizes(text, 4)[rank], (rank, res)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_work_is_split(ranks, strategy: str) -> None:
    """Catches a parallelize that gives correct numbers without splitting the work: e.g. every
    rank attending the full image sequence (processor falling back to local attention on
    gathered tokens), or image queries computed twice across ranks.

    Full attention per layer is (text + image) queries x (text + image) keys x heads. Every
    pair, text queries included (each text row has one owner), must be computed exactly once
    in total and about 1/world on each rank (within a few rows' share, as 35 tokens do not
    split evenly), with text replicated and with text sharded.
    """  # text queries are told apart by their length
    seq = TEXT + IMG
    full_image = LAYERS * BATCH * IMG * seq * HEADS
    full_text = LAYERS * BATCH * TEXT * seq * HEADS
    check_work_split(
        ranks,
        strategy,
        make_model,
        make_inputs,
        full_video=full_image,
        full_text=full_text,
        tokens=IMG,
    )


def test_text_layout_is_resolved() -> None:
    """Catches ``text="auto"`` not choosing the sharded layout Flux supports (every rank
    would then run the whole text stream), a layout asked for being ignored, and a misspelt
    layout being accepted (the message must list the allowed ones)."""
    ctx: Any = None  # strategy "auto": nothing here touches the context
    cases: list[tuple[TextLayout, str]] = [
        ("auto", "sharded"),
        ("sharded", "sharded"),
        ("replicated", "replicated"),
    ]
    for text, resolved in cases:
        assert parallelize(make_model(), ctx=ctx, text=text).state.text == resolved, text
    with pytest.raises(
        ValueError, match=r"text must be one of \['auto', 'replicated', 'sharded'\], got 'split'"
    ):
        parallelize(make_model(), ctx=ctx, text="split")  # type: ignore[call-overload]


def _errors(ctx: sf_comm.Context) -> list[str]:
    cases = [
        lambda: parallelize(make_model(heads=2), ctx=ctx, strategy="ulysses"),  # 2 heads, 4 ranks
        lambda: parallelize(make_model(), ctx=ctx, strategy="spiral"),
        lambda: parallelize(parallelize(make_model(), ctx=ctx, strategy="ring").module, ctx=ctx),
        lambda: parallelize(make_model(), ctx=ctx, strategy="ring")(
            **make_inputs(), controlnet_block_samples=[torch.zeros(BATCH, IMG, 16)]
        ),
    ]
    return error_messages(cases)


def test_errors_name_the_problem(ranks) -> None:
    """Catches bad configurations failing late or obscurely: heads the strategy cannot split
    must fail in parallelize() with sf_attn's message (not mid-forward or as a hang), as must an
    unknown strategy, a second parallelize of the same model (whose old wrapper would silently
    compute garbage), and inputs the plan cannot shard (ControlNet residuals).
    """
    msgs = ranks(4).run(_errors, topology="2x2", transport="shm")[0]
    assert "needs at least 4 heads, got 2" in msgs[0], msgs[0]
    assert "unknown strategy 'spiral'" in msgs[1], msgs[1]
    assert "already parallelized" in msgs[2], msgs[2]
    assert "'controlnet_block_samples' is not supported" in msgs[3], msgs[3]


def test_unsupported_model_lists_supported() -> None:
    """Catches an unknown model being wrapped silently (it would run unsplit or crash deep in
    forward) instead of a ValueError that names the supported classes."""
    with pytest.raises(
        ValueError, match=r"no sequence-parallel plan for Linear.*FluxTransformer2DModel"
    ):
        parallelize(torch.nn.Linear(2, 2), ctx=None, strategy="ring")  # type: ignore[arg-type]
    assert "FluxTransformer2DModel" in supported_models()


def test_plan_validation() -> None:
    """Catches malformed plans being accepted and failing later at a model's first call."""
    with pytest.raises(ValueError, match="split_inputs is empty"):
        SequenceParallelPlan(split_inputs={}, attach=FLUX_PLAN.attach)
    with pytest.raises(ValueError, match=r"\['x'\] are both split and replicated"):
        SequenceParallelPlan(
            split_inputs={"x": 1}, replicated_inputs={"x": 1}, attach=FLUX_PLAN.attach
        )
    with pytest.raises(ValueError, match="must map str -> int dim"):
        SequenceParallelPlan(split_inputs={"x": "1"}, attach=FLUX_PLAN.attach)  # type: ignore[dict-item]
    with pytest.raises(
        ValueError, match=r"sharded_text_inputs \['t'\] are not in replicated_inputs"
    ):
        SequenceParallelPlan(
            split_inputs={"x": 1}, sharded_text_inputs={"t": 1}, attach=FLUX_PLAN.attach
        )
    with pytest.raises(ValueError, match=r"sharded_text_inputs must map str -> int dim"):
        SequenceParallelPlan(
            split_inputs={"x": 1},
            replicated_inputs={"t": 1},
            sharded_text_inputs={"t": None},  # type: ignore[dict-item]
            attach=FLUX_PLAN.attach,
        )
    assert dict(FLUX_PLAN.split_inputs) == {"hidden_states": 1, "img_ids": -2}
    assert dict(FLUX_PLAN.sharded_text_inputs) == {"encoder_hidden_states": 1, "txt_ids": -2}
