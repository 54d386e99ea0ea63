"""What a local diffusers pipeline directory holds, read from its JSON files alone.

``streamfusion generate`` checks its options against the model before any rank starts or
any weight loads: the family (from ``model_index.json``'s pipeline class), the pixels per
token (VAE factor x patch, and the pipeline's own rule), the valid frame counts of a video
model (the VAE's temporal factor) and the attention heads (which degrees can split them).
:func:`inspect_model_dir` reads exactly what the pipelines compute in their ``__init__``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = ["FAMILIES", "ModelDir", "inspect_model_dir"]

Config = dict[str, Any]


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class _Family:
    pipeline: str  # the diffusers pipeline class of model_index.json
    video: bool
    fps: int  # frames per second of a written video (the family's usual)
    # (transformer config, vae config) -> (pixel step: the tokens' VAE factor x patch and the
    # pipeline's own rule, temporal VAE factor or 0 for images)
    factors: Callable[[Config, Config], tuple[int, int]]


def _blocks_factor(vae: Config) -> int:
    """2 ** (down blocks - 1): AutoencoderKL's and CogVideoX's spatial factor."""
    return 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def _flux(tr: Config, vae: Config) -> tuple[int, int]:
    spatial = _blocks_factor(vae)
    return spatial * 2, 0  # latents are packed 2x2 per token


def _sd3(tr: Config, vae: Config) -> tuple[int, int]:
    spatial = _blocks_factor(vae)
    return spatial * int(tr.get("patch_size", 2)), 0


def _cogvideox(tr: Config, vae: Config) -> tuple[int, int]:
    spatial = _blocks_factor(vae)
    step = math.lcm(spatial * int(tr.get("patch_size", 2)), 8)  # 8: the pipeline's check
    # The VAE decodes latent frames in pairs after the first: an even latent count comes back
    # with the wrong number of frames (5 frames in, 8 out), so frames - 1 steps by 2 x factor.
    return step, 2 * int(vae.get("temporal_compression_ratio", 4))


def _hunyuanvideo(tr: Config, vae: Config) -> tuple[int, int]:
    spatial = int(vae.get("spatial_compression_ratio", 8))
    step = math.lcm(spatial * int(tr.get("patch_size", 2)), 16)  # 16: the pipeline's check
    return step, int(vae.get("temporal_compression_ratio", 4))


def _wan(tr: Config, vae: Config) -> tuple[int, int]:
    spatial = int(vae.get("scale_factor_spatial") or 8)
    patch = tr.get("patch_size", (1, 2, 2))
    step = math.lcm(spatial * int(patch[1]), 16)  # 16: the pipeline's check
    return step, int(vae.get("scale_factor_temporal") or 4)


_FAMILIES: dict[str, _Family] = {
    "flux": _Family(pipeline="FluxPipeline", video=False, fps=0, factors=_flux),
    "sd3": _Family(pipeline="StableDiffusion3Pipeline", video=False, fps=0, factors=_sd3),
    "cogvideox": _Family(pipeline="CogVideoXPipeline", video=True, fps=8, factors=_cogvideox),
    "hunyuanvideo": _Family(
        pipeline="HunyuanVideoPipeline", video=True, fps=15, factors=_hunyuanvideo
    ),
    "wan": _Family(pipeline="WanPipeline", video=True, fps=16, factors=_wan),
}
FAMILIES = tuple(_FAMILIES)


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class ModelDir:
    """A pipeline directory, as far as its JSON files tell.

    Attributes:
        path: the directory.
        family: "flux", "sd3", "cogvideox", "hunyuanvideo" or "wan".
        pipeline: the diffusers pipeline class name.
        video: whether the pipeline makes videos (``num_frames``).
        pixel_step: height and width must be multiples of it (VAE factor x patch, and the
            pipeline's own rule, which it would otherwise round to silently).
        temporal: the VAE's temporal factor (video: frames - 1 must be a multiple), else 0.
        heads: the transformer's attention heads.
        transformer: the transformer's class name.
        fps: frames per second of a written video.
    """

    path: str
    family: str
    pipeline: str
    video: bool
    pixel_step: int
    temporal: int
    heads: int
    transformer: str
    fps: int

    def check_size(self, value: int) -> str | None:
        """None if ``value`` px fits, else what is wrong and the nearest values that fit."""
        if value % self.pixel_step == 0:
            return None
        low = value // self.pixel_step * self.pixel_step
        near = " or ".join(str(v) for v in (low, low + self.pixel_step) if v)
        return (
            f"{value} px is not a multiple of {self.pixel_step} ({self.family} takes "
            f"{self.pixel_step} px per token row/column here); e.g. {near}"
        )

    def check_frames(self, frames: int) -> str | None:
        """None if ``frames`` fits, else what is wrong and what is allowed."""
        if not self.video:
            return (
                f"{self.family} ({self.pipeline}) makes images; --frames is for the video "
                f"families: {', '.join(n for n, f in _FAMILIES.items() if f.video)}"
            )
        if (frames - 1) % self.temporal == 0:
            return None
        low = (frames - 1) // self.temporal * self.temporal + 1
        return (
            f"{frames} frames do not fit the VAE's temporal factor {self.temporal}: frames - 1 "
            f"must be a multiple of {self.temporal}, e.g. {low} or {low + self.temporal}"
        )


def _read_json(path: str, what: str) -> Config:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read {path} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} is not a JSON object")
    return data


def inspect_model_dir(path: str) -> ModelDir:
    """Read a local diffusers pipeline directory's family, sizes and heads, loading nothing.

    Raises:
        ValueError: ``path`` is not a directory, holds no ``model_index.json`` (not a
            diffusers pipeline: the message says what is expected), its pipeline class is not
            one of the five supported families (the message names them), or a component's
            config is missing.
    """
    supported = ", ".join(f"{f.pipeline} ({n})" for n, f in _FAMILIES.items())
    if not os.path.isdir(path):
        raise ValueError(
            f"{path!r} is not a directory; expected a local diffusers pipeline directory "
            f"(model_index.json with transformer/, vae/, ...), e.g. from "
            f"`streamfusion make-tiny DIR --model flux`"
        )
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"{path!r} is not a diffusers pipeline directory: it has no model_index.json "
            f"(a transformer-only directory is not enough; supported pipelines: {supported})"
        )
    index = _read_json(os.path.join(path, "model_index.json"), "model directory")
    cls = index.get("_class_name")
    by_class = {f.pipeline: n for n, f in _FAMILIES.items()}
    if cls not in by_class:
        raise ValueError(
            f"{path!r} holds a {cls} pipeline; streamfusion generate runs these: {supported}"
        )
    name = by_class[cls]
    family = _FAMILIES[name]
    transformer = _read_json(os.path.join(path, "transformer", "config.json"), cls)
    vae = _read_json(os.path.join(path, "vae", "config.json"), cls)
    step, temporal = family.factors(transformer, vae)
    return ModelDir(
        path=path,
        family=name,
        pipeline=cls,
        video=family.video,
        pixel_step=step,
        temporal=temporal,
        heads=int(transformer.get("num_attention_heads", 0)),
        transformer=str(transformer.get("_class_name", "")),
        fps=family.fps,
    )
