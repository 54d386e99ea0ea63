"""Choosing a strategy for ``strategy="auto"``.

Until the schedule-based cost model lands, the choice is a fixed rule that by construction
never does worse than xDiT's USP: USP with the largest Ulysses degree inside a machine that
divides the heads (on one machine that is plain Ulysses; with one head per rank, Ring).
"""

from __future__ import annotations

from sf_comm import Topology

from .strategies import get_strategy


def choose_strategy(topology: Topology, *, heads: int, seq_len: int) -> tuple[str, int]:
    """(strategy name, Ulysses degree) for an attention layer of this shape."""
    usp = get_strategy("usp")
    return "usp", usp.default_degree(topology, heads)
