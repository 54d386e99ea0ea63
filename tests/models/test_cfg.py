"""Tier 2: CFG parallel — the two classifier-free-guidance branches on the two halves of 4
ranks (2x2: one machine per branch, 2-rank sequence parallelism inside each), against the
same stock diffusers pipeline run in one process.

The five stock pipelines cover both ways pipelines run guidance: SD3 and CogVideoX
(``"batched"``: one transformer call on ``[uncond; cond]``), Flux and HunyuanVideo with true
CFG, and Wan (``"paired"``: a cond and an uncond call per step; Note [Deferred first branch]
in ``sf_models.cfg``). Text encoders are bypassed with prompt embeds; the video pipelines
return latents (no VAE needed).

Tolerance (``REL_TOL``): as in ``tests/models/test_pipeline.py``: float32 throughout; attention
(SDPA vs sf_attn's blockwise merges) and half-size matmuls differ from the reference by
~1e-7 relative, and guidance multiplies that difference by its scale (3 here) at most
(measured: 2e-7 to 5e-7 on the latents, up to 8e-7 on SD3's decoded image). A
branch computed on the wrong text, the halves swapped, or a placeholder left unfilled moves
the result by 1e-2 or more (NaN for the placeholder).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import pytest
import torch
from diffusers import (
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    HunyuanVideoPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
)

import sf_comm
from sf_models.cfg import supported_cfg_pipelines
from sf_models.parallelize import parallelize

from ._common import error_messages, rel_err, same_on_every_rank
from .test_hunyuanvideo import make_model as make_hunyuanvideo_transformer
from .test_pipeline import (
    HEIGHT,
    STEPS,
    TEXT,
    WIDTH,
    LatentCapture,
    flux_args,
    hook_count,
    make_flux_pipe,
    make_vae,
)
from .test_wan import make_model as make_wan_transformer

REL_TOL = 1e-4  # see the module docstring
GUIDANCE = 3.0


def make_sd3() -> tuple[Any, dict[str, Any]]:
    """A StableDiffusion3Pipeline with random tiny components, and its call arguments."""
    torch.manual_seed(0)
    transformer: Any = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,  # 10 x 14 latent -> 35 image tokens: uneven over the 2 ranks of a half
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=make_vae(4, scaling=1.5305, shift=0.0609),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    g = torch.Generator().manual_seed(3)
    args = dict(
        prompt_embeds=torch.randn(1, TEXT, 24, generator=g),
        pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, TEXT, 24, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        guidance_scale=GUIDANCE,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        output_type="pt",
    )
    return pipe, args


def make_flux() -> tuple[Any, dict[str, Any]]:
    """The FluxPipeline of test_pipeline with true CFG on (negative embeds, true_cfg_scale)."""
    g = torch.Generator().manual_seed(4)
    args = flux_args(
        negative_prompt_embeds=torch.randn(1, TEXT, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        true_cfg_scale=GUIDANCE,
    )
    del args["generator"]
    return make_flux_pipe(), args


def video_args(**embeds: Any) -> dict[str, Any]:
    """Latent 3 x 6 x 10 (VAE scales 4 and 8) -> 45 video tokens: uneven over 2 ranks."""
    return dict(
        **embeds,
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=STEPS,
        output_type="latent",
    )


def make_wan() -> tuple[Any, dict[str, Any]]:
    """A WanPipeline (2.1 layout) with test_wan's random tiny transformer; latents out, no VAE."""
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=make_wan_transformer(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    g = torch.Generator().manual_seed(3)
    embeds = {k: torch.randn(1, 7, 16, generator=g) for k in ("prompt", "negative_prompt")}
    return pipe, video_args(
        prompt_embeds=embeds["prompt"],
        negative_prompt_embeds=embeds["negative_prompt"],
        guidance_scale=GUIDANCE,
    )


def make_cogvideox() -> tuple[Any, dict[str, Any]]:
    """A CogVideoXPipeline (5B layout: RoPE) with the stochastic DPM scheduler, which draws
    fresh noise from the generator every step; latents out, no VAE."""
    torch.manual_seed(0)
    transformer: Any = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,  # 3-D RoPE axes 4/6/6
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=2,
        sample_width=10,
        sample_height=6,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=7,
        use_rotary_positional_embeddings=True,
    )
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer.eval(),
        scheduler=CogVideoXDPMScheduler(),
    )
    g = torch.Generator().manual_seed(3)
    return pipe, video_args(
        prompt_embeds=torch.randn(1, 7, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 7, 16, generator=g),
        guidance_scale=GUIDANCE,
    )


def make_hunyuanvideo() -> tuple[Any, dict[str, Any]]:
    """A HunyuanVideoPipeline with true CFG (negative embeds, true_cfg_scale) and a padded
    prompt mask (test_hunyuanvideo's random tiny transformer); latents out, no VAE."""
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=make_hunyuanvideo_transformer(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(7) < 5  # 5 prompt tokens, 2 padding
    return pipe, video_args(
        prompt_embeds=torch.randn(1, 7, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        prompt_attention_mask=mask[None],
        negative_prompt_embeds=torch.randn(1, 7, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        negative_prompt_attention_mask=mask[None],
        true_cfg_scale=GUIDANCE,
    )


PIPELINES = {
    "sd3": make_sd3,
    "cogvideox": make_cogvideox,
    "flux": make_flux,
    "hunyuanvideo": make_hunyuanvideo,
    "wan": make_wan,
}
# The branch the first part (ranks 0, 1) runs: batched pipelines put the uncond half first,
# paired ones call cond first.
FIRST_BRANCH = {"sd3": "uncond", "cogvideox": "uncond", "flux": "cond"}
FIRST_BRANCH |= {"hunyuanvideo": "cond", "wan": "cond"}


def record_branches(
    transformer: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor
) -> list[str]:
    """Log, per call of the (unwrapped) transformer, which text it attended to: all of it, or
    with sharded text this rank's chunk of it."""
    seen: list[str] = []
    signature = inspect.signature(transformer.forward)

    def hook(_: Any, args: Any, kwargs: Any) -> None:
        text = signature.bind(*args, **kwargs).arguments["encoder_hidden_states"]
        names = [n for n, t in (("cond", cond), ("uncond", uncond)) if _tokens_of(text, t)]
        seen.append(names[0] if names else f"other {tuple(text.shape)}")

    transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _tokens_of(text: torch.Tensor, full: torch.Tensor) -> bool:
    """``text`` [B, n, C] is ``full`` [B, T, C] or a run of its tokens (a rank's text chunk)."""
    n = text.shape[1]
    if text.shape[0::2] != full.shape[0::2] or n > full.shape[1]:
        return False
    return any(torch.equal(text, full[:, i : i + n]) for i in range(full.shape[1] - n + 1))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(5)


@torch.no_grad()
def _cfg_parallel(
    ctx: sf_comm.Context, name: str, strategy: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    pipe, args = PIPELINES[name]()
    args |= extra or {}
    ref_capture = LatentCapture()
    ref = pipe(**args, generator=generator(), callback_on_step_end=ref_capture)[0]
    assert ref_capture.latents is not None
    seen = record_branches(pipe.transformer, args["prompt_embeds"], args["negative_prompt_embeds"])

    sp = parallelize(pipe, ctx=ctx, strategy=strategy, cfg_parallel=True)
    capture = LatentCapture()
    out = sp(**args, generator=generator(), callback_on_step_end=capture)[0]
    assert capture.latents is not None
    return dict(
        latents_rel_err=rel_err(capture.latents, ref_capture.latents),
        latents_same_on_every_rank=same_on_every_rank(ctx, capture.latents),
        branches=seen,
        out_rel_err=rel_err(out, ref),  # every rank: decode_on="all" by default
    )


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("sd3", "ring"),
        ("sd3", "ulysses"),
        ("cogvideox", "tas"),
        ("flux", "usp"),
        ("hunyuanvideo", "ring"),
        ("wan", "ulysses"),
    ],
)
def test_cfg_parallel_matches_single_process(ranks, name: str, strategy: str) -> None:
    """Catches CFG parallel changing the image: the guidance batch split into the wrong halves
    or reassembled in the wrong order (SD3), the deferred first call of a pair returning a
    placeholder that is never filled or filled with the other branch (Flux, Wan), the two
    halves drifting apart (latents not bit-identical on all 4 ranks), or SP inside a half
    sharding wrongly. Also catches CFG parallel that does not split the work: each rank's
    transformer must run once per step, on its own branch only (ranks 0-1 one branch, 2-3
    the other), not both branches.
    """
    results = ranks(4).run(_cfg_parallel, name, strategy, topology="2x2", transport="shm")
    first = FIRST_BRANCH[name]
    second = "cond" if first == "uncond" else "uncond"
    for rank, res in enumerate(results):
        assert res["latents_rel_err"] < REL_TOL, (rank, res)
        assert res["latents_same_on_every_rank"], (rank, res)
        assert res["branches"] == [first if rank < 2 else second] * STEPS, (rank, res)
        assert res["out_rel_err"] < REL_TOL, (rank, res)


def test_sd3_skip_layer_guidance(ranks) -> None:
    """Catches SD3's skip-layer-guidance call (one image, not a [uncond; cond] batch) breaking
    CFG parallel: it cannot be split in two, so both halves must run it whole and agree
    bit-for-bit (part 0's result everywhere), without it being mistaken for a guidance
    batch (an odd batch split in two would crash or drop the image)."""
    skip = dict(
        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
    )
    results = ranks(4).run(_cfg_parallel, "sd3", "ring", skip, topology="2x2", transport="shm")
    # steps 1 and 2 (0 < i < STEPS) add a cond-only call with layer 1 skipped
    for rank, res in enumerate(results):
        assert res["latents_rel_err"] < REL_TOL, (rank, res)
        assert res["latents_same_on_every_rank"], (rank, res)
        branch = "uncond" if rank < 2 else "cond"
        assert res["branches"] == [branch, branch, "cond", branch, "cond"], (rank, res)
        assert res["out_rel_err"] < REL_TOL, (rank, res)


def _call_errors(ctx: sf_comm.Context) -> list[str]:
    sd3, sd3_args = make_sd3()
    flux, flux_args_ = make_flux()
    sd3_sp = parallelize(sd3, ctx=ctx, strategy="ring", cfg_parallel=True)
    flux_sp = parallelize(flux, ctx=ctx, strategy="ring", cfg_parallel=True)
    cases = [
        lambda: sd3_sp(**{**sd3_args, "guidance_scale": 1.0}),
        lambda: flux_sp(**{**flux_args_, "negative_prompt_embeds": None}),
        lambda: flux(**flux_args_),  # the pipeline itself, not the ParallelPipeline
    ]
    return error_messages(cases, catch=(ValueError, RuntimeError))


def test_calls_without_guidance_are_errors(ranks) -> None:
    """Catches cfg_parallel silently running calls that have no guidance branches: half the
    ranks would idle (SD3 with guidance_scale 1) or a paired pipeline would wait forever for
    a second call that never comes (Flux without a negative prompt). Also catches the bare
    pipeline being called around the wrapper, where guidance calls cannot be paired. Every
    rank must raise the same error, before any collective (so none hangs)."""
    for msgs in ranks(4).run(_call_errors, topology="2x2", transport="shm"):
        assert "this StableDiffusion3Pipeline call runs no classifier-free guidance" in msgs[0]
        assert "guidance_scale=1.0" in msgs[0] and "cfg_parallel=False" in msgs[0], msgs[0]
        assert "negative prompt missing" in msgs[1], msgs[1]
        assert "call the ParallelPipeline" in msgs[2], msgs[2]


def test_unsupported_pipeline_is_an_error() -> None:
    """Catches cfg_parallel being accepted for a pipeline whose guidance calls are not
    described (it would split or pair the wrong calls); the error lists what is supported."""
    flux = make_flux_pipe()
    img2img = FluxImg2ImgPipeline(**flux.components)
    with pytest.raises(ValueError, match="no CFG-parallel plan for FluxImg2ImgPipeline") as exc:
        parallelize(img2img, ctx=None, cfg_parallel=True)  # type: ignore[call-overload]
    assert "StableDiffusion3Pipeline" in str(exc.value) and "WanPipeline" in str(exc.value)
    assert {
        "CogVideoXPipeline",
        "FluxPipeline",
        "HunyuanVideoPipeline",
        "StableDiffusion3Pipeline",
        "WanPipeline",
    } <= set(supported_cfg_pipelines())


@pytest.mark.parametrize(
    ("topo", "suggestion"), [("3x3", "6x3 or 3x6 or 3x2"), ("1x1", "2x1 or 1x2")]
)
def test_topology_without_halves_is_an_error(topo: str, suggestion: str) -> None:
    """Catches an odd world (or one with odd machines and odd GPUs per machine) failing deep
    in the split or with a message that does not say what would work. Checked before any
    collective, so a fake context is enough."""
    ctx = types.SimpleNamespace(topology=sf_comm.Topology.parse(topo), rank=0)
    with pytest.raises(ValueError, match=f"topology {topo}") as exc:
        parallelize(make_flux_pipe(), ctx=ctx, cfg_parallel=True)  # type: ignore[call-overload]
    assert suggestion in str(exc.value) and "cfg_parallel=False" in str(exc.value), exc.value


@torch.no_grad()
def _close(ctx: sf_comm.Context) -> dict[str, Any]:
    pipe, args = make_wan()
    transformer = pipe.transformer
    hooks = hook_count(transformer)
    ref = pipe(**args, generator=generator())[0]
    sp = parallelize(pipe, ctx=ctx, strategy="ulysses", cfg_parallel=True)
    out = sp(**args, generator=generator())[0]
    hooks_while = hook_count(transformer)
    sp.close()
    after = pipe(**args, generator=generator())[0]  # paired CFG: refused while parallelized
    return dict(
        parallel_rel_err=rel_err(out, ref),
        after_close_equal=torch.equal(after, ref),
        transformer_restored=pipe.transformer is transformer,
        hooks=(hooks, hooks_while, hook_count(transformer)),
    )


def test_close_after_cfg_parallel(ranks) -> None:
    """Catches ``close()`` missing what CFG parallel and Wan's plan add: the CFG wrapper left
    as the transformer (the bare pipeline's paired guidance calls would still be refused),
    or the plan's hooks left in the model (Wan's timestep pre-hook from its attach, the
    submodule split/gather hooks). After close, the bare pipeline on one process must give
    the single-process latents bit for bit."""
    for rank, res in enumerate(ranks(4).run(_close, topology="2x2", transport="shm")):
        assert res["parallel_rel_err"] < REL_TOL, (rank, res)
        assert res["transformer_restored"] and res["after_close_equal"], (rank, res)
        before, during, after = res["hooks"]
        assert during > before == after, (rank, res)


def _degrees(ctx: sf_comm.Context) -> tuple[Any, str]:
    def degree(ulysses_degree: int) -> Any:
        return parallelize(
            make_flux_pipe(),
            ctx=ctx,
            strategy="usp",
            cfg_parallel=True,
            ulysses_degree=ulysses_degree,
        )

    plan = degree(1).transformer.module.attention_plan(seq_len=35, text_len=TEXT)
    return (plan.name, plan.ulysses_degree, plan.ring_degree), error_messages([lambda: degree(4)])[
        0
    ]


def test_ulysses_degree_on_a_half(ranks) -> None:
    """Catches ``ulysses_degree`` not reaching the transformer of a CFG half (each half would
    run USP's default degree 2 on its 1x2 ranks), or a degree that fits the world but not a
    half (4 of 2 ranks) being refused with a message that does not say a half is 1x2."""
    for rank, (plan, msg) in enumerate(ranks(4).run(_degrees, topology="2x2", transport="shm")):
        assert plan == ("usp", 1, 2), (rank, plan)
        assert "each half of topology 2x2 runs sequence parallelism on 1x2" in msg, msg
        assert "allows Ulysses degrees [1, 2], got 4" in msg, msg
