"""The main job: a Flux-architecture DiT denoising on several ranks, checked against one.

``streamfusion run`` calls :func:`run`. A ``FluxTransformer2DModel`` is built from a small
config with random weights (seeded, so every rank and the single-process reference hold the
same model), or loaded with ``from_pretrained`` from a local directory. A few flow-matching
Euler steps run once in a single process and once per strategy on the rank pool, from the
same noise; the final latents are compared. With classifier-free guidance split over the two
halves of the ranks (``cfg_parallel``), the model is wrapped like ``FluxPipeline``'s
transformer (:class:`sf_models.cfg.CFGParallelModel`, :data:`sf_models.flux.FLUX_CFG_PLAN`),
so the same :func:`cfg_velocity` code runs in one process and on the ranks.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any

import torch

import sf_attn
import sf_comm
from sf_comm.launch import RankPool
from sf_comm.trace import WallTracer, timeline_png, tracing, write_chrome

from .cfg import CFGParallelModel, check_cfg_topology
from .flux import FLUX_CFG_PLAN
from .parallelize import parallelize

SMALL_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    axes_dims_rope=(16, 24, 24),
)


def build_model(config: str | None, dtype: torch.dtype) -> Any:
    """The transformer: ``from_pretrained(config)`` for a local directory, else SMALL_FLUX."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model: Any
    if config:
        model = FluxTransformer2DModel.from_pretrained(config, torch_dtype=dtype)
    else:
        model = FluxTransformer2DModel(**SMALL_FLUX)
        if dtype != torch.float32:
            model = model.to(dtype)
    return model.eval()


def make_inputs(
    model: Any, height: int, width: int, text: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Latent noise for a ``height`` x ``width`` image (16x16 pixels per token) and prompt embeds."""
    cfg = model.config
    rows, cols = height // 16, width // 16
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(rows * cols, 3)
    img_ids[:, 1] = torch.arange(rows * cols) // cols
    img_ids[:, 2] = torch.arange(rows * cols) % cols
    return dict(
        hidden_states=torch.randn(1, rows * cols, cfg.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
        # the negative prompt of classifier-free guidance (used when cfg_scale > 1)
        negative_encoder_hidden_states=torch.randn(
            1, text, cfg.joint_attention_dim, generator=g
        ).to(dtype),
        negative_pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(
            dtype
        ),
    )


Velocity = Any  # (latents, timestep) -> velocity


def _branch_inputs(inputs: dict[str, torch.Tensor], *, negative: bool) -> dict[str, torch.Tensor]:
    """The model inputs of one guidance branch: the prompt's, or with ``negative`` the
    negative prompt's (``negative_*`` in ``inputs``)."""
    branch = {k: v for k, v in inputs.items() if not k.startswith("negative_")}
    if negative:
        names = ("encoder_hidden_states", "pooled_projections")
        branch.update({n: inputs[f"negative_{n}"] for n in names})
    return branch


def cfg_velocity(model: Any, inputs: dict[str, torch.Tensor], cfg_scale: float) -> Velocity:
    """Velocity of the model at (latents, t), with true classifier-free guidance if scale > 1.

    Equivalent plain code::

        cond = model(latents, prompt); uncond = model(latents, negative_prompt)
        velocity = uncond + cfg_scale * (cond - uncond)
    """
    cond = _branch_inputs(inputs, negative=False)
    uncond = _branch_inputs(inputs, negative=True)

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(**{**cond, "hidden_states": latents}, timestep=t).sample
        if cfg_scale <= 1:
            return v
        u = model(**{**uncond, "hidden_states": latents}, timestep=t).sample
        return u + cfg_scale * (v - u)

    return velocity


@torch.no_grad()
def denoise(
    velocity: Velocity, latents: torch.Tensor, steps: int, tracer: Any = None
) -> tuple[torch.Tensor, list[float]]:
    """Flow-matching Euler steps from t=1 to t=0; returns final latents and per-step seconds.

    With ``tracer``, the last step runs under it (a trace of one whole step).
    """
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        traced = (
            tracing(tracer) if tracer is not None and i == steps - 1 else contextlib.nullcontext()
        )
        with traced:
            v = velocity(latents, sigmas[i].expand(latents.shape[0]).to(latents.dtype))
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v
        times.append(time.perf_counter() - t0)
    return latents, times


def attention_plan(
    ctx: Any,
    model: Any,
    inputs: dict[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    text: str,
) -> sf_attn.Resolution:
    """What ``strategy="auto"`` runs in the model's attention layers: :func:`sf_attn.resolve`
    with the arguments ``parallel_attention`` passes it (the same object, so the plan printed
    is the plan run).

    Args:
        text: the resolved text layout the model runs with (``state.text`` of the wrapper):
            replicated text joins each attention as text; sharded text is ordinary sequence
            in front of the image tokens (Note [Text layouts] in :mod:`sf_models.plan`).
    """
    cfg = model.config
    image, text_len = inputs["hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1]
    sharded = text == "sharded"
    return sf_attn.resolve(
        ctx,
        seq_len=image + text_len if sharded else image,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        dtype=dtype,
        batch=inputs["hidden_states"].shape[0],
        text_len=0 if sharded else text_len,
    )


def _rank_job(
    ctx: sf_comm.Context,
    strategy: str,
    config: str | None,
    height: int,
    width: int,
    text: int,
    steps: int,
    dtype: torch.dtype,
    cfg_scale: float,
    cfg_parallel: bool,
    compile_inner: str | None = None,
) -> dict[str, Any]:
    model = build_model(config, dtype)
    inputs = make_inputs(model, height, width, text, dtype)
    sp_ctx: Any = ctx
    if cfg_parallel:
        sp_ctx, cross = ctx.split(2)
    sp: Any
    if compile_inner:  # the one-line path: torch.compile with the streamfusion backend
        options = {"ctx": sp_ctx, "strategy": strategy, "inner_backend": compile_inner}
        sp = torch.compile(model, backend="streamfusion", dynamic=False, options=options)
        text_layout = "replicated"  # the compile backend passes the whole text as joint=
    else:
        sp = parallelize(model, ctx=sp_ctx, strategy=strategy)  # text="auto": sharded for Flux
        text_layout = sp.state.text
    chosen = attention_plan(sp_ctx, model, inputs, dtype, text=text_layout)
    if cfg_parallel:  # half 0 runs the prompt's branch, half 1 the negative prompt's
        sp = CFGParallelModel(
            sp, FLUX_CFG_PLAN, ctx=ctx, cross=cross, part=sp_ctx.index, forward=model.forward
        )
        sp.begin_call()
    ctx.barrier()
    before = ctx.transport.stats.snapshot()
    tracer = WallTracer()
    latents, times = denoise(
        cfg_velocity(sp, inputs, cfg_scale), inputs["hidden_states"], steps, tracer=tracer
    )
    if cfg_parallel:
        sp.end_call()
    sent = ctx.transport.stats - before
    return {
        "latents": latents if ctx.rank == 0 else None,
        "step_s": times,
        "plan": (chosen.name, chosen.ulysses_degree),
        "text_layout": text_layout,
        "bytes_sent": sum(sent.bytes_sent.values()) / steps,
        "trace": tracer.to_chrome(ctx.rank),
    }


def run(
    *,
    world: int,
    topology: str,
    transport: str,
    strategies: tuple[str, ...],
    config: str | None,
    height: int,
    width: int,
    text: int,
    steps: int,
    dtype: torch.dtype,
    cfg_scale: float = 1.0,
    cfg_parallel: bool = False,
    compile_inner: str | None = None,
    out: str | None = None,
    emulation: sf_comm.Emulation | None = None,
) -> dict[str, Any]:
    """Single-process reference, then every strategy on ``world`` ranks; returns a report.
    With ``emulation`` (started, ``world`` ranks) the ranks run on its emulated machines.

    With ``cfg_scale > 1`` every step runs true classifier-free guidance (a conditional and an
    unconditional pass); ``cfg_parallel`` puts the two passes on the two halves of the ranks,
    each half doing sequence parallelism. With ``out``, the last step of each strategy is
    traced on every rank and written as ``out/trace-<strategy>.json`` (Chrome/Perfetto) and
    ``out/timeline-<strategy>.png``. With ``compile_inner`` (e.g. "inductor"), the ranks run
    ``torch.compile(model, backend="streamfusion")`` instead of ``sf_models.parallelize``
    (the first step then includes compilation; the reported step time is the median).

    Raises:
        ValueError: cfg_parallel without guidance, or a topology that cannot be halved.
    """
    topo = sf_comm.Topology.parse(topology)
    if cfg_parallel:
        if cfg_scale <= 1:
            raise ValueError("cfg_parallel needs classifier-free guidance: pass cfg_scale > 1")
        check_cfg_topology(topo)  # fails fast, naming what would work
    model = build_model(config, dtype)
    inputs = make_inputs(model, height, width, text, dtype)
    reference, ref_times = denoise(
        cfg_velocity(model, inputs, cfg_scale), inputs["hidden_states"], steps
    )
    report: dict[str, Any] = {
        "tokens": inputs["hidden_states"].shape[1],
        "text": text,
        "single_step_s": statistics.median(ref_times),
        "strategies": {},
    }
    env = {"SF_TOPOLOGY": topology, "SF_TIMEOUT": "300"}
    with RankPool(world, env=env, emulation=emulation) as pool:
        for strategy in strategies:
            results = pool.run(
                _rank_job,
                strategy,
                config,
                height,
                width,
                text,
                steps,
                dtype,
                cfg_scale,
                cfg_parallel,
                compile_inner,
                topology=topology,
                transport=transport,
                timeout=1800,
            )
            latents = results[0]["latents"]
            err = (
                (latents.double() - reference.double()).norm() / reference.double().norm()
            ).item()
            step = statistics.median(max(r["step_s"][i] for r in results) for i in range(steps))
            report["plan"] = results[0]["plan"]
            report["text_layout"] = results[0]["text_layout"]
            report["strategies"][strategy] = {
                "step_s": step,
                "rel_err": err,
                "bytes_sent_rank0_per_step": results[0]["bytes_sent"],
            }
            if out:
                os.makedirs(out, exist_ok=True)
                traces = [r["trace"] for r in results]
                write_chrome(os.path.join(out, f"trace-{strategy}.json"), traces)
                timeline_png(
                    os.path.join(out, f"timeline-{strategy}.png"),
                    traces,
                    title=f"{strategy}: last denoising step on {topology} ({transport})",
                )
    return report
