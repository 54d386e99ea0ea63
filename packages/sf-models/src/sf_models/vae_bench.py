"""``streamfusion bench vae``: the parallel VAE decode on 1, 2, 4 ranks, side by side.

One latent, one VAE (seeded: the same weights on every rank and world), decoded by
:func:`sf_models.parallelize` (``sf_models.vae``) on each world size in turn: the median
time of the slowest rank, the ratio to one rank, each rank's peak memory growth during the
first decode (CUDA: ``max_memory_allocated`` above what was allocated before; CPU: the growth
of the process's peak RSS, a lower bound when earlier work peaked higher), and the largest
difference from the one-rank image. The default VAE is a Flux-shaped ``AutoencoderKL``
(16 latent channels, four levels) with narrower channels, so the CPU run takes seconds.
"""

from __future__ import annotations

import resource
import statistics
from typing import Any

import torch

import sf_comm
from sf_comm.collective_bench import slowest_rank_times
from sf_comm.launch import RankPool

__all__ = ["FLUX_SHAPED", "format_table", "run"]

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


def _peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@torch.no_grad()
def _rank_decode(
    ctx: sf_comm.Context, config: dict[str, Any], latent: tuple[int, int], iters: int
) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from .parallelize import parallelize

    torch.manual_seed(0)
    vae: Any = AutoencoderKL(**config)
    vae = vae.eval().to(ctx.device)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, config["latent_channels"], *latent, generator=g).to(ctx.device)
    pvae = parallelize(vae, ctx=ctx)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    before = (
        float(torch.cuda.memory_allocated(ctx.device))
        if ctx.device.type == "cuda"
        else _peak_bytes(ctx.device)
    )
    image = pvae.decode(z).sample
    growth = _peak_bytes(ctx.device) - before
    times = slowest_rank_times(ctx, lambda: pvae.decode(z), iters)
    pvae.close()
    return {"image": image.cpu() if ctx.rank == 0 else None, "growth": growth, "times": times}


def run(
    worlds: tuple[int, ...] = (1, 2, 4),
    latent: tuple[int, int] = (64, 64),
    config: dict[str, Any] | None = None,
    iters: int = 3,
) -> list[dict[str, Any]]:
    """Decode on each world size (topology 1xN, shm); one row per world, in order."""
    config = dict(config or FLUX_SHAPED)
    rows: list[dict[str, Any]] = []
    first: torch.Tensor | None = None
    for world in worlds:
        with RankPool(world, env={"SF_TIMEOUT": "300"}) as pool:
            out = pool.run(
                _rank_decode,
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
                "peak_growth_bytes": [r["growth"] for r in out],
                "max_abs_vs_first": float((image - first).abs().max()),
                "image_shape": list(image.shape),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["decode_s"]
    head = (
        f"{'ranks':>5} {'decode ms':>10} {'vs ' + str(rows[0]['world']) + ' rank':>9} "
        f"{'peak growth per rank, MiB':>26} {'max abs diff':>13}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        growth = ", ".join(f"{g / 2**20:.0f}" for g in row["peak_growth_bytes"])
        lines.append(
            f"{row['world']:>5} {row['decode_s'] * 1e3:>10.1f} {base / row['decode_s']:>8.2f}x "
            f"{growth:>26} {row['max_abs_vs_first']:>13.1e}"
        )
    return "\n".join(lines)
