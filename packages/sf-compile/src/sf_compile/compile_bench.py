"""Benchmarks of the backend on a random-weight diffusers Flux: tiny, or FLUX.1-sized blocks.

- :func:`benchmark_world1`: one process, ``backend="streamfusion"`` vs ``backend="inductor"``
  on the same model and inputs. With one rank the backend hands Dynamo's graph to Inductor
  unchanged, so the ratio of medians must be ~1.0.
- :func:`benchmark_overlap`: ``world`` CPU ranks (shm transport), the overlap schedule on vs
  off (both through Inductor or the eager inner backend), medians per rank and their ratio.

Timed calls alternate between the two compiled models (A B B A A B ...), so drift in the
machine's speed, and whatever the first call of a pair pays, hits both alike. Command line::

    python -m sf_compile.compile_bench world1 [--repeats 50] [--height 256 --width 256]
    python -m sf_compile.compile_bench world1 --dims flux1 --layers 1x2 --height 1024 --width 1024 \\
        --dtype bf16 --device cuda --json out/compile-1024.json   # FLUX.1-sized blocks, GPU
    python -m sf_compile.compile_bench overlap [--world 4] [--topology 2x2] [--inner eager]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FLUX_DIMS", "BenchResult", "benchmark_overlap", "benchmark_world1", "flux_stack"]


# Block dimensions of a FluxTransformer2DModel, random weights. ``text`` is the prompt length.
FLUX_DIMS: dict[str, dict[str, Any]] = {
    # 4 heads x 16: compiles in seconds on a CPU
    "tiny": dict(
        in_channels=16,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
        text=6,
    ),
    # FLUX.1's blocks: 24 heads x 128 = 3072 wide, T5 (4096) and CLIP (768) conditioning,
    # 512 prompt tokens. No guidance embedding (as FLUX.1-schnell): it does not touch the blocks.
    "flux1": dict(
        in_channels=64,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
        text=512,
    ),
}


def flux_stack(
    dims: str = "tiny",
    *,
    grid: tuple[int, int] = (16, 16),
    layers: tuple[int, int] = (2, 2),
    text: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A random-weight ``FluxTransformer2DModel`` and its inputs, the same on every rank.

    Args:
        dims: a key of :data:`FLUX_DIMS` ("tiny", or "flux1" for FLUX.1's block sizes).
        grid: image tokens as rows x columns (one token per 16x16 pixels: 1024 px -> 64x64).
        layers: dual-stream and single-stream blocks.
        text: prompt tokens (default: the preset's).
        batch: samples per call.
        dtype, device: of the weights and the floating-point inputs.

    Returns:
        ``(model, inputs)``; call ``model(**inputs)``.

    Raises:
        ValueError: unknown ``dims``.
        ImportError: diffusers is not installed.
    """
    if dims not in FLUX_DIMS:
        raise ValueError(f"dims={dims!r} is not a Flux preset; choose from {sorted(FLUX_DIMS)}")
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sf_compile.compile_bench needs diffusers (pip install diffusers)"
        ) from exc
    config = dict(FLUX_DIMS[dims])
    preset_text = config.pop("text")
    text = preset_text if text is None else text
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will run
        model: Any = FluxTransformer2DModel(  # diffusers is untyped: keep it Any
            patch_size=1, num_layers=layers[0], num_single_layers=layers[1], **config
        )
    model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    tokens = grid[0] * grid[1]
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // grid[1]
    img_ids[:, 2] = torch.arange(tokens) % grid[1]
    floats = dict(
        hidden_states=torch.randn(batch, tokens, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
    )
    inputs = {k: v.to(device, dtype) for k, v in floats.items()}
    inputs.update(img_ids=img_ids.to(device), txt_ids=torch.zeros(text, 3, device=device))
    return model, inputs


@dataclasses.dataclass(kw_only=True, slots=True)
class BenchResult:
    """Medians (seconds per forward) of two variants and ``ratio = a / b``.

    ``pair_ratio`` is the median over the timed pairs of (call of a) / (the adjacent call of
    b): on a shared or throttling machine it cancels load that changes between pairs, which
    the ratio of medians does not.
    """

    name_a: str
    name_b: str
    median_a_s: float
    median_b_s: float
    pair_ratio: float
    repeats: int
    compile_a_s: float
    compile_b_s: float
    max_abs_diff: float

    @property
    def ratio(self) -> float:
        return self.median_a_s / self.median_b_s

    def summary(self) -> str:
        return (
            f"{self.name_a}: median {self.median_a_s * 1e3:.3f} ms (compile {self.compile_a_s:.1f} s)\n"
            f"{self.name_b}: median {self.median_b_s * 1e3:.3f} ms (compile {self.compile_b_s:.1f} s)\n"
            f"ratio of medians {self.name_a} / {self.name_b} = {self.ratio:.3f}; median of paired "
            f"ratios {self.pair_ratio:.3f} ({self.repeats} alternating calls each); "
            f"max |difference| of outputs {self.max_abs_diff:.3g}"
        )


def _pair_ratio(times_a: list[float], times_b: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(times_a, times_b))


def _alternate(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]
) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        a()
        b()
    times_a: list[float] = []
    times_b: list[float] = []
    for i in range(repeats):
        pair = ((a, times_a), (b, times_b))
        for fn, times in pair if i % 2 == 0 else pair[::-1]:  # A B, B A, ...: no order bias
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return times_a, times_b


def _compile_and_time(compiled: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = compiled()
    return out, time.perf_counter() - start


def benchmark_world1(
    model: Any = None,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    repeats: int = 30,
    warmup: int = 3,
) -> BenchResult:
    """``backend="streamfusion"`` vs ``backend="inductor"`` in this (single) process.

    Args:
        model, inputs: what to run (default: :func:`flux_stack`'s tiny model).
        repeats: timed calls of each variant (alternating).
        warmup: untimed calls of each after compiling.

    Returns:
        The medians and their ratio (streamfusion / inductor; ~1.0 is the expectation).

    Raises:
        RuntimeError: torch.distributed is initialised with more than one rank (this is the
            world-of-one benchmark).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("benchmark_world1 runs in a world of one; got a larger process group")
    if model is None:
        model, inputs = flux_stack()
    assert inputs is not None
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend="streamfusion", dynamic=False)
        plain = torch.compile(model, backend="inductor", dynamic=False)
        out_a, compile_a = _compile_and_time(lambda: ours(**inputs))
        out_b, compile_b = _compile_and_time(lambda: plain(**inputs))
        times_a, times_b = _alternate(
            lambda: ours(**inputs), lambda: plain(**inputs), repeats, warmup, _sync
        )
    return BenchResult(
        name_a="streamfusion (world 1)",
        name_b="inductor",
        median_a_s=statistics.median(times_a),
        median_b_s=statistics.median(times_b),
        pair_ratio=_pair_ratio(times_a, times_b),
        repeats=repeats,
        compile_a_s=compile_a,
        compile_b_s=compile_b,
        max_abs_diff=(_first(out_a) - _first(out_b)).abs().max().item(),
    )


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def overlap_on_rank(
    ctx: Any, grid: tuple[int, int], inner: str, strategy: str, repeats: int, warmup: int
) -> dict[str, float]:
    """One rank's part of :func:`benchmark_overlap` (run on every rank by a RankPool)."""
    model, inputs = flux_stack(grid=grid)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = {
            overlap: torch.compile(
                model,
                backend="streamfusion",
                dynamic=False,
                options={
                    "ctx": ctx,
                    "overlap": overlap,
                    "inner_backend": inner,
                    "strategy": strategy,
                },
            )
            for overlap in (True, False)
        }
        outs: dict[bool, Any] = {}
        compile_s: dict[bool, float] = {}
        for overlap, fn in compiled.items():
            outs[overlap], compile_s[overlap] = _compile_and_time(functools.partial(fn, **inputs))

        def step(overlap: bool) -> None:
            ctx.barrier()  # every rank starts the forward together
            compiled[overlap](**inputs)

        on, off = _alternate(lambda: step(True), lambda: step(False), repeats, warmup, _sync)
    return dict(
        on_s=statistics.median(on),
        off_s=statistics.median(off),
        pair_ratio=_pair_ratio(on, off),
        compile_on_s=compile_s[True],
        compile_off_s=compile_s[False],
        max_abs_diff=(_first(outs[True]) - _first(outs[False])).abs().max().item(),
    )


def benchmark_overlap(
    world: int = 4,
    *,
    topology: str = "2x2",
    grid: tuple[int, int] = (16, 16),
    inner: str = "eager",
    strategy: str = "auto",
    repeats: int = 20,
    warmup: int = 3,
) -> BenchResult:
    """Overlap schedule on vs off on ``world`` CPU ranks of this host (shm transport).

    Returns:
        The slowest rank's medians (a forward ends when its last rank does) and the ratio
        on / off (< 1.0: the overlap helps).
    """
    from sf_comm.launch import RankPool

    with RankPool(world, env={"SF_TOPOLOGY": topology}) as pool:
        results = pool.run(
            overlap_on_rank,
            grid,
            inner,
            strategy,
            repeats,
            warmup,
            topology=topology,
            transport="shm",
            timeout=1800,
        )
    return BenchResult(
        name_a=f"overlap on ({world} ranks, {topology}, inner {inner})",
        name_b="overlap off",
        median_a_s=max(r["on_s"] for r in results),
        median_b_s=max(r["off_s"] for r in results),
        pair_ratio=statistics.median(r["pair_ratio"] for r in results),
        repeats=repeats,
        compile_a_s=max(r["compile_on_s"] for r in results),
        compile_b_s=max(r["compile_off_s"] for r in results),
        max_abs_diff=max(r["max_abs_diff"] for r in results),
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _pair(text: str) -> tuple[int, int]:
    first, second = text.lower().split("x")
    return int(first), int(second)


def _grid(height: int, width: int) -> tuple[int, int]:
    """Image tokens for a ``height`` x ``width`` image: one per 16x16 pixels (VAE 8x, patch 2)."""
    if height % 16 or width % 16:
        raise SystemExit(f"--height/--width must be multiples of 16 pixels, got {height}x{width}")
    return height // 16, width // 16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sf_compile.compile_bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="which", required=True)
    one = sub.add_parser("world1", help="streamfusion vs inductor, one process")
    one.add_argument("--repeats", type=int, default=30)
    one.add_argument("--dims", choices=sorted(FLUX_DIMS), default="tiny", help="block sizes")
    one.add_argument("--layers", type=_pair, default=(2, 2), help="dual x single blocks")
    one.add_argument("--text", type=int, default=None, help="prompt tokens (default: preset's)")
    one.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    one.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    one.add_argument("--json", default=None, help="also write the result to this file")
    ov = sub.add_parser("overlap", help="overlap on vs off on CPU ranks")
    ov.add_argument("--world", type=int, default=4)
    ov.add_argument("--topology", default="2x2")
    ov.add_argument("--inner", default="eager", help="inner backend (eager or inductor)")
    ov.add_argument("--strategy", default="auto")
    ov.add_argument("--repeats", type=int, default=20)
    for p in (one, ov):
        p.add_argument("--height", type=int, default=256, help="pixels (16 per token)")
        p.add_argument("--width", type=int, default=256, help="pixels (16 per token)")
    args = parser.parse_args(argv)
    grid = _grid(args.height, args.width)
    if args.which == "world1":
        model, inputs = flux_stack(
            args.dims,
            grid=grid,
            layers=args.layers,
            text=args.text,
            dtype=DTYPES[args.dtype],
            device=args.device,
        )
        result = benchmark_world1(model, inputs, repeats=args.repeats)
        print(
            f"{args.dims} Flux, {args.layers[0]} + {args.layers[1]} blocks, "
            f"{args.height}x{args.width} px ({grid[0] * grid[1]} image tokens), "
            f"{args.dtype} on {args.device}, torch {torch.__version__}"
        )
        print(result.summary())
        if args.json:
            record = dict(dataclasses.asdict(result), ratio=result.ratio, **vars(args))
            record["text"] = inputs["txt_ids"].shape[0]
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1, default=str)
    else:
        print(
            benchmark_overlap(
                args.world,
                topology=args.topology,
                grid=grid,
                inner=args.inner,
                strategy=args.strategy,
                repeats=args.repeats,
            ).summary()
        )


if __name__ == "__main__":
    main()
