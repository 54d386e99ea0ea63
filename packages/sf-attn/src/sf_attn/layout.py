"""How a strategy lays the ranks out: Ulysses (head-scatter) groups x Ring groups.

Every hybrid strategy splits the world into ``P_u * P_r`` ranks: a rank's *Ulysses group*
(size P_u) all-to-alls heads against sequence; its *Ring group* (size P_r: the ranks with the
same Ulysses index, i.e. the same heads) rotates K/V. Which ranks form a Ulysses group is
what tells the strategies apart (Note [Layout order]):

- ``ulysses``: P_u = world.            - ``ring``: P_r = world.
- ``usp`` (xDiT): Ulysses takes GPUs of a machine first, the Ring spans machines.
- ``tas``: Ulysses takes machines first (head-scatter across the slow links, whose traffic
  then shrinks as 1/P), the Ring stays inside machines.

Note [Layout order]: a rank is the mixed-radix number (machine, gpu). The Ulysses group is
built from the digits in the strategy's order: a whole digit when P_u still left is a
multiple of its size, or a divisor d of it (the digit splits as ``ring_part * d + u_part``).
Any P_u reachable this way works; anything else is a ValueError listing the possible ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from sf_comm import Topology


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Partitions of the world into Ulysses groups and Ring groups (member-ordered)."""

    ulysses: tuple[tuple[int, ...], ...]
    ring: tuple[tuple[int, ...], ...]

    @property
    def p_u(self) -> int:
        return len(self.ulysses[0])

    @property
    def p_r(self) -> int:
        return len(self.ring[0])


def _digit_splits(sizes: list[int], p_u: int) -> list[int] | None:
    """Ulysses share of each digit, or None when ``p_u`` is not reachable."""
    shares, left = [], p_u
    for size in sizes:
        if left >= size:
            if left % size:
                return None
            shares.append(size)
            left //= size
        else:
            if size % left:
                return None
            shares.append(left)
            left = 1
    return shares if left == 1 else None


def possible_ulysses_degrees(topology: Topology, order: str) -> list[int]:
    sizes = _sizes(topology, order)
    return [d for d in range(1, topology.world_size + 1) if _digit_splits(sizes, d) is not None]


def _sizes(topology: Topology, order: str) -> list[int]:
    if order == "inter-first":
        return [topology.machines, topology.gpus_per_machine]
    if order == "intra-first":
        return [topology.gpus_per_machine, topology.machines]
    raise ValueError(f"layout order must be 'inter-first' or 'intra-first', got {order!r}")


def make_layout(topology: Topology, p_u: int, order: str) -> Layout:
    """The Ulysses/Ring partition for Ulysses degree ``p_u`` in ``order`` (see module doc).

    Raises:
        ValueError: when ``p_u`` cannot be laid out on this topology in this order.
    """
    sizes = _sizes(topology, order)
    shares = _digit_splits(sizes, p_u)
    if shares is None:
        raise ValueError(
            f"Ulysses degree {p_u} cannot be laid out {order} on topology {topology}; "
            f"possible degrees: {possible_ulysses_degrees(topology, order)}"
        )
    g_count = topology.gpus_per_machine

    def coords(rank: int) -> tuple[int, ...]:
        machine, gpu = divmod(rank, g_count)
        digits = [machine, gpu] if order == "inter-first" else [gpu, machine]
        u_parts, r_parts = [], []
        for digit, share in zip(digits, shares):
            r_parts.append(digit // share)
            u_parts.append(digit % share)
        u_index = 0
        for digit, share in zip(u_parts, shares):
            u_index = u_index * share + digit
        return (u_index, *r_parts)

    table = {rank: coords(rank) for rank in range(topology.world_size)}
    ulysses: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for rank, (u_index, *r_parts) in table.items():
        ulysses.setdefault(tuple(r_parts), []).append((u_index, rank))
    u_groups = [tuple(r for _, r in sorted(members)) for _, members in sorted(ulysses.items())]
    ring: dict[int, list[int]] = {}
    for group in u_groups:  # member i of every Ulysses group shares heads i: ring over them
        for i, rank in enumerate(group):
            ring.setdefault(i, []).append(rank)
    r_groups = [tuple(ring[i]) for i in sorted(ring)]
    assert math.prod((len(u_groups[0]), len(r_groups[0]))) == topology.world_size
    assert sorted(itertools.chain(*u_groups)) == list(range(topology.world_size))
    return Layout(tuple(u_groups), tuple(r_groups))
