"""``streamfusion bench memory``: the transformer's peak activation memory per rank, on 1, 2
and 4 ranks, against one process.

One forward of a Flux-shaped or Wan-shaped transformer (narrow: 4 heads x 32, one block of
each kind, so a CPU run takes seconds; the sequence is what matters: ``grid`` HxW image
tokens for Flux, HxW tokens per frame of a 4-frame video for Wan) on the same inputs: the
plain model in one process, then ``sf_models.parallelize`` on each world size and strategy.
Each rank's peak is measured by :class:`sf_models.memory.ActivationMeter` (the tensors the
forward creates; weights and inputs are not counted: they are the same on every rank), so
the figures are the same on CPU and GPU and do not depend on the allocator. The table gives
the largest rank's peak, its ratio to one process, and ``1/world`` beside it: the ideal for
the sequence-proportional part.
"""

from __future__ import annotations

from typing import Any

import torch

import sf_comm
from sf_comm.launch import RankPool

from .memory import ActivationMeter

__all__ = ["FAMILIES", "format_table", "run"]

FAMILIES = ("flux", "wan")
HEADS, HEAD_DIM, TEXT, FRAMES = 4, 32, 64, 4


def _flux(grid: tuple[int, int]) -> tuple[Any, dict[str, torch.Tensor]]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
    )
    g = torch.Generator().manual_seed(1)
    tokens = grid[0] * grid[1]
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // grid[1]
    img_ids[:, 2] = torch.arange(tokens) % grid[1]
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 64, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 64, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.rand(1, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT, 3),
    )
    return model.eval(), inputs


def _wan(grid: tuple[int, int]) -> tuple[Any, dict[str, torch.Tensor]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=4 * HEADS * HEAD_DIM,
        num_layers=1,
        rope_max_seq_len=1024,
    )
    g = torch.Generator().manual_seed(1)
    # grid: tokens per frame of a FRAMES-frame video; the latent is twice as tall and wide
    inputs = dict(
        hidden_states=torch.randn(1, 16, FRAMES, 2 * grid[0], 2 * grid[1], generator=g),
        timestep=torch.randint(0, 1000, (1,), generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 64, generator=g),
    )
    return model.eval(), inputs


@torch.no_grad()
def _rank_peak(
    ctx: sf_comm.Context, family: str, grid: tuple[int, int], strategy: str | None
) -> dict[str, Any]:
    from .parallelize import parallelize

    model, inputs = (_flux if family == "flux" else _wan)(grid)
    model = model.to(ctx.device)
    inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
    run = model if strategy is None else parallelize(model, ctx=ctx, strategy=strategy)
    with ActivationMeter() as meter:
        run(**inputs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak": meter.peak_bytes, "peak_op": meter.peak_op, "weights": weights}


def run(
    family: str = "flux",
    grid: tuple[int, int] = (64, 64),
    worlds: tuple[int, ...] = (2, 4),
    strategies: tuple[str, ...] = ("ulysses", "ring", "usp", "tas"),
) -> list[dict[str, Any]]:
    """One row for one process, then one per (world, strategy); topology 1x2 / 2x2 / 1xN."""
    rows: list[dict[str, Any]] = []
    with RankPool(1) as pool:
        (one,) = pool.run(_rank_peak, family, grid, None, topology="1x1", transport="shm")
    rows.append({"world": 1, "strategy": "one process", **one, "peaks": [one["peak"]]})
    for world in worlds:
        topology = "2x2" if world == 4 else f"1x{world}"
        with RankPool(world, env={"SF_TIMEOUT": "300"}) as pool:
            for strategy in strategies:
                out = pool.run(
                    _rank_peak, family, grid, strategy, topology=topology, transport="shm"
                )
                worst = max(out, key=lambda r: r["peak"])
                rows.append(
                    {
                        "world": world,
                        "strategy": strategy,
                        **worst,
                        "peaks": [r["peak"] for r in out],
                    }
                )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["peak"]
    head = (
        f"{'ranks':>5} {'strategy':<12} {'peak MiB (largest rank)':>24} {'vs one process':>15} "
        f"{'1/world':>8}  peak reached after"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['world']:>5} {row['strategy']:<12} {row['peak'] / 2**20:>24.2f} "
            f"{row['peak'] / base:>15.2f} {1 / row['world']:>8.2f}  {row['peak_op']}"
        )
    lines.append(f"weights (every rank): {rows[0]['weights'] / 2**20:.2f} MiB")
    return "\n".join(lines)
