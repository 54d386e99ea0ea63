"""Tier 2: ``sf_models.parallelize(pipe)`` on a tiny stock diffusers ``FluxPipeline``.

Every rank builds the same pipeline from fixed seeds (tiny Flux transformer, tiny
``AutoencoderKL``, the real flow-matching scheduler; the text encoders are bypassed with
``prompt_embeds``/``pooled_prompt_embeds``, as tokenizers cannot be downloaded here), runs it
once on its own as the single-process reference, then parallelizes it and runs it again on
every rank with the same seeded generator.

Tolerance (``REL_TOL``, relative to the largest entry): everything is float32. The only
arithmetic that differs from the reference is attention (SDPA vs sf_attn's blockwise
online-softmax merges, ~1e-6 relative per layer, see ``tests/models/_common.py``); three
Euler steps add each step's prediction times a step size below 1, so the error does not
grow, and the VAE decode is the same smooth function on both sides (measured on 2x2: 1e-7 on
the latents, 5e-7 on the image, every strategy). 1e-4 leaves room for summation-order noise, while real bugs move
the result by 1e-2 or more (a wrong RoPE row, rank-dependent noise, a dropped token chunk).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

import sf_comm
from sf_models.parallelize import parallelize
from sf_models.pipeline import DecodeOn, ParallelPipeline

from ._common import STRATEGIES, error_messages, rel_err, same_on_every_rank
from .test_flux import make_model as make_flux_transformer

# 20 x 28 pixels -> 10 x 14 latent (VAE scale 2) -> 5 x 7 = 35 packed tokens: uneven over 4 ranks
HEIGHT, WIDTH, TEXT, STEPS = 20, 28, 6, 3
REL_TOL = 1e-4  # see the module docstring


def make_vae(latent_channels: int, scaling: float, shift: float) -> Any:
    torch.manual_seed(1)  # same weights on every rank
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),  # two blocks: VAE scale factor 2
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
    )
    return vae.eval()


def make_flux_pipe() -> Any:
    """A FluxPipeline with random tiny components (test_flux's transformer: 16 input channels
    are 4 latent channels packed 2x2), identical on every rank."""
    transformer = make_flux_transformer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=make_vae(4, scaling=0.3611, shift=0.1159),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def flux_args(seed: int = 5, **overrides: Any) -> dict[str, Any]:
    """Call arguments: fixed prompt embeds, and a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(3)
    args = dict(
        prompt_embeds=torch.randn(1, TEXT, 32, generator=g),
        pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return {**args, **overrides}


class LatentCapture:
    """``callback_on_step_end`` that keeps the latents after the last step."""

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None

    def __call__(self, pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.latents = tensors["latents"].clone()
        return {}


def count_decodes(pipe: Any) -> list[int]:
    """A one-element counter of VAE decoder runs from now on."""
    count = [0]
    pipe.vae.decoder.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@torch.no_grad()
def _generate(ctx: sf_comm.Context, strategy: str, decode_on: DecodeOn) -> dict[str, Any]:
    pipe = make_flux_pipe()
    ref_capture = LatentCapture()
    ref = pipe(**flux_args(), callback_on_step_end=ref_capture).images
    assert ref_capture.latents is not None
    decodes = count_decodes(pipe)

    sp = parallelize(pipe, ctx=ctx, strategy=strategy, decode_on=decode_on)
    capture = LatentCapture()
    out = sp(**flux_args(), callback_on_step_end=capture).images
    assert capture.latents is not None
    res: dict[str, Any] = dict(
        wrapper=isinstance(sp, ParallelPipeline) and sp.pipe is pipe,
        latents_rel_err=rel_err(capture.latents, ref_capture.latents),
        latents_same_on_every_rank=same_on_every_rank(ctx, capture.latents),
        decodes=decodes[0],
        progress_bar_disabled=pipe._progress_bar_config.get("disable", False),
        out_shape=tuple(out.shape),
    )
    if decode_on == "all":
        res["image_same_on_every_rank"] = same_on_every_rank(ctx, out)  # collective: all ranks
    if decode_on == "all" or ctx.rank == 0:
        res["image_rel_err"] = rel_err(out, ref)
    else:
        # output_type="latent": the pipeline's packed final latents, exactly rank 0's.
        res["returned_final_latents"] = torch.equal(out, capture.latents)
    return res


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flux_pipeline_same_image_on_4_ranks(ranks, strategy: str) -> None:
    """Catches the parallel pipeline drawing an image different from the single-process one:
    a transformer not swapped in the pipeline, rank-dependent noise or inputs, ranks drifting
    apart over the denoising steps (latents not bit-identical across ranks), a wrong split of
    the uneven 35-token image. Also catches decoding on ranks other than 0 (wasted VAE work),
    other ranks returning anything but the final latents, and progress bars on every rank.
    """
    results = ranks(4).run(_generate, strategy, "rank0", topology="2x2", transport="shm")
    for rank, res in enumerate(results):
        assert res["wrapper"], (rank, res)
        assert res["latents_rel_err"] < REL_TOL, (rank, res)
        assert res["latents_same_on_every_rank"], (rank, res)
        assert res["progress_bar_disabled"] == (rank != 0), (rank, res)
        if rank == 0:
            assert res["decodes"] == 1, res
            assert res["out_shape"] == (1, 3, HEIGHT, WIDTH), res
            assert res["image_rel_err"] < REL_TOL, res
        else:
            assert res["decodes"] == 0, (rank, res)
            assert res["out_shape"] == (1, 35, 16), (rank, res)
            assert res["returned_final_latents"], (rank, res)


def test_decode_on_all_ranks(ranks) -> None:
    """Catches ``decode_on="all"`` being ignored (only rank 0 decoding) or the ranks decoding
    different images: every rank must decode once and return the same image as one process.
    """
    results = ranks(4).run(_generate, "ring", "all", topology="2x2", transport="shm")
    for rank, res in enumerate(results):
        assert res["decodes"] == 1, (rank, res)
        assert res["image_rel_err"] < REL_TOL, (rank, res)
        assert res["image_same_on_every_rank"], (rank, res)


@torch.no_grad()
def _rank_seeded(ctx: sf_comm.Context) -> str:
    sp = parallelize(make_flux_pipe(), ctx=ctx, strategy="ring")
    try:
        sp(**flux_args(seed=ctx.rank))  # the bug: a seed derived from the rank
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_rank_dependent_noise_is_an_error(ranks) -> None:
    """Catches ranks silently denoising different noise (a generator seeded from the rank):
    the parallel transformer would mix the ranks' images into garbage. Every rank must raise
    the same clear error before the first parallel step (so none of them hangs)."""
    for msg in ranks(4).run(_rank_seeded, topology="2x2", transport="shm"):
        assert "'hidden_states' differs from rank 0's on ranks [1, 2, 3]" in msg, msg
        assert "manual_seed" in msg, msg


def _misuse(ctx: sf_comm.Context) -> list[str]:
    pipe = make_flux_pipe()
    cases = [
        lambda: parallelize(pipe, ctx=ctx, decode_on="gpu0"),  # type: ignore[call-overload]
        lambda: parallelize(pipe, ctx=ctx, text="split"),  # type: ignore[call-overload]
        lambda: parallelize(pipe.transformer, ctx=ctx, cfg_parallel=True),  # type: ignore[call-overload]
        lambda: parallelize(parallelize(make_flux_pipe(), ctx=ctx), ctx=ctx),
        lambda: parallelize(torch.nn.Linear(2, 2), ctx=ctx),
    ]
    return error_messages(cases)


def test_misuse_names_the_problem(ranks) -> None:
    """Catches bad arguments being accepted and failing later or silently: an unknown
    ``decode_on`` or ``text`` layout, ``cfg_parallel`` on a bare transformer (which has no guidance branches to
    split), a pipeline parallelized twice (the second wrapper would shard shards), and a
    model with no plan."""
    msgs = ranks(4).run(_misuse, topology="2x2", transport="shm")[0]
    assert "decode_on must be one of ('rank0', 'all'), got 'gpu0'" in msgs[0], msgs[0]
    assert "text must be one of ['auto', 'replicated', 'sharded'], got 'split'" in msgs[1], msgs[1]
    assert "cfg_parallel=True needs the pipeline" in msgs[2], msgs[2]
    assert "already parallelized" in msgs[3], msgs[3]
    assert "no sequence-parallel plan for Linear" in msgs[4], msgs[4]


def _text_layouts(ctx: sf_comm.Context) -> list[str]:
    return [
        parallelize(make_flux_pipe(), ctx=ctx, text=text).transformer.state.text
        for text in ("auto", "replicated", "sharded")
    ]


def test_text_layout_reaches_the_transformer(ranks) -> None:
    """Catches ``parallelize(pipe, text=...)`` not passing the text layout on to the
    pipeline's transformer (it would run with the default whatever was asked)."""
    for layouts in ranks(4).run(_text_layouts, topology="2x2", transport="shm"):
        assert layouts == ["sharded", "replicated", "sharded"], layouts
