"""Sequence-parallel strategies behind one small interface and a registry.

A strategy turns (topology, heads, requested Ulysses degree) into a :class:`Layout` and runs
it: the shared Ulysses x Ring executor (:mod:`sf_attn.hybrid`) for ulysses/ring/usp/tas, the
staged torus exchange (:mod:`sf_attn.torus`) for torus. Adding a strategy is a subclass and
one ``register_strategy`` line; :func:`strategy_names` lists them in registration order
(tables and the planner's tie-break follow it), and exactly one is the *baseline* (xDiT's
USP), registered first.

The Ulysses x Ring family (:class:`UlyssesRing`) also runs in two phases, ``begin`` (start
the head-scatter exchange) and ``finish`` (Ring, then the exchange back): the compiler's
overlap schedule starts V's exchange while Q and K are still being projected.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import torch

from sf_comm import Handle, Topology

from .hybrid import hybrid_attention, ring_and_return, scatter_heads
from .joint import KV
from .layout import Layout, make_layout, possible_ulysses_degrees
from .torus import torus_attention


class Strategy(abc.ABC):
    """How ranks are laid out for one attention layer, and how the layout runs."""

    name: str
    order: str = "inter-first"
    baseline: bool = False  # the strategy others are compared with (one per registry)

    @abc.abstractmethod
    def default_degree(self, topology: Topology, heads: int) -> int:
        """The Ulysses degree used when the caller does not ask for one."""

    def allowed_degrees(self, topology: Topology) -> list[int]:
        return possible_ulysses_degrees(topology, self.order)

    def layout(self, topology: Topology, heads: int, ulysses_degree: int | None = None) -> Layout:
        """The layout for ``heads`` heads.

        Raises:
            ValueError: when the degree cannot split ``heads`` or cannot be laid out.
        """
        p_u = self.default_degree(topology, heads) if ulysses_degree is None else ulysses_degree
        allowed = self.allowed_degrees(topology)
        if p_u not in allowed:
            raise ValueError(
                f"strategy {self.name!r} on topology {topology} allows Ulysses degrees {allowed}, "
                f"got {p_u}"
            )
        if heads < p_u:
            ok = [d for d in allowed if d <= heads]
            raise ValueError(
                f"strategy {self.name!r} with Ulysses degree {p_u} needs at least {p_u} heads, got "
                f"{heads}; degrees that fit {heads} heads: {ok} (ring needs none)"
            )
        return make_layout(topology, p_u, self.order)

    @abc.abstractmethod
    def execute(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        """Run the layout: ``(out, text_out)``; see :func:`sf_attn.hybrid.hybrid_attention`."""


class UlyssesRing(Strategy):
    """The Ulysses x Ring executor (:mod:`sf_attn.hybrid`), whole or in two phases."""

    def execute(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        return hybrid_attention(q, k, v, **kwargs)

    def begin(
        self, ctx: Any, layout: Layout, xs: torch.Tensor, seq_lens: Sequence[int]
    ) -> Handle[torch.Tensor]:
        """Start the head-scatter exchange of stacked ``xs`` ([n, B, seq_local, H, D]); see
        :func:`sf_attn.hybrid.scatter_heads`."""
        return scatter_heads(ctx, layout, xs, seq_lens)

    def finish(self, q_u: torch.Tensor, kv: KV, **kwargs: Any) -> Any:
        """The Ring and the exchange back on what :meth:`begin` delivered; see
        :func:`sf_attn.hybrid.ring_and_return`."""
        return ring_and_return(q_u, kv, **kwargs)


def _largest_fitting(topology: Topology, order: str, limit: int, heads: int) -> int:
    """Largest reachable Ulysses degree that divides both ``limit`` and ``heads``."""
    fits = [
        d for d in possible_ulysses_degrees(topology, order) if limit % d == 0 and heads % d == 0
    ]
    return max(fits)


class Ulysses(UlyssesRing):
    """All-to-all heads <-> sequence over the whole world, local attention, all-to-all back."""

    name = "ulysses"

    def default_degree(self, topology: Topology, heads: int) -> int:
        return topology.world_size

    def allowed_degrees(self, topology: Topology) -> list[int]:
        return [topology.world_size]


class Ring(UlyssesRing):
    """K/V blocks rotate around all ranks; each step's compute overlaps the next shift."""

    name = "ring"

    def default_degree(self, topology: Topology, heads: int) -> int:
        return 1

    def allowed_degrees(self, topology: Topology) -> list[int]:
        return [1]


class USP(UlyssesRing):
    """xDiT's hybrid: Ulysses inside a machine x Ring across machines."""

    name = "usp"
    order = "intra-first"
    baseline = True

    def default_degree(self, topology: Topology, heads: int) -> int:
        return _largest_fitting(topology, self.order, topology.gpus_per_machine, heads)


class TAS(UlyssesRing):
    """Topology-aware SP: Ulysses across machines (inter-first), Ring inside them.

    Default degree P_u = gcd(world, heads), reduced to the largest degree the topology can
    lay out inter-first.
    """

    name = "tas"
    order = "inter-first"

    def default_degree(self, topology: Topology, heads: int) -> int:
        return _largest_fitting(topology, self.order, math.gcd(topology.world_size, heads), heads)


class Torus(Strategy):
    """TAS's layout with the inter-machine all-to-all staged and overlapped (sf_attn.torus).

    Default torus group: the machines (P_u = gcd(machines, heads)), so every staged transfer
    is inter-machine and the Ring stays inside machines. A larger P_u mixes intra and inter
    peers in the torus group, whose stages then load the inter link in one direction at a
    time (the simulator shows it); the planner may still pick one.
    """

    name = "torus"
    order = "inter-first"

    def default_degree(self, topology: Topology, heads: int) -> int:
        return _largest_fitting(topology, self.order, math.gcd(topology.machines, heads), heads)

    def execute(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        return torus_attention(q, k, v, **kwargs)


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Make ``parallel_attention(strategy=strategy.name)`` use ``strategy``."""
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names(*, auto: bool = True) -> list[str]:
    """Registered strategies in registration order (the baseline among them), then "auto"
    (the planner) unless ``auto=False``."""
    return [*_STRATEGIES, *(["auto"] if auto else [])]


def baseline_strategy() -> str:
    """The strategy every other is compared with: xDiT's USP."""
    return next(name for name, s in _STRATEGIES.items() if s.baseline)


def get_strategy(name: str) -> Strategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}") from None


# Registration order is the order of every table and the planner's preference among equal
# costs: the baseline, then the topology-aware strategies, then the plain ones.
for _s in (USP(), TAS(), Torus(), Ulysses(), Ring()):
    register_strategy(_s)
