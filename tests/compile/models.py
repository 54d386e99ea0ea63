"""Models the compile tests and the benchmark build: the hand-written DiT and tiny diffusers
Flux and Wan (random weights, same on every rank), with their inputs.

``build(name)`` returns ``(model, kwargs, output)`` where ``output(model(**kwargs))`` is the
tuple of output tensors to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tiny_dit import make_inputs, make_model

Built = tuple[torch.nn.Module, dict[str, torch.Tensor], Callable[[Any], tuple[torch.Tensor, ...]]]

FLUX_IMAGE_TOKENS = 35  # 5 x 7 grid: uneven over 2 and 4 ranks
FLUX_TEXT = 6
FLUX_HEADS = 4


def tiny_dit() -> Built:
    image, t, text = make_inputs()
    return make_model(), {"image": image, "t": t, "text": text}, tuple


def flux(grid: tuple[int, int] = (5, 7), layers: tuple[int, int] = (1, 1)) -> Built:
    """A tiny ``FluxTransformer2DModel`` (dual- and single-stream blocks, joint text, RoPE)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers[0],
        num_single_layers=layers[1],
        attention_head_dim=16,
        num_attention_heads=FLUX_HEADS,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    g = torch.Generator().manual_seed(1)
    tokens = grid[0] * grid[1]
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // grid[1]
    img_ids[:, 2] = torch.arange(tokens) % grid[1]
    kwargs = dict(
        hidden_states=torch.randn(2, tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(2, FLUX_TEXT, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.rand(2, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(FLUX_TEXT, 3),
    )
    return model.eval(), kwargs, lambda out: (out.sample,)


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
