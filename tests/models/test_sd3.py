"""Tier 2: ``sf_models.parallelize`` on a tiny diffusers ``SD3Transformer2DModel``.

Every rank builds the same random-weight model and inputs from fixed seeds, runs the
parallelized model on the full inputs and compares its (full) output with the original model
run in one process (tolerance: see ``tests/models/_common.py``). The config has both SD3.5
features: a dual-attention block (image-only ``attn2`` next to the joint ``attn``) with RMS
qk-norm, then a ``context_pre_only`` last block. Text tokens are replicated on every rank or
sharded like the image tokens (``text=``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import SD3Transformer2DModel

from sf_attn import chunk_sizes
from sf_models.parallelize import parallelize
from sf_models.plan import supported_models
from sf_models.sd3 import SD3_PLAN

from ._common import (
    STRATEGIES,
    WORLDS,
    assert_matches,
    check_work_split,
    compare,
    error_messages,
)

BATCH, LATENT, PATCH, TEXT = 2, (10, 14), 2, 6  # 5 x 7 = 35 image tokens: uneven over 2 and 4
IMG = (LATENT[0] // PATCH) * (LATENT[1] // PATCH)
HEADS, HEAD_DIM, LAYERS = 4, 8, 2


def make_model(heads: int = HEADS) -> Any:  # an SD3Transformer2DModel (diffusers is untyped)
    torch.manual_seed(0)  # same weights on every rank
    model: Any = SD3Transformer2DModel(
        sample_size=16,
        patch_size=PATCH,
        in_channels=4,
        num_layers=LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=heads,
        joint_attention_dim=24,
        caption_projection_dim=heads * HEAD_DIM,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return model.eval()


def make_inputs(text: int = TEXT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(BATCH, 4, *LATENT, generator=g),
        encoder_hidden_states=torch.randn(BATCH, text, 24, generator=g),
        pooled_projections=torch.randn(BATCH, 16, generator=g),
        timestep=torch.rand(BATCH, generator=g) * 1000,
    )


def make_model_for_text(text: int) -> Any:
    """:func:`make_model` (the helpers pass ``make_inputs``' arguments to both builders)."""
    return make_model()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_sd3_matches_single_process(ranks, world: int, topo: str, strategy: str) -> None:
    """Catches a wrong split inside SD3: the image tokens sharded before the sin-cos table is
    added (wrong rows of the table), the uneven last chunk (35 tokens) dropped or duplicated,
    text sharded instead of replicated or differing per rank, the image-only ``attn2`` of the
    dual-attention block attending only local tokens, ``proj_out`` not gathered before the
    unpatchify (wrong shape or order), and the installed hooks or processors changing what the
    model computes when called outside the wrapper.
    """
    results = ranks(world).run(
        compare,
        strategy,
        make_model,
        make_inputs,
        text="replicated",
        topology=topo,
        transport="shm",
    )
    assert_matches(results)
    assert all(r["text_rows"] == TEXT for r in results), results  # every rank: all text


@pytest.mark.parametrize("text", [TEXT, 3])  # over 4 ranks: 2, 2, 1, 1 and 1, 1, 1, 0 tokens
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_text_matches_single_process(ranks, strategy: str, text: int) -> None:
    """Catches a wrong text split under ``text="sharded"``: text chunks of uneven size (6
    over 4 ranks) or an empty one (3 over 4) dropped or misplaced, the joint attention
    treating a rank's text chunk as the whole text, the ``context_pre_only`` last block
    mishandling a text chunk, and the text stream still computed whole on every rank (the
    text embedder must see only this rank's chunk).
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
    rank attending the full image sequence, or image queries computed twice across ranks.

    Per joint attention: (image + text) queries x (image + text) keys; the dual block's
    ``attn2``: image x image. Every pair, text queries included, must be computed once in
    total, ~1/4 per rank, with text replicated and with text sharded.
    """
    seq = IMG + TEXT
    full_video = BATCH * HEADS * (LAYERS * IMG * seq + IMG * IMG)  # 2 joint + 1 image-only
    full_text = BATCH * HEADS * LAYERS * TEXT * seq
    check_work_split(
        ranks,
        strategy,
        make_model,
        make_inputs,
        full_video=full_video,
        full_text=full_text,
        tokens=IMG,
    )


def _errors(ctx: Any) -> list[str]:
    cases = [
        lambda: parallelize(make_model(heads=2), ctx=ctx, strategy="ulysses"),  # 2 heads, 4 ranks
        lambda: parallelize(parallelize(make_model(), ctx=ctx, strategy="ring").module, ctx=ctx),
        lambda: parallelize(make_model(), ctx=ctx, strategy="ring")(
            **make_inputs(), block_controlnet_hidden_states=[torch.zeros(BATCH, IMG, 32)]
        ),
    ]
    return error_messages(cases)


def test_errors_name_the_problem(ranks) -> None:
    """Catches bad configurations failing late or obscurely: heads the strategy cannot split
    (in parallelize, not mid-forward), a second parallelize of the same model (its first
    wrapper would read the wrong state) and ControlNet residuals the plan cannot shard.
    """
    msgs = ranks(4).run(_errors, topology="2x2", transport="shm")[0]
    assert "needs at least 4 heads, got 2" in msgs[0], msgs[0]
    assert "already parallelized" in msgs[1], msgs[1]
    assert "'block_controlnet_hidden_states' is not supported" in msgs[2], msgs[2]


def test_plan_is_registered() -> None:
    """Catches the SD3 plan not being found by class name, splitting the wrong submodule or
    text input, or ``text="auto"`` not choosing the sharded text SD3 supports."""
    assert "SD3Transformer2DModel" in supported_models()
    assert dict(SD3_PLAN.split_module_outputs) == {"pos_embed": 1}
    assert dict(SD3_PLAN.gather_module_outputs) == {"proj_out": 1}
    assert dict(SD3_PLAN.sharded_text_inputs) == {"encoder_hidden_states": 1}
    ctx: Any = None  # strategy "auto": nothing here touches the context
    assert parallelize(make_model(), ctx=ctx).state.text == "sharded"  # text="auto"
