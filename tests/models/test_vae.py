"""Tier 2: the parallel VAE decode (sf_models.vae) equals one process's ``vae.decode``.

The reference is ``vae.decode(z).sample`` in one process on the same weights and latent. The
ranks split the latent's rows (uneven bands: heights that do not divide by the world), the
convolutions take halo rows from their neighbours, GroupNorm uses whole-image statistics and
the mid block's attention sees every band's keys.

Tolerance: float32 throughout; the split changes only summation order (a convolution over a
band, GroupNorm sums gathered per rank, attention over gathered keys), ~1e-7 relative per
layer; 1e-4 relative to the output's largest value leaves margin while a seam (per-band
GroupNorm statistics, a missing halo row, zero padding inside the image) moves the output by
1e-2 or more. bf16: 2e-2, a few bf16 roundings (8 bits) through the decoder.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sf_comm
from sf_models import parallelize

REL_TOL = 1e-4  # see the module docstring
BF16_TOL = 2e-2

# name -> (class, config): Flux-like (no quant convs, 3 levels), SD3-like, CogVideoX-like
# (causal 3D convolutions with conv caches, spatial norms conditioned on the latent),
# HunyuanVideo-like (replicate padding at the edges, a frame-causal mask in the mid block's
# attention), Wan 2.1-like (causal 3D convolutions with frame caches, temporal upsampling,
# per-frame attention)
VAES: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-like": (
        "AutoencoderKL",
        dict(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    ),
    "sd3-like": (
        "AutoencoderKL",
        dict(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=2,
        ),
    ),
    "cogvideox-like": (
        "AutoencoderKLCogVideoX",
        dict(
            block_out_channels=(8, 16, 16, 16),
            norm_num_groups=4,
            latent_channels=4,
            layers_per_block=1,
        ),
    ),
    "hunyuanvideo-like": (
        "AutoencoderKLHunyuanVideo",
        dict(
            block_out_channels=(8, 16, 16, 16),
            norm_num_groups=4,
            latent_channels=4,
            layers_per_block=1,
        ),
    ),
    "wan-like": (
        "AutoencoderKLWan",
        dict(
            base_dim=16,
            z_dim=4,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
        ),
    ),
}
LATENT_CHANNELS = 4
FRAMES = 3  # latent frames of the video VAEs


def _vae(name: str, dtype: torch.dtype = torch.float32) -> Any:
    import diffusers

    cls, config = VAES[name]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config).eval().to(dtype)


def _latent(name: str, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    frames = (FRAMES,) if VAES[name][0] != "AutoencoderKL" else ()
    g = torch.Generator().manual_seed(height * 100 + width)
    return torch.randn(1, LATENT_CHANNELS, *frames, height, width, generator=g).to(dtype)


def _decode_on_ranks(
    ctx: sf_comm.Context, name: str, height: int, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, float, float]:
    """(the parallel decode, this rank's decoder FLOPs, one process's FLOPs)."""
    vae = _vae(name, dtype)
    z = _latent(name, height, width, dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as single:
        vae.decode(z)
    pvae = parallelize(vae, ctx=ctx)
    with FlopCounterMode(display=False) as mine:
        out = pvae.decode(z).sample
    back = pvae.close()
    assert back is vae
    return out, float(mine.get_total_flops()), float(single.get_total_flops())


@pytest.mark.parametrize("name", list(VAES))
@pytest.mark.parametrize(("world", "topology"), [(2, "1x2"), (4, "2x2")])
@pytest.mark.parametrize(("height", "width"), [(11, 7), pytest.param(6, 9, marks=pytest.mark.slow)])
def test_parallel_decode_equals_one_process(
    ranks: Any, name: str, world: int, topology: str, height: int, width: int
) -> None:
    """Catches a seam between bands (per-band GroupNorm statistics, a halo row missing or
    taken from the wrong neighbour, the image edge padded twice), a band's rows gathered out
    of order, or attention over the band's own keys only; and a rank doing more than its
    share of the decoder's work (the halo rows aside)."""
    with torch.no_grad():
        ref = _vae(name).decode(_latent(name, height, width, torch.float32)).sample
    outs = ranks(world).run(
        _decode_on_ranks, name, height, width, torch.float32, topology=topology, transport="shm"
    )
    for out, _, _ in outs:
        assert out.shape == ref.shape
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < REL_TOL, (name, world, height, width, err)
    single = outs[0][2]
    for _, flops, _ in outs:
        # 1/world of the work, plus the halo rows' share (one row above and below the band at
        # each level: at most 2 rows over the band's ceil(height / world) rows)
        share = (-(-height // world) + 2) / height
        assert flops <= single * share * 1.05, (flops / single, share)


def test_bf16_decode(ranks: Any) -> None:
    """Catches float32-only statistics code (GroupNorm sums in bf16 lose whole digits)."""
    name = "flux-like"
    with torch.no_grad():
        ref = _vae(name).decode(_latent(name, 11, 7, torch.float32)).sample
    outs = ranks(2).run(
        _decode_on_ranks, name, 11, 7, torch.bfloat16, topology="1x2", transport="shm"
    )
    err = ((outs[0][0].float() - ref).abs().max() / ref.abs().max()).item()
    assert err < BF16_TOL, err


def _bad_inputs(ctx: sf_comm.Context) -> list[str]:
    from diffusers import AutoencoderKLTemporalDecoder

    from tests.models._common import error_messages

    vae = _vae("sd3-like")
    pvae = parallelize(vae, ctx=ctx)
    msgs = error_messages(
        [
            lambda: parallelize(
                AutoencoderKLTemporalDecoder(block_out_channels=(32,), latent_channels=4),
                ctx=ctx,
            ),
            lambda: pvae.decode(_latent("sd3-like", 5 + ctx.rank, 5, torch.float32)[..., :5, :]),
        ]
    )
    z = _latent("sd3-like", 5, 5, torch.float32)
    plain = vae.decode(z).sample  # hooks inactive outside pvae.decode: the original VAE
    pvae.close()
    assert torch.equal(plain, vae.decode(z).sample), "the VAE changed outside the wrapper"
    return msgs


def test_bad_inputs_are_named(ranks: Any) -> None:
    """Catches an unsupported VAE decoding wrongly (or hanging) instead of a clear error, a
    ranks given different latents (rank-seeded noise) stitching bands of different images, and
    the hooks changing what the VAE computes when called on its own."""
    msgs = ranks(2).run(_bad_inputs, topology="1x2", transport="shm")[0]
    assert "AutoencoderKLTemporalDecoder" in msgs[0] and "AutoencoderKLWan" in msgs[0], msgs[0]
    assert "different latents (ranks [1] differ from rank 0)" in msgs[1], msgs[1]


def _decode_short(ctx: sf_comm.Context, name: str, height: int) -> tuple[torch.Tensor, list[str]]:
    """The parallel decode of a ``height``-row latent, and the warnings this rank gave."""
    pvae = parallelize(_vae(name), ctx=ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pvae.decode(_latent(name, height, 5, torch.float32)).sample
    pvae.close()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("name", "height"),
    [("flux-like", 1), ("flux-like", 3), ("hunyuanvideo-like", 3), ("wan-like", 2)],
)
def test_too_few_rows_decode_on_fewer_ranks(ranks: Any, name: str, height: int) -> None:
    """Catches a latent with fewer rows than ranks failing (or giving empty bands) instead of
    decoding exactly on as many ranks as it has rows, the ranks left out not getting the
    image, or the fallback going unsaid."""
    with torch.no_grad():
        ref = _vae(name).decode(_latent(name, height, 5, torch.float32)).sample
    outs = ranks(4).run(_decode_short, name, height, topology="2x2", transport="shm")
    for out, _ in outs:
        assert ((out - ref).abs().max() / ref.abs().max()).item() < REL_TOL
    assert [len(said) for _, said in outs] == [1, 0, 0, 0], outs[0][1]
    assert f"decoding on the first {height} ranks" in outs[0][1][0], outs[0][1]


def test_bench_vae_rows() -> None:
    """Catches the VAE bench reporting a decode that differs between world sizes (it compares
    each world's image with one rank's), or losing a rank's memory figure."""
    from sf_models import vae_bench

    rows = vae_bench.run((1, 2), latent=(9, 5), config=VAES["sd3-like"][1], iters=1)
    assert [r["world"] for r in rows] == [1, 2]
    assert [len(r["peak_bytes"]) for r in rows] == [1, 2]
    assert max(rows[1]["peak_bytes"]) < rows[0]["peak_bytes"][0]
    assert rows[1]["max_abs_vs_first"] < 1e-4 and rows[1]["decode_s"] > 0
