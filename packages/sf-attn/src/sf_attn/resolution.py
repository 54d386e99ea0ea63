"""The one resolution path: which strategy and degrees an attention layer runs with.

``parallel_attention``, the models (the plan a job prints), the compiler's overlap pass, the
benchmarks and the command line all call :func:`resolve`, so the plan printed, the plan run
and the plan compiled are one object for the same inputs (resolutions are cached per
topology, transport kind and layer shape). ``strategy="auto"`` is decided here, by the
planner (:mod:`sf_attn.planner`); a named strategy gets its default Ulysses degree unless
one is asked for. Joint text tokens are replicated on every rank by every strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch

from sf_comm import Topology

from .layout import Layout
from .planner import Plan, plan_for
from .strategies import Strategy, get_strategy


@dataclasses.dataclass(frozen=True, slots=True)
class Resolution:
    """How one attention layer runs.

    Attributes:
        strategy: the strategy object (``strategy.name``; ``execute``, and for the Ulysses x
            Ring family ``begin``/``finish``).
        layout: its Ulysses and Ring groups (``layout.p_u``, ``layout.p_r``).
        plan: the planner's ranking when the strategy was "auto", else None.
    """

    strategy: Strategy
    layout: Layout
    plan: Plan | None = None

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def ulysses_degree(self) -> int:
        return self.layout.p_u

    @property
    def ring_degree(self) -> int:
        return self.layout.p_r


def resolve(
    ctx: Any,
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch: int = 1,
    text_len: int = 0,
    strategy: str = "auto",
    ulysses_degree: int | None = None,
) -> Resolution:
    """The strategy and layout of a layer on ``ctx`` (not collective: every rank that asks
    with the same arguments gets the same answer).

    Args:
        ctx: the context (its topology and whether its transport is one-sided matter).
        seq_len: global image/video tokens; heads, head_dim, dtype, batch: the layer.
        text_len: joint text tokens (0 for none).
        strategy: a strategy name or "auto".
        ulysses_degree: override the strategy's default degree (not with "auto").

    Raises:
        ValueError: unknown strategy, "auto" with a degree, or heads/degrees the strategy
            cannot lay out on this topology (the message says what fits).
    """
    resolution = _resolve(
        ctx.topology,
        bool(ctx.transport.one_sided),
        seq_len,
        heads,
        head_dim,
        dtype,
        batch,
        max(text_len, 0),
        strategy,
        ulysses_degree,
    )
    for seen in _RECORDERS:
        if not any(r is resolution for r in seen):
            seen.append(resolution)
    return resolution


_RECORDERS: list[list[Resolution]] = []


@contextlib.contextmanager
def recording_resolutions() -> Iterator[list[Resolution]]:
    """Collect the distinct resolutions :func:`resolve` returns inside the ``with`` block, in
    first-use order: what a job's attention layers actually ran with (e.g. to report the
    planner's choice after a pipeline call)::

        with sf_attn.recording_resolutions() as used:
            pipe(prompt)
        print([(r.name, r.ulysses_degree, r.ring_degree) for r in used])
    """
    seen: list[Resolution] = []
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


@functools.lru_cache(maxsize=512)
def _resolve(
    topology: Topology,
    one_sided: bool,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch: int,
    text_len: int,
    strategy: str,
    ulysses_degree: int | None,
) -> Resolution:
    if strategy != "auto":
        chosen = get_strategy(strategy)
        return Resolution(chosen, chosen.layout(topology, heads, ulysses_degree))
    if ulysses_degree is not None:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} needs a named strategy; strategy='auto' picks "
            "the degree itself"
        )
    plan = plan_for(
        topology,
        seq_len=seq_len,
        heads=heads,
        head_dim=head_dim,
        dtype=dtype,
        batch=batch,
        text_len=text_len,
        one_sided=one_sided,
    )
    chosen = get_strategy(plan.strategy)
    return Resolution(chosen, chosen.layout(topology, heads, plan.ulysses_degree), plan)
