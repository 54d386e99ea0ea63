"""Tiny, complete diffusers pipelines for tests: :func:`make_tiny` writes one to a directory.

Plain code of what a test then runs, with no download (the directory holds every
component: transformer, VAE, scheduler, text encoders and their tokenizer files)::

    make_tiny(path, "wan", seed=0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)    # a stock WanPipeline
    video = pipe("a photo of a cat", num_inference_steps=2, **TEST_SIZE["wan"],
                 generator=torch.Generator("cpu").manual_seed(0), output_type="np")

Weights are random and small (a two-step generation at :data:`TEST_SIZE` takes a fraction
of a second on a CPU once warm), so outputs are noise; what is real is every code path of the
stock pipeline, from the tokenizers (:mod:`sf_models._tiny_tokenizers`) through the text
encoders, the scheduler and the transformer to the VAE decode.

Per family: attention heads x head dim, transformer blocks, VAE compression (spatial,
temporal), patch (the pipeline's 2 x 2 packing for Flux), and so the valid sizes
(:data:`SIZE_MULTIPLE`, :data:`FRAME_STEP`):

============  =======  =====================  ======  =========  ===========  ======
family        heads    blocks                 VAE     patch      h, w         frames
============  =======  =====================  ======  =========  ===========  ======
flux          4 x 16   1 double + 1 single    2       2 x 2      4 k
sd3           4 x 16   2 joint (first dual)   2       2 x 2      4 k
cogvideox     4 x 16   2                      8, 4    2 x 2      16 k         8 k + 1
hunyuanvideo  4 x 16   1 double + 1 single    8, 4    1 x 2 x 2  16 k         4 k + 1
wan           4 x 16   2                      8, 4    1 x 2 x 2  16 k         4 k + 1
============  =======  =====================  ======  =========  ===========  ======

Text encoders are 2-layer CLIP (77 tokens) and T5/UMT5 models, and a 3-layer Llama for
HunyuanVideo, all 32 wide (SD3's two CLIPs 8 and 16, like CLIP-L and -G), with the vocabulary
of their tokenizer. The text lengths are the pipelines' defaults (Flux 512 T5 tokens, SD3
77 + 256, CogVideoX 226, HunyuanVideo 256 after the template crop, Wan 512): long next to the
image, but the models are narrow. Every transformer has 4 heads, so Ulysses splits them over
2 or 4 ranks.

Default sizes: Flux, HunyuanVideo and Wan fix theirs in the pipeline (Flux 256 x 256 here,
from its 128-latent default; HunyuanVideo 720 x 1280 x 129; Wan 480 x 832 x 81), far too big
for a test, so pass :data:`TEST_SIZE`. SD3 and CogVideoX read theirs from the transformer
config, set small here (SD3 64 x 64; CogVideoX :data:`TEST_SIZE`'s 48 x 64 x 9).

Loading the Wan directory needs the ``accelerate`` package (a dependency of sf-models):
diffusers loads ``WanTransformer3DModel``, which keeps some modules in float32, only with
``low_cpu_mem_usage=True``, and without ``accelerate`` it turns that off and raises.

Note [Component seeds]
    Each component is built under ``torch.manual_seed`` of its own seed, a 32-bit hash of
    ``seed`` and the component's name (not a running counter), inside a forked RNG: the same
    ``seed`` gives bit-identical weights, changing one component's config leaves the others'
    weights as they were, and the caller's global RNG state is untouched. The hash is 32
    bits because the CPU generator keeps only the low 32 bits of its seed (a seed of
    ``seed * 2**32 + k`` would ignore ``seed``).
"""

from __future__ import annotations

import os
import pathlib
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from ._tiny_tokenizers import clip_tokenizer, llama_tokenizer, t5_tokenizer

__all__ = [
    "FAMILIES",
    "FRAME_STEP",
    "PIPELINE_CLASSES",
    "SIZE_MULTIPLE",
    "TEST_SIZE",
    "make_tiny",
]

FAMILIES: tuple[str, ...] = ("flux", "sd3", "cogvideox", "hunyuanvideo", "wan")

PIPELINE_CLASSES: dict[str, str] = {
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "cogvideox": "CogVideoXPipeline",
    "hunyuanvideo": "HunyuanVideoPipeline",
    "wan": "WanPipeline",
}

# Small call sizes: 96 image tokens (Flux, SD3) or 3 latent frames x 3 x 4 tokens (video),
# non-square so a height/width mix-up shows, and several tokens per rank on 4 ranks.
TEST_SIZE: dict[str, dict[str, int]] = {
    "flux": {"height": 32, "width": 48},
    "sd3": {"height": 32, "width": 48},
    "cogvideox": {"height": 48, "width": 64, "num_frames": 9},
    "hunyuanvideo": {"height": 48, "width": 64, "num_frames": 9},
    "wan": {"height": 48, "width": 64, "num_frames": 9},
}

# height and width must be multiples of this (VAE spatial compression x patch size)
SIZE_MULTIPLE: dict[str, int] = {
    "flux": 4,
    "sd3": 4,
    "cogvideox": 16,
    "hunyuanvideo": 16,
    "wan": 16,
}

# Video families: valid num_frames are 1 + FRAME_STEP * k. The VAEs compress time 4x
# (1 + 4 j frames: 1 + j latent frames); CogVideoX's VAE also decodes latent frames in pairs
# after an odd first group, so an even latent count decodes to 3 frames too many (5 -> 8).
FRAME_STEP: dict[str, int] = {"cogvideox": 8, "hunyuanvideo": 4, "wan": 4}

_HEADS, _HEAD_DIM = 4, 16
_LATENT = 4  # latent channels of every VAE
_TEXT_DIM = 32  # width of the text encoders (SD3's CLIPs: see _sd3)


def make_tiny(path: str | os.PathLike[str], model: str, *, seed: int = 0) -> pathlib.Path:
    """Write a tiny, complete ``model`` pipeline to ``path`` (``pipe.save_pretrained``).

    Args:
        path: the directory to write (created if missing; existing files are overwritten).
        model: one of :data:`FAMILIES`.
        seed: weight seed; the same seed writes a byte-identical directory (Note [Component
            seeds]).

    Returns:
        ``path``, which ``diffusers.DiffusionPipeline.from_pretrained`` loads as the
        family's stock pipeline class (:data:`PIPELINE_CLASSES`).

    Raises:
        ValueError: ``model`` is not one of :data:`FAMILIES`, or ``seed`` is not an int.
    """
    if model not in _BUILDERS:
        raise ValueError(f"make_tiny: unknown model {model!r}; expected one of {list(FAMILIES)}")
    if type(seed) is not int:
        raise ValueError(f"make_tiny: seed must be an int, got {seed!r}")
    out = pathlib.Path(path)
    _BUILDERS[model](seed).save_pretrained(out)
    return out


@contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Build ``component`` under its own seed (Note [Component seeds])."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{component}/{seed}".encode()))
        yield


def _clip(
    seed: int, name: str, tokenizer: Any, *, width: int = _TEXT_DIM, projection: bool = False
) -> Any:
    """A 2-layer CLIP text encoder for ``tokenizer`` (``hidden_states[-2]``, which SD3 reads,
    is then the first layer's output); with ``projection``, its pooled output is projected to
    ``width``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=width // 4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling reads the first eos
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed, name):
        encoder: Any = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return encoder


def _t5(seed: int, name: str, tokenizer: Any, *, umt5: bool = False) -> Any:
    """A 2-layer T5 (or UMT5) encoder for ``tokenizer``."""
    shape: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=2 * _TEXT_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed, name):
        if umt5:
            return UMT5EncoderModel(UMT5Config(**shape))
        return T5EncoderModel(T5Config(**shape))


def _llama(seed: int, name: str, tokenizer: Any) -> Any:
    """A 3-layer Llama for ``tokenizer``: HunyuanVideo reads ``hidden_states[-3]``, the first
    layer's output (with 2 layers it would be the bare token embeddings)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=2 * _TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed, name):
        encoder = LlamaModel(config)
    return encoder


def _image_vae(seed: int, *, scaling: float, shift: float) -> Any:
    """Two down blocks: spatial compression 2."""
    with _seeded(seed, "vae"):
        vae: Any = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=_LATENT,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling,
            shift_factor=shift,
        )
    return vae


def _flux(seed: int) -> Any:
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with _seeded(seed, "transformer"):
        transformer: Any = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT,  # the pipeline packs 2 x 2 latent pixels per token
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_DIM,  # T5 width
            pooled_projection_dim=_TEXT_DIM,  # CLIP pooled width
            guidance_embeds=True,  # as FLUX.1-dev: guidance_scale is an input
            axes_dims_rope=(4, 6, 6),  # sums to the head dim
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(  # FLUX.1's, with resolution shift
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_image_vae(seed, scaling=0.3611, shift=0.1159),
        text_encoder=_clip(seed, "text_encoder", tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5(seed, "text_encoder_2", tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _sd3(seed: int) -> Any:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    # Two CLIPs of different widths (as CLIP-L and -G): their hidden states, concatenated
    # (8 + 16), are zero-padded to the T5 width; their projections concatenate to 24.
    clip_widths = (8, 16)
    with _seeded(seed, "transformer"):
        transformer: Any = SD3Transformer2DModel(
            sample_size=32,  # latent pixels: the pipeline's default size is 64 x 64
            patch_size=2,
            in_channels=_LATENT,
            out_channels=_LATENT,
            num_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_DIM,
            caption_projection_dim=_HEADS * _HEAD_DIM,
            pooled_projection_dim=sum(clip_widths),
            pos_embed_max_size=64,  # up to 128 latent pixels (256 px) a side
            dual_attention_layers=(0,),  # as SD3.5: the first block adds image-only attention
            qk_norm="rms_norm",
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(seed, scaling=1.5305, shift=0.0609),
        text_encoder=_clip(seed, "text_encoder", clip, width=clip_widths[0], projection=True),
        tokenizer=clip,
        text_encoder_2=_clip(seed, "text_encoder_2", clip, width=clip_widths[1], projection=True),
        tokenizer_2=clip,
        text_encoder_3=_t5(seed, "text_encoder_3", t5),
        tokenizer_3=t5,
    )


def _cogvideox(seed: int) -> Any:
    tokenizer = t5_tokenizer()
    size = TEST_SIZE["cogvideox"]
    with _seeded(seed, "transformer"):
        transformer: Any = CogVideoXTransformer3DModel(  # as CogVideoX-5b: RoPE, no sin-cos table
            num_attention_heads=_HEADS,
            attention_head_dim=_HEAD_DIM,  # RoPE: 4 (frames) + 6 + 6 (rows, columns)
            in_channels=_LATENT,
            out_channels=_LATENT,
            time_embed_dim=16,
            text_embed_dim=_TEXT_DIM,
            num_layers=2,
            sample_height=size["height"] // 8,  # latent: the pipeline's default size
            sample_width=size["width"] // 8,
            sample_frames=size["num_frames"],
            patch_size=2,
            use_rotary_positional_embeddings=True,
        )
    with _seeded(seed, "vae"):
        vae: Any = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),  # three downsamples: spatial 8, 2 in time: 4
            latent_channels=_LATENT,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            scaling_factor=0.7,
        )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(seed, "text_encoder", tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDPMScheduler(  # CogVideoX-5b's
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            snr_shift_scale=1.0,
            timestep_spacing="trailing",
        ),
    )


def _hunyuanvideo(seed: int) -> Any:
    tokenizer = llama_tokenizer(
        cast(str, DEFAULT_PROMPT_TEMPLATE["template"]),
        cast(int, DEFAULT_PROMPT_TEMPLATE["crop_start"]),
    )
    tokenizer_2 = clip_tokenizer()
    with _seeded(seed, "transformer"):
        transformer: Any = HunyuanVideoTransformer3DModel(
            in_channels=_LATENT,
            out_channels=_LATENT,
            num_attention_heads=_HEADS,
            attention_head_dim=_HEAD_DIM,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,  # guidance-distilled, as the real model
            text_embed_dim=_TEXT_DIM,  # Llama width
            pooled_projection_dim=_TEXT_DIM,  # CLIP pooled width
            rope_axes_dim=(4, 6, 6),  # frames, rows, columns: sums to the head dim
        )
    with _seeded(seed, "vae"):
        vae: Any = AutoencoderKLHunyuanVideo(
            latent_channels=_LATENT,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
    return HunyuanVideoPipeline(
        text_encoder=_llama(seed, "text_encoder", tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip(seed, "text_encoder_2", tokenizer_2),
        tokenizer_2=tokenizer_2,
    )


def _wan(seed: int) -> Any:
    tokenizer = t5_tokenizer()
    with _seeded(seed, "transformer"):
        transformer: Any = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=_HEADS,
            attention_head_dim=_HEAD_DIM,  # RoPE: 8 (frames) + 4 + 4 (rows, columns)
            in_channels=_LATENT,
            out_channels=_LATENT,
            text_dim=_TEXT_DIM,
            freq_dim=32,
            ffn_dim=2 * _HEADS * _HEAD_DIM,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
    with _seeded(seed, "vae"):
        vae: Any = AutoencoderKLWan(
            base_dim=8,
            z_dim=_LATENT,
            dim_mult=[1, 1, 1, 1],  # three downsamples: spatial 8
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # two in time: 4
            latents_mean=[0.0] * _LATENT,
            latents_std=[1.0] * _LATENT,
        )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(seed, "text_encoder", tokenizer, umt5=True),
        vae=vae,
        scheduler=UniPCMultistepScheduler(  # Wan 2.1's: flow matching, shift 3 (480p)
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        ),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "flux": _flux,
    "sd3": _sd3,
    "cogvideox": _cogvideox,
    "hunyuanvideo": _hunyuanvideo,
    "wan": _wan,
}
