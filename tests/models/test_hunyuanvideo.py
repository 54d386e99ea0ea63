"""Tier 2: ``sf_models.parallelize`` on a tiny diffusers ``HunyuanVideoTransformer3DModel``.

Every rank builds the same random-weight model and inputs from fixed seeds, runs the
parallelized model on the full inputs and compares its (full) output with the original model
run in one process (tolerance: see ``tests/models/_common.py``). The config has one dual- and
one single-stream block, a token refiner layer and guidance embedding; the prompt mask leaves
a different number of valid text tokens per batch entry. A second config is image-to-video
with ``image_condition_type="token_replace"`` (first-frame tokens modulated separately).
Text tokens are replicated on every rank or sharded like the video tokens (``text=``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

import sf_comm
from sf_attn import chunk_sizes
from sf_models.parallelize import parallelize

from ._common import (
    STRATEGIES,
    WORLDS,
    assert_matches,
    check_work_split,
    compare,
)

BATCH, CHANNELS, TEXT, TEXT_DIM = 2, 4, 7, 16
VALID_TEXT = (5, 3)  # valid prompt tokens per batch entry (the rest is padding)
FRAMES, HEIGHT, WIDTH, PATCH = 3, 6, 10, 2  # 3 x 3 x 5 = 45 video tokens: uneven over 2 and 4
TOKENS = FRAMES * (HEIGHT // PATCH) * (WIDTH // PATCH)
HEADS, HEAD_DIM = 4, 8
LAYERS = 2  # one dual-stream + one single-stream block, one joint attention each


def make_model(condition: str | None = None) -> Any:
    torch.manual_seed(0)  # same weights on every rank
    model: Any = HunyuanVideoTransformer3DModel(
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=PATCH,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),  # sums to attention_head_dim
        image_condition_type=condition,
    )
    return model.eval()


def make_inputs(condition: str | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(BATCH, TEXT, dtype=torch.long)
    for b, valid in enumerate(VALID_TEXT):
        mask[b, :valid] = 1
    return dict(
        hidden_states=torch.randn(BATCH, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=g),
        timestep=torch.randint(0, 1000, (BATCH,), generator=g),
        encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(BATCH, 8, generator=g),
        guidance=torch.full((BATCH,), 6000.0),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_hunyuanvideo_matches_single_process(
    ranks, world: int, topo: str, strategy: str
) -> None:
    """Catches a wrong split inside HunyuanVideo: RoPE rows not matching the rank's video
    chunk, the prompt's padding keys attended (mask lost or misaligned with the text), the
    single-stream block's text part sharded instead of replicated, the token refiner's
    attention replaced, the uneven last chunk (45 tokens) dropped or duplicated, ``proj_out``
    not gathered before the unpatchify, and the hooks or processors changing what the model
    computes when called outside the wrapper.
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


@pytest.mark.parametrize(
    ("strategy", "condition"), [*((s, None) for s in STRATEGIES), ("usp", "token_replace")]
)
def test_sharded_text_matches_single_process(ranks, strategy: str, condition: str | None) -> None:
    """Catches the prompt mask lost or misaligned under ``text="sharded"``: 7 text tokens
    over 4 ranks (2, 2, 2, 1) with 5 and 3 valid ones, so the padding starts inside a rank's
    chunk and whole chunks are padding; the model's own mask, built from the local text
    length, would let padding keys of later chunks attend. Also catches the refined prompt
    not split (the text feed-forward must see only this rank's chunk)."""
    results = ranks(4).run(
        compare,
        strategy,
        make_model,
        make_inputs,
        condition,
        text="sharded",
        rows_of="transformer_blocks.0.ff_context",  # the text stream's feed-forward
        topology="2x2",
        transport="shm",
    )
    assert_matches(results)
    for rank, res in enumerate(results):
        assert res["text_layout"] == "sharded", (rank, res)
        assert res["text_rows"] == chunk_sizes(TEXT, 4)[rank], (rank, res)


def _too_few_text_tokens(ctx: sf_comm.Context) -> str:
    inputs = make_inputs()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :3]
    inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"][:, :3]
    sp = parallelize(make_model(), ctx=ctx, strategy="usp", text="sharded")
    try:
        sp(**inputs)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_sharded_text_needs_a_token_per_rank(ranks) -> None:
    """Catches 3 text tokens over 4 ranks reaching the single-stream block, which cuts
    [video, text] at ``-text_len`` and would drop every video token of the empty chunk."""
    messages = ranks(4).run(_too_few_text_tokens, topology="2x2", transport="shm")
    assert all(
        "needs a text token on every rank" in m and "3 text tokens over 4" in m for m in messages
    )


@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_token_replace_matches_single_process(ranks, world: int, topo: str) -> None:
    """Catches the first-frame token count (15 of 45 tokens) applied to every rank's local
    prefix instead of to the global one: on 4 ranks rank 0 holds 12 of them and rank 1 the
    other 3, so both the clamp and the offset are exercised.
    """
    results = ranks(world).run(
        compare,
        "usp",
        make_model,
        make_inputs,
        "token_replace",
        text="replicated",
        topology=topo,
        transport="shm",
    )
    assert_matches(results)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_work_is_split(ranks, strategy: str) -> None:
    """Catches a parallelize that gives correct numbers without splitting the work: e.g. every
    rank attending the full video sequence, or video queries computed twice across ranks.

    Per block: (video + text) queries x (video + text) keys (padding keys are masked, not
    skipped, as in the original); every pair, text queries included, must be computed once
    in total and ~1/4 per rank. The refiner's text-only attention does not go through sf_attn.
    """
    seq = TOKENS + TEXT
    full_video = LAYERS * BATCH * HEADS * TOKENS * seq
    full_text = LAYERS * BATCH * HEADS * TEXT * seq
    check_work_split(
        ranks,
        strategy,
        make_model,
        make_inputs,
        full_video=full_video,
        full_text=full_text,
        tokens=TOKENS,
    )
