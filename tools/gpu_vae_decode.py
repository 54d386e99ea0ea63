"""One real-size parallel VAE decode on GPUs, for ``tools/gpu_memory.sh``: the VAE built
from the released config (random weights), a random latent of a real output size, bf16,
decoded by ``sf_models.parallelize(vae, ctx=ctx)`` (world 1: the plain VAE). Prints one
JSON line on rank 0: decode seconds, every rank's peak allocated memory above the weights
and latent, and the largest difference from the world-1 image saved under ``--reference``.

    torchrun --nproc-per-node N tools/gpu_vae_decode.py --vae wan --reference /tmp/ref-wan.pt
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

import sf_comm
import sf_models

# Wan 2.1's VAE is diffusers' AutoencoderKLWan default; 81 frames of 1280x720 -> 21x90x160.
# Flux's is AutoencoderKL with these; 4096x4096 -> 512x512.
FLUX_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
LATENTS = {"wan": (1, 16, 21, 90, 160), "flux": (1, 16, 512, 512)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae", choices=sorted(LATENTS), required=True)
    parser.add_argument("--reference", required=True, help="world 1 writes it, others compare")
    args = parser.parse_args()
    ctx = sf_comm.init()
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.manual_seed(0)
    vae: Any = AutoencoderKLWan() if args.vae == "wan" else AutoencoderKL(**FLUX_VAE)
    vae = vae.to(ctx.device, torch.bfloat16).eval()
    z = torch.randn(LATENTS[args.vae], generator=torch.Generator().manual_seed(1))
    z = z.to(ctx.device, torch.bfloat16)
    decoder = sf_models.parallelize(vae, ctx=ctx) if ctx.world_size > 1 else vae
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    start = time.perf_counter()
    with torch.no_grad():
        image = decoder.decode(z).sample
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(ctx.device) - base
    peaks: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(peaks, peak)
    if ctx.rank == 0:
        diff = None
        if ctx.world_size == 1:
            torch.save(image.cpu(), args.reference)
        elif os.path.exists(args.reference):
            diff = float((image.cpu().float() - torch.load(args.reference).float()).abs().max())
        print(
            json.dumps(
                {
                    "vae": args.vae,
                    "latent": list(z.shape),
                    "image": list(image.shape),
                    "world": ctx.world_size,
                    "decode_s": seconds,
                    "peak_gib_per_rank": [p / 2**30 for p in peaks],
                    "weights_gib": sum(p.numel() * 2 for p in vae.parameters()) / 2**30,
                    "max_abs_vs_world_1": diff,
                }
            ),
            flush=True,
        )
    ctx.close()


if __name__ == "__main__":
    main()
