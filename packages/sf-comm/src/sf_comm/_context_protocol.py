"""``CommContext``: the interface of a communication context, as strategies and models use it.

Three classes implement it: :class:`sf_comm.Context` (a whole job, from :func:`sf_comm.init`),
:class:`sf_comm.split.SubContext` (one part of a job, from ``ctx.split``) and the
simulator's ``sf_attn.sim.layer.SimContext`` (one rank of a modelled topology, no processes).
Code that only communicates (collectives, strategies, model plans) takes a ``CommContext``;
code that needs more of a job takes a ``Context``.

Not in the interface:

- ``mesh``: only a whole job has a DeviceMesh. A part's mesh cannot be cut out of the job's
  (a DeviceMesh slices by axis, not by rank range), a new one would create process groups
  collectively over the job, and its coordinates would be the job's global ranks rather
  than the part's local ones. Nothing outside sf-comm reads ``ctx.mesh``.
- ``split``: jobs are split into parts (CFG parallel) from the job's own context; a
  simulated rank has nothing to split. ``Context`` and ``SubContext`` both have it.
- a rank's machine: ``topology.machine_of(rank)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .topology import Topology
from .transport import Group, Transport


@runtime_checkable
class CommContext(Protocol):
    """What a rank needs to communicate; see the module docstring for who implements it.

    Read-only properties here, so plain attributes, properties and narrower types (a
    transport subclass) all satisfy it. ``isinstance(x, CommContext)`` checks that the
    members exist, not their types (mypy checks those).
    """

    @property
    def topology(self) -> Topology:
        """machines x gpus_per_machine of this context (local to a part for a SubContext)."""

    @property
    def rank(self) -> int:
        """This rank, 0..world_size-1 in this context's numbering."""

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live."""

    @property
    def transport(self) -> Transport:
        """What collectives move data with (its ranks are this context's ranks)."""

    def group(self, axis: str = "world") -> Group:
        """This rank's group along ``axis``: "world", "inter" or "intra"."""

    def subgroup(self, partition: Sequence[Sequence[int]], name: str) -> Group:
        """This rank's group in ``partition`` (disjoint rank lists covering the context);
        collective the first time a partition is seen."""

    def barrier(self, axis: str = "world") -> None: ...

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Scope of one multi-message operation (Note [Failure contract])."""

    def close(self) -> None:
        """Release what this context owns (idempotent, not collective)."""

    def __enter__(self) -> CommContext: ...

    def __exit__(self, *exc: object) -> None: ...
