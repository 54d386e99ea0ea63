"""Architecture numbers of the public DiTs, for the step simulator (:mod:`sf_attn.sim.step`).

Only what costs time under sequence parallelism is recorded: the self-attention shape
(heads x head_dim, joint text length), and per block kind the GEMM weights every image/video
token and every text token goes through. No weights, no diffusers import: the simulator
runs anywhere.

Sources (Note [Model table sources]): the transformer ``config.json`` of each model's
diffusers repository on the Hugging Face hub and the diffusers model/pipeline code
(diffusers 0.42: the ``__init__`` defaults of the transformer classes and the pipelines'
``max_sequence_length`` defaults, checked against the installed package). A number marked
``# unsure`` is from memory of a model card and was not checked against a config file.

Per-token GEMM weights (``2 * weights`` FLOPs per token) are counted from the modules a block
runs on each token; per-sample modulation (adaLN linears on the timestep embedding) runs once
per sample, not per token, and is left out, as are the patch embedder and the final
projection (under 0.5 % of a step for every model here).
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockKind:
    """One kind of transformer block and how many the model has.

    Attributes:
        name: e.g. ``"double"`` (MMDiT, separate text stream), ``"single"``, ``"block"``.
        count: number of such blocks.
        image_weights: GEMM weights each image/video token goes through in one block.
        text_weights: GEMM weights each text token goes through in one block (text stream of
            an MMDiT block, or the cross-attention K/V projections of the text).
        self_attention: whether the block has the (sequence-parallel) self-attention.
        cross_attention: whether the block has a cross-attention from the image tokens to the
            text tokens (local under SP: queries are this rank's tokens, keys the replicated
            text).
    """

    name: str
    count: int
    image_weights: int
    text_weights: int
    self_attention: bool = True
    cross_attention: bool = False

    def __post_init__(self) -> None:
        for field in ("count", "image_weights"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockKind.{field} must be a positive int, got {value!r}")
        if not isinstance(self.text_weights, int) or self.text_weights < 0:
            raise ValueError(
                f"BlockKind.text_weights must be an int >= 0, got {self.text_weights!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DiTConfig:
    """A DiT's architecture as the step simulator needs it.

    Attributes:
        name: short name (the ``--model`` value).
        hf_repo: the diffusers repository the numbers come from.
        heads, head_dim: self-attention heads (``hidden = heads * head_dim``).
        hidden: model width.
        ffn: MLP inner width (``ffn / hidden`` is the MLP ratio).
        text_len: text tokens per prompt (the pipeline's default ``max_sequence_length``).
        text_mode: ``"joint"`` (text tokens join the self-attention, MMDiT / CogVideoX) or
            ``"cross"`` (separate cross-attention to the text, Wan).
        vae_spatial, vae_temporal: VAE compression (pixels per latent, frames per latent).
        patch: (t, h, w) latents per token.
        fps: the model's native frame rate (video models), or 0 for image models.
        blocks: the block kinds, in order.
    """

    name: str
    hf_repo: str
    heads: int
    head_dim: int
    hidden: int
    ffn: int
    text_len: int
    text_mode: Literal["joint", "cross"]
    vae_spatial: int
    vae_temporal: int
    patch: tuple[int, int, int]
    fps: int
    blocks: tuple[BlockKind, ...]

    def __post_init__(self) -> None:
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(
                f"DiTConfig {self.name!r}: heads*head_dim = {self.heads}*{self.head_dim} must "
                f"equal hidden = {self.hidden}"
            )
        if self.text_mode not in ("joint", "cross"):
            raise ValueError(
                f"DiTConfig.text_mode must be 'joint' or 'cross', got {self.text_mode!r}"
            )

    @property
    def layers(self) -> int:
        """Transformer blocks in total."""
        return sum(b.count for b in self.blocks)

    @property
    def mlp_ratio(self) -> float:
        return self.ffn / self.hidden

    @property
    def is_video(self) -> bool:
        return self.fps > 0

    @property
    def joint_text_len(self) -> int:
        """Text tokens inside the self-attention (0 for cross-attention models)."""
        return self.text_len if self.text_mode == "joint" else 0

    def latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` video frames: ``(frames - 1) // vae_temporal + 1``.

        This is the causal video VAEs' rule (CogVideoX, HunyuanVideo and Wan pipelines use it;
        their native lengths are ``4k + 1`` frames).
        """
        if not self.is_video:
            if frames != 1:
                raise ValueError(
                    f"model {self.name!r} makes images: frames must be 1, got {frames}"
                )
            return 1
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        return (frames - 1) // self.vae_temporal + 1

    def tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Image/video tokens of one sample (text tokens not included).

        ``(latent_frames / patch_t) * (height // (vae * patch_h)) * (width // (vae * patch_w))``;
        a size that does not divide is rounded down, as the diffusers pipelines do.

        Raises:
            ValueError: a size too small for one token, or ``frames != 1`` for an image model.
        """
        pt, ph, pw = self.patch
        t = -(-self.latent_frames(frames) // pt)
        h = height // (self.vae_spatial * ph)
        w = width // (self.vae_spatial * pw)
        if h < 1 or w < 1:
            raise ValueError(
                f"{height}x{width} px is smaller than one {self.name} token "
                f"({self.vae_spatial * ph}x{self.vae_spatial * pw} px)"
            )
        return t * h * w

    def frames_for(self, seconds: float) -> int:
        """Frames of a ``seconds`` long clip at the model's fps (``seconds * fps + 1``)."""
        if not self.is_video:
            raise ValueError(f"model {self.name!r} makes images, not video")
        return round(seconds * self.fps) + 1


def _mmdit_stream(hidden: int, ffn: int) -> int:
    """Weights per token of one MMDiT stream: q, k, v, out (4 h^2) + MLP up and down."""
    return 4 * hidden * hidden + 2 * hidden * ffn


def _flux() -> DiTConfig:
    # black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel):
    # num_layers 19, num_single_layers 38, num_attention_heads 24, attention_head_dim 128,
    # in_channels 64 (16 latent channels x 2x2 packing), patch_size 1.
    h, ffn = 3072, 4 * 3072  # FeedForward(dim) inner 4*dim; single blocks mlp_ratio 4.0
    stream = _mmdit_stream(h, ffn)
    return DiTConfig(
        name="flux",
        hf_repo="black-forest-labs/FLUX.1-dev",
        heads=24,
        head_dim=128,
        hidden=h,
        ffn=ffn,
        text_len=512,  # FluxPipeline max_sequence_length=512 (T5-XXL) for dev
        text_mode="joint",
        vae_spatial=8,  # AutoencoderKL, 8x
        vae_temporal=1,
        patch=(1, 2, 2),  # the pipeline packs 2x2 latents per token: 16x16 px per token
        fps=0,
        blocks=(
            # double: image stream and text stream, each 4h^2 + 2*h*ffn
            BlockKind(name="double", count=19, image_weights=stream, text_weights=stream),
            # single: text concatenated to image; linear1 h->(3h+ffn), linear2 (h+ffn)->h
            BlockKind(name="single", count=38, image_weights=stream, text_weights=stream),
        ),
    )


def _sd3() -> DiTConfig:
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    # (SD3Transformer2DModel): num_layers 24, num_attention_heads 24, attention_head_dim 64,
    # patch_size 2, in_channels 16, caption_projection_dim 1536, qk_norm null.
    # SD3-medium rather than 3.5-large: its 24 heads split like Flux's; 3.5-large has 38 heads
    # (= 2 x 19), which no Ulysses degree above 2 divides.
    h, ffn = 1536, 4 * 1536
    stream = _mmdit_stream(h, ffn)
    return DiTConfig(
        name="sd3",
        hf_repo="stabilityai/stable-diffusion-3-medium-diffusers",
        heads=24,
        head_dim=64,
        hidden=h,
        ffn=ffn,
        # CLIP-L/G 77 tokens + T5 max_sequence_length=256 (StableDiffusion3Pipeline default),
        # concatenated along the sequence
        text_len=77 + 256,
        text_mode="joint",
        vae_spatial=8,
        vae_temporal=1,
        patch=(1, 2, 2),
        fps=0,
        blocks=(
            BlockKind(name="joint", count=23, image_weights=stream, text_weights=stream),
            # the last block is context_pre_only: its text stream stops after q, k, v
            BlockKind(name="last", count=1, image_weights=stream, text_weights=3 * h * h),
        ),
    )


def _cogvideox() -> DiTConfig:
    # THUDM/CogVideoX-5b, transformer/config.json (CogVideoXTransformer3DModel):
    # num_layers 42, num_attention_heads 48, attention_head_dim 64, patch_size 2,
    # patch_size_t null, temporal_compression_ratio 4, max_text_seq_length 226.
    # Text and video tokens go through the same q, k, v, out and MLP weights (one sequence).
    h, ffn = 3072, 4 * 3072  # ff_inner_dim None -> 4*dim
    stream = _mmdit_stream(h, ffn)
    return DiTConfig(
        name="cogvideox",
        hf_repo="THUDM/CogVideoX-5b",
        heads=48,
        head_dim=64,
        hidden=h,
        ffn=ffn,
        text_len=226,
        text_mode="joint",
        vae_spatial=8,
        vae_temporal=4,
        patch=(1, 2, 2),
        fps=8,  # CogVideoX pipelines: 49 frames = 6 s x 8 fps + 1
        blocks=(BlockKind(name="block", count=42, image_weights=stream, text_weights=stream),),
    )


def _hunyuanvideo() -> DiTConfig:
    # hunyuanvideo-community/HunyuanVideo, transformer/config.json
    # (HunyuanVideoTransformer3DModel): num_layers 20, num_single_layers 40,
    # num_attention_heads 24, attention_head_dim 128, mlp_ratio 4.0, patch_size 2,
    # patch_size_t 1. The 2-layer token refiner runs on the text only and is left out.
    h, ffn = 3072, 4 * 3072
    stream = _mmdit_stream(h, ffn)
    return DiTConfig(
        name="hunyuanvideo",
        hf_repo="hunyuanvideo-community/HunyuanVideo",
        heads=24,
        head_dim=128,
        hidden=h,
        ffn=ffn,
        text_len=256,  # HunyuanVideoPipeline max_sequence_length=256 (LLaMA tokens after the template)
        text_mode="joint",
        vae_spatial=8,
        vae_temporal=4,
        patch=(1, 2, 2),
        fps=24,  # unsure: the model card's sample videos are 129 frames at 24 fps
        blocks=(
            BlockKind(name="double", count=20, image_weights=stream, text_weights=stream),
            BlockKind(name="single", count=40, image_weights=stream, text_weights=stream),
        ),
    )


def _wan() -> DiTConfig:
    # Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json (WanTransformer3DModel):
    # num_layers 40, num_attention_heads 40, attention_head_dim 128, ffn_dim 13824,
    # patch_size [1, 2, 2], text_dim 4096.
    h, ffn = 5120, 13824
    return DiTConfig(
        name="wan",
        hf_repo="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        heads=40,
        head_dim=128,
        hidden=h,
        ffn=ffn,
        text_len=512,  # WanPipeline __call__ max_sequence_length=512 (umT5)
        text_mode="cross",
        vae_spatial=8,
        vae_temporal=4,
        patch=(1, 2, 2),
        fps=16,  # diffusers' Wan examples export at 16 fps (81 frames = 5 s)
        blocks=(
            BlockKind(
                name="block",
                count=40,
                # self-attn q, k, v, out (4h^2) + cross-attn q, out (2h^2) + MLP h->ffn->h
                image_weights=6 * h * h + 2 * h * ffn,
                # cross-attn k, v of each text token (2h^2)
                text_weights=2 * h * h,
                cross_attention=True,
            ),
        ),
    )


MODELS: dict[str, DiTConfig] = {
    m.name: m for m in (_flux(), _sd3(), _cogvideox(), _hunyuanvideo(), _wan())
}


def get_model(name: str) -> DiTConfig:
    """The table entry for ``name``.

    Raises:
        ValueError: unknown model (the message lists the known ones).
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


__all__ = ["MODELS", "BlockKind", "DiTConfig", "get_model"]
