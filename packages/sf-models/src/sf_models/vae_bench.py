"""``streamfusion bench vae``: the parallel VAE decode on 1, 2, 4 ranks, side by side.

One latent, one VAE (seeded: the same weights on every rank and world), decoded by
:func:`sf_models.parallelize` (``sf_models.vae``) on each world size in turn: the median
time of the slowest rank, the ratio to one rank, each rank's peak activation memory during
the first decode (:class:`sf_models.memory.ActivationMeter`: the tensors the decode creates;
the weights are the same on every rank) and the largest difference from the one-rank image.
Two VAEs, with narrower channels than the real ones so a CPU run takes seconds: a
Flux-shaped ``AutoencoderKL`` (16 latent channels, four levels) and a Wan-shaped
``AutoencoderKLWan`` (16 latent channels, causal 3D convolutions, a 3-frame latent).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

import sf_comm
from sf_comm.collective_bench import slowest_rank_times
from sf_comm.launch import RankPool

from .memory import ActivationMeter

__all__ = ["FLUX_SHAPED", "SHAPES", "WAN_SHAPED", "format_table", "run"]

FLUX_SHAPED = dict(
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    norm_num_groups=32,
    layers_per_block=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
WAN_SHAPED = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
WAN_FRAMES = 3  # latent frames: 9 video frames
# name: (diffusers class, config, latent frames (0: an image))
SHAPES: dict[str, tuple[str, dict[str, Any], int]] = {
    "flux": ("AutoencoderKL", FLUX_SHAPED, 0),
    "wan": ("AutoencoderKLWan", WAN_SHAPED, WAN_FRAMES),
}


@torch.no_grad()
def _rank_decode(
    ctx: sf_comm.Context, shape: str, config: dict[str, Any], latent: tuple[int, int], iters: int
) -> dict[str, Any]:
    import diffusers

    from .parallelize import parallelize

    cls, _, frames = SHAPES[shape]
    channels = config.get("latent_channels") or config["z_dim"]
    torch.manual_seed(0)
    vae: Any = getattr(diffusers, cls)(**config)
    vae = vae.eval().to(ctx.device)
    g = torch.Generator().manual_seed(1)
    size = (frames, *latent) if frames else latent
    z = torch.randn(1, channels, *size, generator=g).to(ctx.device)
    pvae = parallelize(vae, ctx=ctx)
    with ActivationMeter() as meter:
        image = pvae.decode(z).sample
    times = slowest_rank_times(ctx, lambda: pvae.decode(z), iters)
    pvae.close()
    return {
        "image": image.cpu() if ctx.rank == 0 else None,
        "peak": meter.peak_bytes,
        "times": times,
    }


def run(
    worlds: tuple[int, ...] = (1, 2, 4),
    latent: tuple[int, int] = (64, 64),
    config: dict[str, Any] | None = None,
    iters: int = 3,
    shape: str = "flux",
) -> list[dict[str, Any]]:
    """Decode on each world size (topology 1xN, shm); one row per world, in order.
    ``shape``: a :data:`SHAPES` name; ``config`` overrides its VAE config."""
    config = dict(config or SHAPES[shape][1])
    rows: list[dict[str, Any]] = []
    first: torch.Tensor | None = None
    for world in worlds:
        with RankPool(world, env={"SF_TIMEOUT": "300"}) as pool:
            out = pool.run(
                _rank_decode,
                shape,
                config,
                latent,
                iters,
                topology=f"1x{world}",
                transport="shm",
                timeout=1800,
            )
        image = out[0]["image"]
        first = image if first is None else first
        rows.append(
            {
                "world": world,
                "decode_s": statistics.median(out[0]["times"]),
                "peak_bytes": [r["peak"] for r in out],
                "max_abs_vs_first": float((image - first).abs().max()),
                "image_shape": list(image.shape),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["decode_s"]
    head = (
        f"{'ranks':>5} {'decode ms':>10} {'vs ' + str(rows[0]['world']) + ' rank':>9} "
        f"{'peak activation per rank, MiB':>30} {'max abs diff':>13}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        peaks = ", ".join(f"{g / 2**20:.0f}" for g in row["peak_bytes"])
        lines.append(
            f"{row['world']:>5} {row['decode_s'] * 1e3:>10.1f} {base / row['decode_s']:>8.2f}x "
            f"{peaks:>30} {row['max_abs_vs_first']:>13.1e}"
        )
    return "\n".join(lines)
