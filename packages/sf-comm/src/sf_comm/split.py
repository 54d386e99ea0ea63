"""Splitting a job into parts that each run their own sequence parallelism (CFG parallel).

``ctx.split(2)`` gives each rank a :class:`SubContext` over its part (the conditional or the
unconditional branch of classifier-free guidance) and the *cross group* joining the ranks
with the same place in every part (to combine the branches)::

    sub, cross = ctx.split(2)                 # parts: machines halves if possible
    out = parallel_attention(q, k, v, ctx=sub)   # SP inside the part
    both = all_gather(ctx, cross, noise_pred)    # one exchange per step between parts

Parts follow the hardware: whole machines when the machine count divides, else an equal
share of every machine's GPUs, so SP traffic inside a part stays on the same links.

A SubContext numbers its ranks 0..part_size-1 with its own Topology, so every strategy runs
on it unchanged; its transport translates those local ranks to its parent's ranks. It is a
:class:`sf_comm.CommContext` like its parent, so a part can be split again (``sub.split(2)``).
Process groups are created for all parts at once (creating them is collective over the job),
which holds because every part runs the same code on the same shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ._context_protocol import CommContext
from .topology import Topology
from .transport import Group, Handle, Recv, Send, Transport


def part_layout(topology: Topology, parts: int) -> tuple[list[tuple[int, ...]], Topology]:
    """The parts (the split context's ranks, in local order) and the topology of one part.

    Raises:
        ValueError: when ``parts`` divides neither the machines nor the GPUs per machine.
    """
    machines, gpus = topology.shape
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if machines % parts == 0:
        per = machines // parts
        groups = [tuple(range(p * per * gpus, (p + 1) * per * gpus)) for p in range(parts)]
        return groups, topology.replace(machines=per)
    if gpus % parts == 0:
        per = gpus // parts
        groups = [
            tuple(m * gpus + p * per + i for m in range(machines) for i in range(per))
            for p in range(parts)
        ]
        return groups, topology.replace(
            gpus_per_machine=per, gpus_per_nic=min(topology.gpus_per_nic, per)
        )
    raise ValueError(
        f"cannot split topology {topology} into {parts} parts: {parts} must divide the machines "
        f"({machines}) or the GPUs per machine ({gpus})"
    )


class _MappedTransport(Transport):
    """The parent's transport seen through local rank numbers."""

    def __init__(self, parent: Transport, ranks: tuple[int, ...], local_rank: int) -> None:
        super().__init__(rank=local_rank, world_size=len(ranks), timeout=parent.timeout)
        self.parent = parent
        self.ranks = ranks
        self.name = parent.name
        self.one_sided = parent.one_sided
        self.stats = parent.stats

    def _group(self, group: Group) -> Group:
        return Group(
            group.name, tuple(self.ranks[r] for r in group.ranks), self.ranks[group.rank], group.pg
        )

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        g = self.ranks
        return self.parent.exchange(
            self._group(group),
            [(g[p], t) for p, t in sends],
            [(g[p], s, d) for p, s, d in recvs],
            op=op,
        )

    def all_to_all(
        self, group: Group, inputs: Sequence[torch.Tensor], out_shapes: Sequence[torch.Size]
    ) -> Handle[list[torch.Tensor]]:
        return self.parent.all_to_all(self._group(group), inputs, out_shapes)

    def barrier(self, group: Group) -> None:
        self.parent.barrier(self._group(group))

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.parent.call(name)  # one failure contract for the whole job

    @property
    def broken(self) -> str | None:
        return self.parent.broken

    @property
    def closed(self) -> bool:
        return self.parent.closed

    def record(self, op: str, sends: Sequence[Send]) -> None:  # the parent records
        pass


@dataclasses.dataclass(eq=False)
class SubContext:
    """A part of a job: a :class:`sf_comm.CommContext` over the part (see module doc).

    It has no ``mesh``: a DeviceMesh of the part cannot be cut out of the job's (see
    :mod:`sf_comm._context_protocol`), and nothing here needs one.

    Attributes:
        parent: the context that was split (the job's :class:`sf_comm.Context`, or a
            SubContext when a part is split again); it owns the transport and the groups.
        parts: every part, as the parent's ranks in this part's local order.
        topology: the topology of one part.
        index: which part this rank is in.
    """

    parent: CommContext
    parts: list[tuple[int, ...]]
    topology: Topology
    index: int  # which part this rank is in

    def __post_init__(self) -> None:
        self.ranks = self.parts[self.index]
        self.rank = self.ranks.index(self.parent.rank)
        self.world_size = len(self.ranks)
        self.device = self.parent.device
        self.transport = _MappedTransport(self.parent.transport, self.ranks, self.rank)
        self._cache: dict[Any, Group] = {}
        self._axes = self.topology.axis_partitions()

    def subgroup(self, partition: Sequence[Sequence[int]], name: str) -> Group:
        key = (tuple(tuple(m) for m in partition), name)
        if key not in self._cache:
            # the same local partition in every part, as one partition of the whole job
            full = [tuple(part[r] for r in members) for part in self.parts for members in key[0]]
            mine = self.parent.subgroup(full, name)
            local = tuple(self.ranks.index(r) for r in mine.ranks)
            self._cache[key] = Group(name, local, self.rank, mine.pg)
        return self._cache[key]

    def group(self, axis: str = "world") -> Group:
        if axis not in self._axes:
            raise ValueError(f"unknown mesh axis {axis!r}; use one of {list(self._axes)}")
        return self.subgroup(self._axes[axis], axis)

    def barrier(self, axis: str = "world") -> None:
        self.transport.barrier(self.group(axis))

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Scope of one multi-message operation; see :meth:`sf_comm.Transport.call`."""
        return self.transport.call(name)

    def split(self, parts: int) -> tuple[SubContext, Group]:
        """Split this part again; see :func:`split`."""
        return split(self, parts)

    def close(self) -> None:
        """The parent owns the transport; nothing to release."""

    def __enter__(self) -> SubContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(ctx: CommContext, parts: int) -> tuple[SubContext, Group]:
    """(this rank's part as a SubContext, the cross group of same-place ranks of all parts).

    Collective over ``ctx``; the cross group is in ``ctx``'s numbering (use it with ``ctx``).
    """
    groups, sub_topology = part_layout(ctx.topology, parts)
    index = next(i for i, g in enumerate(groups) if ctx.rank in g)
    sub = SubContext(ctx, groups, sub_topology, index)
    size = len(groups[0])
    cross = ctx.subgroup([tuple(g[i] for g in groups) for i in range(size)], "cross")
    return sub, cross
