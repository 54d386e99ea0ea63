"""Tier 2: ``sf_models.parallelize`` on a tiny diffusers ``WanTransformer3DModel``.

Every rank builds the same random-weight model and inputs from fixed seeds, runs the
parallelized model on the full inputs and compares its (full) output with the original model
run in one process (tolerance: see ``tests/models/_common.py``). Three configs: "t2v" (Wan 2.1
text-to-video), "ti2v" (the Wan 2.2 TI2V form: one timestep per video token) and "i2v" (Wan
2.1 image-to-video: cross-attention also to image tokens through ``add_k_proj``/``add_v_proj``;
diffusers hard-codes 512 text tokens for it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import WanTransformer3DModel

from sf_models.parallelize import parallelize

from ._common import (
    STRATEGIES,
    WORLDS,
    assert_matches,
    assert_work_split,
    compare,
    count_pairs,
)

BATCH, CHANNELS, TEXT, TEXT_DIM = 2, 4, 7, 16
FRAMES, HEIGHT, WIDTH, PATCH = 3, 6, 10, (1, 2, 2)  # 3 x 3 x 5 = 45 tokens: uneven over 2 and 4
TOKENS = FRAMES * (HEIGHT // PATCH[1]) * (WIDTH // PATCH[2])
HEADS, HEAD_DIM, LAYERS = 4, 12, 2  # head_dim 12: RoPE axes t/h/w = 4/4/4


I2V_TEXT, I2V_IMAGE, IMAGE_DIM = 512, 5, 8


def make_model(variant: str = "t2v") -> Any:
    torch.manual_seed(0)  # same weights on every rank
    i2v = variant == "i2v"
    model: Any = WanTransformer3DModel(
        patch_size=PATCH,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=LAYERS,
        rope_max_seq_len=32,
        image_dim=IMAGE_DIM if i2v else None,
        added_kv_proj_dim=HEADS * HEAD_DIM if i2v else None,
    )
    return model.eval()


def make_inputs(variant: str = "t2v") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (BATCH, TOKENS) if variant == "ti2v" else (BATCH,)
    inputs = dict(
        hidden_states=torch.randn(BATCH, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=g),
        timestep=torch.randint(0, 1000, shape, generator=g),
        encoder_hidden_states=torch.randn(
            BATCH, I2V_TEXT if variant == "i2v" else TEXT, TEXT_DIM, generator=g
        ),
    )
    if variant == "i2v":
        inputs["encoder_hidden_states_image"] = torch.randn(
            BATCH, I2V_IMAGE, IMAGE_DIM, generator=g
        )
    return inputs


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_wan_matches_single_process(ranks, world: int, topo: str, strategy: str) -> None:
    """Catches a wrong split inside Wan: RoPE rows not matching the rank's video chunk, the
    cross-attention to the text seeing a sharded or per-rank text, the uneven last chunk (45
    tokens) dropped or duplicated, ``proj_out`` not gathered before the unpatchify, and the
    hooks or processors changing what the model computes when called outside the wrapper.
    """
    results = ranks(world).run(
        compare, strategy, make_model, make_inputs, topology=topo, transport="shm"
    )
    assert_matches(results)


@pytest.mark.parametrize("variant", ["ti2v", "i2v"])
@pytest.mark.parametrize(("world", "topo"), WORLDS)
def test_parallel_wan_variants(ranks, world: int, topo: str, variant: str) -> None:
    """Catches a per-token timestep (TI2V) left whole while the tokens are split (the
    per-token modulation would broadcast or misalign with the shard), and the I2V
    cross-attention (text + image keys, kept as diffusers' own processor on the shard)
    seeing sharded or per-rank keys."""
    results = ranks(world).run(
        compare, "usp", make_model, make_inputs, variant, topology=topo, transport="shm"
    )
    assert_matches(results)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_work_is_split(ranks, strategy: str) -> None:
    """Catches a parallelize that gives correct numbers without splitting the work: e.g. every
    rank attending the full video sequence, or video queries computed twice across ranks.

    Self-attention per layer: video x video; pairs computed once in total, ~1/4 per rank.
    Cross-attention (video queries on the shard x text keys) stays local diffusers code.
    """
    full_video = LAYERS * BATCH * HEADS * TOKENS * TOKENS
    counts = ranks(4).run(
        count_pairs, strategy, make_model, make_inputs, topology="2x2", transport="shm"
    )
    assert_work_split(counts, full_video=full_video, full_text=0, tokens=TOKENS)


def test_text_stays_replicated() -> None:
    """Catches ``text="auto"`` sharding Wan's text (its cross-attention reads all text keys
    on every rank, so its plan keeps text replicated) and ``text="sharded"`` being accepted
    for it instead of refused with a message naming the model and those that support it."""
    ctx: Any = None  # strategy "auto": nothing here touches the context
    assert parallelize(make_model(), ctx=ctx).state.text == "replicated"  # text="auto"
    with pytest.raises(ValueError) as info:
        parallelize(make_model(), ctx=ctx, text="sharded")
    message = str(info.value)
    assert "text='sharded' is not supported by WanTransformer3DModel" in message, message
    supported = "['CogVideoXTransformer3DModel', 'FluxTransformer2DModel', 'HunyuanVideoTransformer3DModel', 'SD3Transformer2DModel']"
    assert supported in message, message
