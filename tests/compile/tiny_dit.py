"""A small hand-written DiT for the compile tests (no parallel code in it).

It has what the backend must handle in a real DiT: an image patchified into tokens by
view/permute/reshape (the token dim is formed by a reshape), a learned positional embedding
added to the tokens (must be sliced), a timestep embedding broadcast over the tokens through
adaLN modulation (must not be sliced), a fused QKV projection split by view/permute/unbind,
RMS-normed q/k, self-attention (F.scaled_dot_product_attention in [B, H, S, D]),
cross-attention to replicated text tokens, a GELU MLP, the unpatchify reshape (splits the
token dim: needs all tokens) and a pooled output (mean over the tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 2
CHANNELS = 4
WIDTH = 32
HEADS = 4
TEXT_WIDTH = 24


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of a [batch] timestep vector -> [batch, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, text_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.norm_q = nn.RMSNorm(width // heads)
        self.norm_k = nn.RMSNorm(width // heads)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(text_width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        heads, head_dim = self.heads, width // self.heads
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(temb)).chunk(
            6, dim=-1
        )

        h = self.norm1(x) * (1 + scale1[:, None]) + shift1.unsqueeze(1)
        q, k, v = self.qkv(h).view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.norm_q(q), self.norm_k(k)
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(batch, seq, width))

        # Cross-attention to the (replicated) text tokens.
        cq = self.cross_q(self.norm2(x)).unflatten(-1, (heads, head_dim)).transpose(1, 2)
        ck, cv = self.cross_kv(text).unflatten(-1, (2, heads, head_dim)).permute(2, 0, 3, 1, 4)
        cross = F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).flatten(2)
        x = x + self.cross_out(cross)

        h = self.norm3(x) * (1 + scale2.unsqueeze(1)) + shift2[:, None, :]
        return x + gate2.unsqueeze(1) * self.mlp(h)


class TinyDiT(nn.Module):
    """Image [B, C, H, W] + timestep [B] + text [B, T, TEXT_WIDTH] -> (image, pooled [B, WIDTH])."""

    def __init__(self, height: int, width_px: int, depth: int = 2) -> None:
        super().__init__()
        self.grid = (height // PATCH, width_px // PATCH)
        tokens = self.grid[0] * self.grid[1]
        self.patch_in = nn.Linear(CHANNELS * PATCH * PATCH, WIDTH)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, WIDTH) * 0.5)
        self.time_mlp = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS, TEXT_WIDTH) for _ in range(depth))
        self.norm_out = nn.LayerNorm(WIDTH)
        self.patch_out = nn.Linear(WIDTH, CHANNELS * PATCH * PATCH)
        self.pool_head = nn.Linear(WIDTH, WIDTH)

    def forward(
        self, image: torch.Tensor, t: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = image.shape
        gh, gw = height // PATCH, width // PATCH
        patches = image.view(batch, channels, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_in(patches.reshape(batch, gh * gw, channels * PATCH * PATCH))
        x = x + self.pos_embed
        temb = self.time_mlp(timestep_embedding(t, WIDTH))
        for block in self.blocks:
            x = block(x, temb, text)
        pooled = self.pool_head(x.mean(dim=1))
        x = self.patch_out(self.norm_out(x))
        x = x.reshape(batch, gh, gw, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, channels, height, width), pooled


def make_model(height: int = 10, width: int = 14, depth: int = 2) -> TinyDiT:
    torch.manual_seed(0)  # same weights on every rank
    return TinyDiT(height, width, depth).eval()


def make_inputs(
    batch: int = 2, height: int = 10, width: int = 14, text: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, CHANNELS, height, width, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, text, TEXT_WIDTH, generator=g),
    )
