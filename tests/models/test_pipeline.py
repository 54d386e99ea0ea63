"""Tier 2: ``sf_models.parallelize(pipe)`` on a tiny stock diffusers ``FluxPipeline``.

Every rank builds the same pipeline from fixed seeds (tiny Flux transformer, tiny
``AutoencoderKL``, the real flow-matching scheduler; the text encoders are bypassed with
``prompt_embeds``/``pooled_prompt_embeds``, as tokenizers cannot be downloaded here), runs it
once on its own as the single-process reference, then parallelizes it and runs it again on
every rank with the same seeded generator. Also: the Ulysses degree asked for reaching the
attention layers, and ``close()`` giving the single-process pipeline back.

Tolerance (``REL_TOL``, relative to the largest entry): everything is float32. The only
arithmetic that differs from the reference is attention (SDPA vs sf_attn's blockwise
online-softmax merges, ~1e-6 relative per layer, see ``tests/models/_common.py``); three
Euler steps add each step's prediction times a step size below 1, so the error does not
grow, and the VAE decode is the same smooth function on both sides (measured on 2x2: 1e-7 on
the latents, 5e-7 on the image, every strategy). 1e-4 leaves room for summation-order noise, while real bugs move
the result by 1e-2 or more (a wrong RoPE row, rank-dependent noise, a dropped token chunk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

import sf_attn.resolution as resolution
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


def hook_count(module: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on ``module`` and its submodules."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def progress_config(pipe: Any) -> dict[str, Any]:
    return dict(getattr(pipe, "_progress_bar_config", {}))


@contextlib.contextmanager
def recording_resolutions() -> Iterator[list[Any]]:
    """The resolutions ``sf_attn.resolve`` returns inside the block, what the attention layers
    ran with (a spy around ``sf_attn.resolution._resolve``, which it calls at call time)."""
    real, seen = resolution._resolve, []

    def spy(*args: Any) -> Any:
        seen.append(real(*args))
        return seen[-1]

    resolution._resolve = spy  # type: ignore[assignment]
    try:
        yield seen
    finally:
        resolution._resolve = real  # type: ignore[assignment]


@torch.no_grad()
def _generate(ctx: sf_comm.Context, strategy: str, decode_on: DecodeOn | None) -> dict[str, Any]:
    """``decode_on`` None: parallelize's default."""
    pipe = make_flux_pipe()
    ref_capture = LatentCapture()
    ref = pipe(**flux_args(), callback_on_step_end=ref_capture).images
    assert ref_capture.latents is not None
    decodes = count_decodes(pipe)

    chosen = {} if decode_on is None else {"decode_on": decode_on}
    sp = parallelize(pipe, ctx=ctx, strategy=strategy, **chosen)
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
    res["decode_on"] = sp.decode_on
    if sp.decode_on in ("all", "parallel"):
        res["image_same_on_every_rank"] = same_on_every_rank(ctx, out)  # collective: all ranks
    if sp.decode_on in ("all", "parallel") or ctx.rank == 0:
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


def test_default_output_is_the_pipelines_on_every_rank(ranks) -> None:
    """Catches the default going back to decoding on rank 0 only (other ranks then got
    latents, and the usual ``sp(...).images[0].save(...)`` failed there), or the decode not
    split across the ranks although Flux's VAE can be (sf_models.vae), or the ranks decoding
    different images: by default every rank must return the images one process returns,
    identical on all ranks, with the decode split ("auto" -> "parallel").
    """
    results = ranks(4).run(_generate, "ring", None, topology="2x2", transport="shm")
    for rank, res in enumerate(results):
        assert res["decode_on"] == "parallel", (rank, res)
        assert res["decodes"] == 1, (rank, res)
        assert res["out_shape"] == (1, 3, HEIGHT, WIDTH), (rank, res)
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
    assert "decode_on must be one of ('auto', 'parallel', 'all', 'rank0'), got 'gpu0'" in msgs[0], (
        msgs[0]
    )
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


@torch.no_grad()
def _ulysses_degree(ctx: sf_comm.Context) -> dict[str, Any]:
    pipe = make_flux_pipe()
    ref = pipe(**flux_args()).images
    sp = parallelize(pipe, ctx=ctx, strategy="usp", ulysses_degree=2)
    with recording_resolutions() as ran:
        out = sp(**flux_args()).images
    # 35 image tokens and 6 text tokens (sharded: sequence in front of the image), batch 1
    plan = sp.transformer.attention_plan(seq_len=35, text_len=TEXT)
    default = parallelize(make_flux_transformer(), ctx=ctx, strategy="usp")
    return dict(
        image_rel_err=rel_err(out, ref),
        image_same_on_every_rank=same_on_every_rank(ctx, out),
        ran={(r.name, r.ulysses_degree, r.ring_degree) for r in ran},
        plan=(plan.name, plan.ulysses_degree, plan.ring_degree),
        plan_is_what_ran=bool(ran) and all(r is plan for r in ran),
        ulysses_groups=plan.layout.ulysses,
        default_degree=default.attention_plan(seq_len=35, text_len=TEXT).ulysses_degree,
    )


def test_ulysses_degree_reaches_the_attention(ranks) -> None:
    """Catches ``ulysses_degree`` being dropped on its way from ``parallelize(pipe)`` to the
    attention layers (they would run USP's default degree 4 on 1x4, which is a different
    layout with the same numbers, so only the resolution shows it), the wrapper's plan not
    being what the layers run, or degree 2 x Ring 2 giving another image than one process.
    """
    results = ranks(4).run(_ulysses_degree, topology="1x4", transport="shm")
    for rank, res in enumerate(results):
        assert res["default_degree"] == 4, (rank, res)  # so that asking for 2 is visible
        assert res["ran"] == {("usp", 2, 2)}, (rank, res)
        assert res["plan"] == ("usp", 2, 2) and res["plan_is_what_ran"], (rank, res)
        assert res["ulysses_groups"] == ((0, 1), (2, 3)), (rank, res)  # neighbours first
        assert res["image_rel_err"] < REL_TOL, (rank, res)
        assert res["image_same_on_every_rank"], (rank, res)


def _bad_degrees(ctx: sf_comm.Context) -> dict[str, Any]:
    pipe = make_flux_pipe()
    transformer = pipe.transformer
    not_an_int: Any = 2.0
    cases = [
        lambda: parallelize(pipe, ctx=ctx, strategy="usp", ulysses_degree=3),
        lambda: parallelize(pipe, ctx=ctx, strategy="auto", ulysses_degree=2),
        lambda: parallelize(pipe, ctx=ctx, strategy="ring", ulysses_degree=2),
        lambda: parallelize(
            make_flux_transformer(heads=2), ctx=ctx, strategy="usp", ulysses_degree=4
        ),
        lambda: parallelize(pipe, ctx=ctx, strategy="usp", ulysses_degree=0),
        lambda: parallelize(pipe, ctx=ctx, strategy="usp", ulysses_degree=not_an_int),
    ]
    msgs = error_messages(cases)
    return dict(
        msgs=msgs,
        untouched=pipe.transformer is transformer and hook_count(transformer) == 0,
        # no processor of the refused calls left behind: parallelizing still works
        usable=parallelize(pipe, ctx=ctx, strategy="usp", ulysses_degree=1)
        .transformer.attention_plan(seq_len=35, text_len=TEXT)
        .ulysses_degree,
    )


def test_bad_ulysses_degrees_name_the_value(ranks) -> None:
    """Catches a Ulysses degree the strategy cannot use being accepted (failing mid-forward or
    silently running another degree), with a message that does not name the value and what
    is allowed: one that does not divide the world (3 of 4), one with "auto" (the planner
    picks the degree), one for Ring (degree 1 only), more than the heads, not a positive int.
    Also catches a refused call leaving the pipeline half parallelized."""
    res = ranks(4).run(_bad_degrees, topology="1x4", transport="shm")[0]
    msgs = res["msgs"]
    assert "allows Ulysses degrees [1, 2, 4], got 3" in msgs[0], msgs[0]
    assert "ulysses_degree=2 needs a named strategy" in msgs[1], msgs[1]
    assert "strategy 'ring'" in msgs[2] and "allows Ulysses degrees [1], got 2" in msgs[2], msgs
    assert "needs at least 4 heads, got 2" in msgs[3] and "[1, 2]" in msgs[3], msgs[3]
    for msg, value in ((msgs[4], "0"), (msgs[5], "2.0")):
        assert (
            f"ulysses_degree must be a positive int or None (the strategy's own), got {value}"
            in msg
        ), msg
    assert res["untouched"], res
    assert res["usable"] == 1, res


@torch.no_grad()
def _close(ctx: sf_comm.Context) -> dict[str, Any]:
    pipe = make_flux_pipe()
    transformer, vae = pipe.transformer, pipe.vae
    processors = dict(transformer.attn_processors)
    vae_processors = dict(vae.attn_processors)
    ref = pipe(**flux_args()).images
    bar = progress_config(pipe)
    with parallelize(pipe, ctx=ctx, strategy="usp") as sp:
        out = sp(**flux_args()).images
        bar_while = progress_config(pipe)
        vae_parallel = pipe.vae is not vae  # decode_on="auto": Flux's VAE decodes in parallel
    sp.close()  # again: harmless
    before = ctx.transport.stats.snapshot()
    after = pipe(**flux_args()).images
    sent = sum((ctx.transport.stats - before).bytes_sent.values())
    restored = dict(transformer.attn_processors)
    res: dict[str, Any] = dict(
        parallel_rel_err=rel_err(out, ref),
        after_close_equal=torch.equal(after, ref),
        bytes_sent_after_close=sent,
        transformer_restored=pipe.transformer is transformer,
        processors_restored=restored.keys() == processors.keys()
        and all(restored[k] is p for k, p in processors.items()),
        hooks_left=hook_count(transformer) + hook_count(vae),
        vae_restored=vae_parallel
        and pipe.vae is vae
        and all(vae.attn_processors[k] is p for k, p in vae_processors.items()),
        bar_while=bar_while.get("disable", False),
        bar_restored=progress_config(pipe) == bar,
        closed_call=error_messages([lambda: sp(**flux_args())], catch=RuntimeError)[0],
    )
    again = parallelize(sp, ctx=ctx, strategy="ring")  # a closed wrapper stands for its pipe
    res["again_rel_err"] = rel_err(again(**flux_args()).images, ref)
    res["again_parallel"] = pipe.transformer is not transformer
    again.close()
    return res


def test_close_gives_the_single_process_pipeline_back(ranks) -> None:
    """Catches ``close()`` leaving the pipeline unusable or still parallel: the transformer
    attribute still the wrapper, parallel processors or hooks left in the model (re-parallelizing
    would then say "already parallelized"), the progress bar left off on ranks other than 0,
    or the closed pipeline still communicating. After close, ``pipe(...)`` on one process must
    give the single-process image bit for bit; the closed wrapper must refuse calls with a
    clear error, closing twice must be harmless, and parallelizing again must work."""
    results = ranks(4).run(_close, topology="2x2", transport="shm")
    for rank, res in enumerate(results):
        assert res["parallel_rel_err"] < REL_TOL, (rank, res)
        assert res["after_close_equal"] and res["bytes_sent_after_close"] == 0, (rank, res)
        assert res["transformer_restored"] and res["processors_restored"], (rank, res)
        assert res["hooks_left"] == 0 and res["vae_restored"], (rank, res)
        assert res["bar_while"] == (rank != 0) and res["bar_restored"], (rank, res)
        assert "this ParallelPipeline is closed" in res["closed_call"], (rank, res)
        assert res["again_parallel"] and res["again_rel_err"] < REL_TOL, (rank, res)


@torch.no_grad()
def _context_closed_first() -> dict[str, Any]:
    ctx = sf_comm.init(topology="2x2", transport="shm")  # this test's own: it closes it
    pipe = make_flux_pipe()
    ref = pipe(**flux_args()).images
    sp = parallelize(pipe, ctx=ctx, strategy="ring")
    ctx.close()
    calls = [lambda: sp(**flux_args()), lambda: pipe(**flux_args())]
    msgs = error_messages(calls, catch=RuntimeError)
    sp.close()
    return dict(msgs=msgs, after_close_equal=torch.equal(pipe(**flux_args()).images, ref))


def test_closed_context_is_a_clear_error(ranks) -> None:
    """Catches a pipeline still parallelized over a closed context failing obscurely (it
    raised "unknown mesh axis 'world'"), whether called through the wrapper or directly; the
    error must say to call ``sp.close()``, and after it the pipeline must run on one process
    and give the single-process image."""
    for rank, res in enumerate(ranks(4).run(_context_closed_first)):
        wrapper, direct = res["msgs"]
        assert "the context is closed" in wrapper and "call sp.close()" in wrapper, (rank, res)
        assert "the context is closed" in direct and "sp.close()" in direct, (rank, res)
        assert res["after_close_equal"], (rank, res)
