"""Tier 1: ``sf_models.tiny.make_tiny`` writes a complete pipeline directory per family that
the stock diffusers pipeline loads and runs with no download.

Each family's directory is written once per module and loaded once; the checks run the
stock pipeline end to end (tokenizers, text encoders, scheduler, transformer, VAE) on
:data:`~sf_models.tiny.TEST_SIZE` with two steps, a negative prompt and guidance.

Tolerance: two runs with the same seed must be bit-identical (one process, the same ops in
the same order). Different prompts must move the decoded output (values in [0, 1]) by more
than ``PROMPT_EFFECT`` = 1e-3 somewhere: the measured smallest effect is 1e-2 (Wan), and a
dead text path (prompt cropped away, embeddings never reaching the transformer) gives 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from sf_models.tiny import (
    FAMILIES,
    FRAME_STEP,
    PIPELINE_CLASSES,
    SIZE_MULTIPLE,
    TEST_SIZE,
    make_tiny,
)

PROMPT = "a photo of a cat"
OTHER_PROMPT = "a dog runs across a green field"
NEGATIVE = "blurry, low quality"
PROMPT_EFFECT = 1e-3  # see the module docstring
# Guidance > 1 with a negative prompt: true CFG for Flux and HunyuanVideo (guidance-distilled,
# so their guidance_scale is an input of the transformer), batched or paired CFG elsewhere.
GUIDANCE: dict[str, dict[str, float]] = {
    "flux": {"true_cfg_scale": 2.0, "guidance_scale": 3.5},
    "sd3": {"guidance_scale": 5.0},
    "cogvideox": {"guidance_scale": 6.0},
    "hunyuanvideo": {"true_cfg_scale": 2.0, "guidance_scale": 6.0},
    "wan": {"guidance_scale": 5.0},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_dir(family)`` -> that family's directory (seed 0), written once."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir: Callable[[str], Path]) -> Callable[[str], Any]:
    """``tiny_pipe(family)`` -> the loaded pipeline, loaded once."""
    loaded: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in loaded:
            loaded[family] = DiffusionPipeline.from_pretrained(tiny_dir(family))
            loaded[family].set_progress_bar_config(disable=True)
        return loaded[family]

    return get


def text_pairs(pipe: Any) -> list[tuple[str, Any, Any]]:
    """(name, tokenizer, text encoder) of each of the pipeline's text paths."""
    return [
        (name, tokenizer, pipe.components[name.replace("tokenizer", "text_encoder")])
        for name, tokenizer in pipe.components.items()
        if name.startswith("tokenizer")
    ]


def test_unknown_family_or_bad_seed_is_a_value_error(tmp_path: Path) -> None:
    """Catches an unknown family silently building some default pipeline (or failing with a
    KeyError that does not say what is allowed), and a seed that is not an int."""
    with pytest.raises(ValueError, match="unknown model 'sdxl'") as info:
        make_tiny(tmp_path, "sdxl")
    assert str(list(FAMILIES)) in str(info.value)
    with pytest.raises(ValueError, match="seed must be an int, got '1'"):
        make_tiny(tmp_path, "flux", seed="1")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_the_stock_pipeline(tiny_pipe: Callable[[str], Any], family: str) -> None:
    """Catches a directory that loads as another class (a wrong model_index), or with a
    component missing (a text encoder or tokenizer not saved: the pipeline would need
    ``prompt_embeds`` or a download); only the optional image encoders and Wan 2.2's second
    transformer may be absent."""
    pipe = tiny_pipe(family)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    optional = {"image_encoder", "feature_extractor", "transformer_2"}
    missing = [name for name, c in pipe.components.items() if c is None and name not in optional]
    assert not missing, missing
    assert text_pairs(pipe), "no tokenizers"


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizers_give_real_ids(tiny_pipe: Callable[[str], Any], family: str) -> None:
    """Catches tokenizers that would make the text path meaningless or crash the encoder: a
    prompt mapped to unknown tokens, missing or misplaced special tokens (CLIP's pooled
    output reads the eos position, T5 ends on eos, Llama starts on bos), a padding token
    unset (``padding="max_length"`` raises), and a vocabulary larger than the text encoder's
    embedding (index error) or a CLIP length beyond its position table."""
    for name, tokenizer, encoder in text_pairs(tiny_pipe(family)):
        ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
        assert len(ids) >= 4 and tokenizer.unk_token_id not in ids, (name, ids)
        assert tokenizer.decode(ids).strip().lower() == PROMPT, (name, tokenizer.decode(ids))
        assert tokenizer.pad_token_id is not None, name
        assert encoder.config.vocab_size == len(tokenizer), name
        full = tokenizer(PROMPT).input_ids
        kind = type(tokenizer).__name__
        if kind == "CLIPTokenizer":
            assert full == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], (name, full)
            assert encoder.config.eos_token_id == tokenizer.eos_token_id, name
            assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77
        elif kind == "T5Tokenizer":
            assert full == [*ids, tokenizer.eos_token_id], (name, full)
        else:
            assert kind == "LlamaTokenizer", (name, kind)
            assert full == [tokenizer.bos_token_id, *ids], (name, full)
            assert tokenizer.padding_side == "right", name  # the pipeline crops on the left


def test_hunyuanvideo_template_crop_keeps_exactly_the_prompt(
    tiny_pipe: Callable[[str], Any],
) -> None:
    """Catches a Llama tokenizer whose chat template is not ``crop_start`` tokens long: the
    pipeline's fixed crop would cut into the prompt (shorter template) or keep template
    tokens (longer). The encoded prompt must keep exactly its own tokens and the template's
    closing ``<|eot_id|>``."""
    pipe = tiny_pipe("hunyuanvideo")
    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    assert isinstance(template, str)
    assert len(pipe.tokenizer(template.split("{}")[0]).input_ids) == crop
    with torch.no_grad():
        embeds, _, mask = pipe.encode_prompt(PROMPT, device="cpu")
    kept = pipe.tokenizer(template.format(PROMPT)).input_ids[crop:]
    assert pipe.tokenizer.decode(kept[:-1]).strip() == PROMPT, pipe.tokenizer.decode(kept)
    assert int(mask.sum()) == len(kept), (int(mask.sum()), kept)
    assert embeds.shape[-1] == pipe.transformer.config.text_embed_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_directory(
    tiny_dir: Callable[[str], Path], tmp_path: Path, family: str
) -> None:
    """Catches nondeterministic building (a component initialised from the global RNG's
    current state, tokenizer training whose merge order varies run to run): the same seed
    must write a byte-identical directory, and another seed other weights (the seed
    ignored)."""
    again = make_tiny(tmp_path / "again", family, seed=0)
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    reference = tiny_dir(family)
    assert files == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    for name in files:
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name
    other = make_tiny(tmp_path / "other", family, seed=1)
    for weights in other.glob("*/*.safetensors"):
        assert weights.read_bytes() != (reference / weights.relative_to(other)).read_bytes()


def decoded(out: Any) -> np.ndarray:
    """The image or video of a pipeline output (``output_type="np"``)."""
    return np.asarray(out.images if hasattr(out, "images") else out.frames)


def expected_shape(size: dict[str, int]) -> tuple[int, ...]:
    """The decoded output's shape for call sizes ``size``: [1, (frames,) H, W, 3]."""
    frames = (size["num_frames"],) if "num_frames" in size else ()
    return (1, *frames, size["height"], size["width"], 3)


def latent_tokens(family: str, shape: torch.Size) -> int:
    """Tokens the transformer's attention sees for one sample of ``hidden_states`` of
    ``shape``."""
    if family == "flux":  # packed by the pipeline: [B, tokens, C]
        return shape[1]
    if family == "sd3":  # [B, C, H, W]
        frames = 1
    elif family == "cogvideox":  # [B, F, C, H, W]
        frames = shape[1]
    else:  # [B, C, F, H, W]
        frames = shape[2]
    return frames * (shape[-2] // 2) * (shape[-1] // 2)  # every family patches 2 x 2 in space


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_and_prompt_dependent(
    tiny_pipe: Callable[[str], Any], family: str
) -> None:
    """Catches a pipeline that cannot run a real prompt with guidance (a shape mismatch
    between a text encoder and the transformer, a VAE whose compression disagrees with the
    pipeline's scale factors: wrong output size), nondeterminism under a fixed generator
    (weights or ops drawing from the global RNG), a dead text path (the same output for
    every prompt), and a TEST_SIZE too small to give 4 ranks several tokens each."""
    pipe = tiny_pipe(family)
    size = TEST_SIZE[family]
    assert size["height"] % SIZE_MULTIPLE[family] == size["width"] % SIZE_MULTIPLE[family] == 0
    if family in FRAME_STEP:
        assert size["num_frames"] % FRAME_STEP[family] == 1
    seen: list[torch.Size] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["hidden_states"].shape), with_kwargs=True
    )

    def generate(prompt: str) -> np.ndarray:
        out = pipe(
            prompt,
            negative_prompt=NEGATIVE,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            **size,
            **GUIDANCE[family],
        )
        return decoded(out)

    try:
        first, again, other = generate(PROMPT), generate(PROMPT), generate(OTHER_PROMPT)
    finally:
        hook.remove()
    assert first.shape == expected_shape(size), first.shape
    assert np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > PROMPT_EFFECT
    assert latent_tokens(family, seen[0]) >= 16, seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_documented_sizes_come_back_as_asked(tiny_pipe: Callable[[str], Any], family: str) -> None:
    """Catches SIZE_MULTIPLE or FRAME_STEP promising sizes the pipeline does not return (a
    frame rule missing a VAE constraint: CogVideoX's decode gives 8 frames for 5)."""
    pipe = tiny_pipe(family)
    sizes = [{"height": SIZE_MULTIPLE[family], "width": 2 * SIZE_MULTIPLE[family]}]
    if family in FRAME_STEP:
        sizes = [{**sizes[0], "num_frames": 1 + k * FRAME_STEP[family]} for k in range(3)]
    for size in sizes:
        out = pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, output_type="np", **size)
        assert decoded(out).shape == expected_shape(size), (size, decoded(out).shape)


def test_builders_leave_the_global_rng_alone(tmp_path: Path) -> None:
    """Catches ``make_tiny`` reseeding the caller's global RNG (a test seeding torch, then
    building a pipeline, would draw different numbers than without the build)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny(tmp_path, "flux")
    assert torch.equal(torch.rand(4), expected)


def test_constants_cover_every_family() -> None:
    """Catches a family added to FAMILIES without its constants (a KeyError in callers), or
    a video family without its frame rule."""
    for table in (PIPELINE_CLASSES, TEST_SIZE, SIZE_MULTIPLE, GUIDANCE):
        assert set(table) == set(FAMILIES), table
    assert set(FRAME_STEP) == {f for f in FAMILIES if "num_frames" in TEST_SIZE[f]}
