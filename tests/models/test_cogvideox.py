"""Tier 2: ``sf_models.parallelize`` on a tiny diffusers ``CogVideoXTransformer3DModel``.

Every rank builds the same random-weight model and inputs from fixed seeds, runs the
parallelized model on the full inputs and compares its (full) output with the original model
run in one process (tolerance: see ``tests/models/_common.py``). Three configs: "5b" (RoPE,
the 1.0 5B layout), "2b" (3-D sin-cos table added inside ``patch_embed``, no RoPE) and "1.5"
(RoPE plus temporal patches, ``patch_size_t=2``). Text tokens are replicated on every rank or
sharded like the video tokens (``text=``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from sf_attn import chunk_sizes
from sf_models.parallelize import parallelize

from ._common import (
    STRATEGIES,
    WORLDS,
    assert_matches,
    check_work_split,
    compare,
)

BATCH, CHANNELS, TEXT_DIM = 2, 4, 16
FRAMES, HEIGHT, WIDTH, PATCH = 3, 6, 10, 2  # 3 x 3 x 5 = 45 video tokens: uneven over 2 and 4
HEADS, HEAD_DIM, LAYERS = 4, 8, 2
TEXT = 7  # = max_text_seq_length, which 2b needs: its sin-cos table has exactly that many text rows


def _frames(variant: str) -> int:
    return 4 if variant == "1.5" else FRAMES  # 1.5: 4 latent frames / p_t 2 = 2 token frames


def tokens(variant: str) -> int:
    t = _frames(variant) // (2 if variant == "1.5" else 1)
    return t * (HEIGHT // PATCH) * (WIDTH // PATCH)


def make_model(variant: str = "5b", heads: int = HEADS, layers: int = LAYERS) -> Any:
    torch.manual_seed(0)  # same weights on every rank
    model: Any = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=layers,
        sample_width=WIDTH,
        sample_height=HEIGHT,
        sample_frames=(_frames(variant) - 1) * 4 + 1,
        patch_size=PATCH,
        patch_size_t=2 if variant == "1.5" else None,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=variant != "2b",
    )
    return model.eval()


def make_inputs(variant: str = "5b") -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(BATCH, _frames(variant), CHANNELS, HEIGHT, WIDTH, generator=g),
        encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM, generator=g),
        timestep=torch.randint(0, 1000, (BATCH,), generator=g),
    )
    if variant != "2b":
        # Any per-token table exercises the row alignment; random rows make a one-row shift
        # visible (a real RoPE table's neighbouring rows are close).
        n = tokens(variant)
        angles = torch.rand(n, HEAD_DIM // 2, generator=g) * 6.28
        inputs["image_rotary_emb"] = (
            angles.cos().repeat_interleave(2, -1),
            angles.sin().repeat_interleave(2, -1),
        )
    return inputs


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_cogvideox_matches_single_process(
    ranks, world: int, topo: str, strategy: str
) -> None:
    """Catches a wrong split inside CogVideoX: the text prefix of the patch-embedded stream
    sharded instead of the video tokens, RoPE rows not matching the rank's video chunk, the
    uneven last chunk (45 tokens) dropped or duplicated, text output differing per rank,
    ``proj_out`` not gathered before the unpatchify, and the hooks or processors changing
    what the model computes when called outside the wrapper.
    """
    results = ranks(world).run(
        compare,
        strategy,
        make_model,
        make_inputs,
        "5b",
        text="replicated",
        topology=topo,
        transport="shm",
    )
    assert_matches(results)


@pytest.mark.parametrize(("strategy", "variant"), [*((s, "5b") for s in STRATEGIES), ("usp", "2b")])
def test_sharded_text_matches_single_process(ranks, strategy: str, variant: str) -> None:
    """Catches a wrong text split under ``text="sharded"`` (7 text tokens over 4 ranks: 2, 2,
    2, 1): the text cut from ``patch_embed``'s stream split before the 2B sin-cos table is
    added, the processor treating a rank's text chunk as the whole text, and the text stream
    still computed whole on every rank (the first block's feed-forward must see only this
    rank's text and video tokens)."""
    results = ranks(4).run(
        compare,
        strategy,
        make_model,
        make_inputs,
        variant,
        text="sharded",
        rows_of="transformer_blocks.0.ff",  # per token over [text, video]
        topology="2x2",
        transport="shm",
    )
    assert_matches(results)
    n = tokens(variant)
    for rank, res in enumerate(results):
        assert res["text_layout"] == "sharded", (rank, res)
        assert res["text_rows"] == chunk_sizes(TEXT, 4)[rank] + chunk_sizes(n, 4)[rank], res


@pytest.mark.parametrize("variant", ["2b", "1.5"])
def test_parallel_cogvideox_variants(ranks, variant: str) -> None:
    """Catches the split landing before ``patch_embed``'s sin-cos table is added (2B style:
    the table rows would not match the shard) and a wrong token order with temporal patches
    (1.5: two latent frames per token; the unpatchify must see the tokens in order).
    """
    results = ranks(4).run(
        compare, "usp", make_model, make_inputs, variant, topology="2x2", transport="shm"
    )
    assert_matches(results)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_work_is_split(ranks, strategy: str) -> None:
    """Catches a parallelize that gives correct numbers without splitting the work: e.g. every
    rank attending the full video sequence, or video queries computed twice across ranks.

    Per layer: (video + text) queries x (video + text) keys; every pair, text queries
    included, must be computed once in total and ~1/4 per rank.
    """
    n = tokens("5b")
    full_video = LAYERS * BATCH * HEADS * n * (n + TEXT)
    full_text = LAYERS * BATCH * HEADS * TEXT * (n + TEXT)
    check_work_split(
        ranks,
        strategy,
        make_model,
        make_inputs,
        full_video=full_video,
        full_text=full_text,
        tokens=n,
    )


def test_missing_submodule_is_named() -> None:
    """Catches a config without the hooked first block (``num_layers=0``) failing obscurely
    mid-forward (or running unsplit) instead of in parallelize with the submodule's name."""
    with pytest.raises(ValueError, match=r"submodule 'transformer_blocks.0'"):
        parallelize(make_model(layers=0), ctx=None, strategy="ring")  # type: ignore[arg-type]
