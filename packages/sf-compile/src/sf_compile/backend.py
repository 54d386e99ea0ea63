"""The ``streamfusion`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so after installing sf-compile::

    compiled = torch.compile(model, backend="streamfusion", options={"strategy": "auto"})

needs no import. Every rank compiles the same graph; each rank's graph takes the full inputs,
cuts its share of the tokens (:mod:`sf_compile.token_pass`), runs attention through
``sf_attn.parallel_attention`` and returns the full outputs, as the eager model does.

With one rank (torch.distributed not initialised, or a world of one) the backend is the inner
backend: Dynamo's graph and example inputs are handed over untouched, so it costs nothing over
``backend="inductor"`` and recompiles under the same guards.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

import sf_comm

from . import ops
from .options import CompileOptions
from .rules import value_of
from .token_layout import Split
from .token_pass import ShardReport, shard_graph

__all__ = ["streamfusion_backend"]

log = logging.getLogger("sf_compile")
_DUMPS = itertools.count()
_BARRIERS = itertools.count()
COMPILE_TIMEOUT_ENV = "SF_COMPILE_TIMEOUT"  # seconds ranks wait for each other to compile


def _context(opts: CompileOptions) -> sf_comm.CommContext | None:
    if opts.ctx is not None:
        return opts.ctx
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return sf_comm.default_context(opts.topology, opts.transport or "auto")


def _inner(opts: CompileOptions, mode: str | None) -> Callable[..., Any]:
    if callable(opts.inner_backend):
        return opts.inner_backend
    if opts.inner_backend == "inductor":
        # Exactly what torch.compile(backend="inductor", mode=mode, options=...) builds.
        return torch._TorchCompileInductorWrapper(mode, opts.inner_options, None)
    from torch._dynamo.backends.registry import lookup_backend

    fn = lookup_backend(opts.inner_backend)
    kwargs: dict[str, Any] = {}
    if opts.inner_options:
        kwargs["options"] = opts.inner_options
    if mode:
        kwargs["mode"] = mode
    if not kwargs:
        return fn
    return lambda gm, inputs: fn(gm, inputs, **kwargs)


def _refresh_meta(new_gm: fx.GraphModule, old_gm: fx.GraphModule) -> None:
    """Local shapes on every node of the rewritten graph (Inductor's pre-grad passes read them)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    fakes = [value_of(n) for n in old_gm.graph.find_nodes(op="placeholder")]
    # The placeholders' own mode: Dynamo hands backends a fake mode of their own.
    mode = next((v.fake_mode for v in fakes if isinstance(v, FakeTensor)), None)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(new_gm, mode).propagate_dont_convert_inputs(*fakes)
    for node in new_gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def _dump(
    opts: CompileOptions,
    rank: int,
    gm: fx.GraphModule,
    new_gm: fx.GraphModule | None,
    report: ShardReport | None,
) -> str | None:
    directory = opts.debug_dir
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{rank}_graph{next(_DUMPS):03d}.txt")
    with open(path, "w") as f:
        if report is None:
            f.write("streamfusion: world size 1, the graph goes to the inner backend unchanged\n")
        else:
            f.write(report.summary() + "\n")
        f.write("\n=== graph from Dynamo ===\n")
        f.write(gm.print_readable(print_output=False))
        if new_gm is not None:
            f.write("\n=== rewritten graph (this rank) ===\n")
            f.write(new_gm.print_readable(print_output=False))
    log.info("sf_compile: wrote %s", path)
    return path


def _compiled_barrier(ctx: sf_comm.CommContext) -> None:
    """Leave the backend together (Note [Compile barrier])."""
    timeout = float(os.environ.get(COMPILE_TIMEOUT_ENV, 1800))
    store = dist.distributed_c10d._get_default_store()
    key = f"sf_compile/compiled/{next(_BARRIERS)}"
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while (arrived := store.add(key, 0)) < ctx.world_size:
        if time.monotonic() > deadline:
            raise sf_comm.CommTimeout(
                f"rank {ctx.rank}: sf_compile waited {timeout:.0f}s for the other ranks to "
                f"finish compiling ({arrived} of {ctx.world_size} done; set {COMPILE_TIMEOUT_ENV})"
            )
        time.sleep(0.02)


def streamfusion_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo backend: split the graph's token sequence across ranks, then compile it with the
    inner backend (see the module docstring and :class:`CompileOptions`).

    Args:
        gm: the graph Dynamo captured (with ``example_value`` metadata).
        example_inputs: its example inputs (full tensors).
        options: :class:`CompileOptions` keys.
        mode: torch.compile's ``mode``, passed on to the inner backend.

    Returns:
        The compiled callable of the inner backend.

    Raises:
        ValueError: bad options, or symbolic shapes (compile with ``dynamic=False``).
        UnsupportedOpError: ``on_unsupported="error"`` and an op cannot keep tokens split.
    """
    opts = CompileOptions.from_mapping(options)
    inner = _inner(opts, mode)
    ctx = _context(opts)
    if ctx is None or ctx.world_size == 1:
        _dump(opts, 0 if ctx is None else ctx.rank, gm, None, None)
        return inner(gm, example_inputs)
    new_gm, report = shard_graph(
        gm,
        split=Split(ctx.rank, ctx.world_size),
        ctx_key=ops.register_context(ctx),
        strategy=opts.strategy,
        attention_backend=opts.attention_backend,
        overlap=opts.overlap if isinstance(opts.overlap, bool) else ctx.device.type == "cuda",
        on_unsupported=opts.on_unsupported,
    )
    _refresh_meta(new_gm, gm)
    log.info("%s", report.summary())
    _dump(opts, ctx.rank, gm, new_gm, report)
    compiled = inner(new_gm, example_inputs)
    _compiled_barrier(ctx)
    return compiled


# Note [Compile barrier]
# The compiled graph runs right after the backend returns, and its first collective waits for
# every rank with the transport's timeout (sf_comm's SF_TIMEOUT, 120 s by default). Ranks
# compile different graphs (their token counts differ by one) and may hit Inductor's cache or
# not, so one rank can finish compiling minutes before another. The backend therefore waits
# for all ranks on the process group's store, with its own timeout (SF_COMPILE_TIMEOUT, 30 min
# by default), before handing the compiled graph back. Every rank calls the backend for the
# same graphs in the same order (Dynamo sees the same code and full inputs on every rank), so
# the barrier keys line up.
