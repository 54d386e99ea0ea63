"""Models the compile tests build: the hand-written DiT and tiny diffusers Flux (the
benchmark's, from :func:`sf_compile.compile_bench.flux_stack`) and Wan (random weights, same on every
rank), with their inputs.

``build(name)`` returns ``(model, kwargs, output)`` where ``output(model(**kwargs))`` is the
tuple of output tensors to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sf_compile.compile_bench import FLUX_DIMS, flux_stack

from .tiny_dit import make_inputs, make_model

Built = tuple[torch.nn.Module, dict[str, torch.Tensor], Callable[[Any], tuple[torch.Tensor, ...]]]

FLUX_IMAGE_TOKENS = 35  # 5 x 7 grid: uneven over 2 and 4 ranks
FLUX_TEXT = FLUX_DIMS["tiny"]["text"]
FLUX_HEADS = FLUX_DIMS["tiny"]["num_attention_heads"]


def tiny_dit() -> Built:
    image, t, text = make_inputs()
    return make_model(), {"image": image, "t": t, "text": text}, tuple


def flux(grid: tuple[int, int] = (5, 7), layers: tuple[int, int] = (1, 1)) -> Built:
    """A tiny ``FluxTransformer2DModel`` (dual- and single-stream blocks, joint text, RoPE),
    batch 2: the benchmark's model (:func:`sf_compile.compile_bench.flux_stack`)."""
    model, kwargs = flux_stack("tiny", grid=grid, layers=layers, batch=2)
    return model, kwargs, lambda out: (out.sample,)


def wan() -> Built:
    """A tiny ``WanTransformer3DModel`` (3-D patch embedding, in-place RoPE, cross-attention)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    )
    g = torch.Generator().manual_seed(1)
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 3, 10, 6, generator=g),  # 3 x 5 x 3 = 45 tokens
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
    )
    return model.eval(), kwargs, lambda out: (out.sample,)


MODELS: dict[str, Callable[[], Built]] = {"tiny_dit": tiny_dit, "flux": flux, "wan": wan}


def build(name: str) -> Built:
    return MODELS[name]()
