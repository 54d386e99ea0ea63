"""``sf_comm.init``: the communication context of a job (mesh, groups, transport)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ._setup import destroy_groups, gather_strings
from ._version import __version__
from .split import SubContext, split
from .topology import Topology
from .transport import Group, Transport, make_transport, register_transport, transport_names

log = logging.getLogger(__name__)

AXES = ("inter", "intra")


class Context:
    """Everything a rank needs to communicate: topology, DeviceMesh, groups, transport.

    Created by :func:`init`; release it with :meth:`close` or use it as a ``with`` block.
    A :class:`sf_comm.CommContext`, plus what only a whole job has (``mesh``, ``split``).

    Attributes:
        topology: machines x gpus_per_machine of the job.
        mesh: a torch DeviceMesh of shape ``topology.shape`` with axes ("inter", "intra").
        rank, world_size: this rank and the job size.
        transport: the :class:`~sf_comm.transport.Transport` collectives use.
        device: where this rank's tensors live.
    """

    def __init__(
        self, *, topology: Topology, mesh: DeviceMesh, transport: Transport, device: torch.device
    ) -> None:
        self.topology = topology
        self.mesh = mesh
        self.transport = transport
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        world_pg = dist.group.WORLD
        self._groups = {"world": Group("world", tuple(range(self.world_size)), self.rank, world_pg)}
        # process groups this context created (the mesh's and subgroups'), destroyed by close()
        self._owned: list[Any] = []
        for axis in AXES:
            pg = mesh.get_group(axis)
            ranks = tuple(dist.get_process_group_ranks(pg))
            self._groups[axis] = Group(axis, ranks, self.rank, pg)
            if pg is not world_pg and pg not in self._owned:
                self._owned.append(pg)
        self._partitions: dict[tuple[tuple[int, ...], ...], Group] = {}

    def subgroup(self, partition: Sequence[Sequence[int]], name: str) -> Group:
        """This rank's group in ``partition`` (a list of disjoint rank lists covering the world).

        Collective the first time a partition is seen (process groups are created for all of
        its groups, in the same order on every rank); cached afterwards. Partitions equal to
        the world or to a mesh axis reuse those groups.
        """
        key = tuple(tuple(int(r) for r in members) for members in partition)
        cached = self._partitions.get(key)
        if cached is not None:
            return cached
        flat = sorted(r for members in key for r in members)
        if flat != list(range(self.world_size)):
            raise ValueError(f"partition {key} must cover ranks 0..{self.world_size - 1} once")
        mine = next(members for members in key if self.rank in members)
        # Decide from the whole partition (same on every rank), never from this rank's part:
        # creating process groups is collective.
        axes = self.topology.axis_partitions()
        known = [axis for axis, part in axes.items() if set(part) == set(key)]
        if known:
            group = dataclasses.replace(self._groups[known[0]], name=name)
        elif max(len(m) for m in key) == 1:
            group = Group(name, mine, self.rank, None)
        else:
            pg, every = dist.new_subgroups_by_enumeration([list(m) for m in key])
            self._owned.extend(g for g in every if g is not None)
            group = Group(name, mine, self.rank, pg)
        self._partitions[key] = group
        return group

    def split(self, parts: int) -> tuple[SubContext, Group]:
        """Split the job into ``parts`` (e.g. CFG branches); see :func:`sf_comm.split.split`."""
        return split(self, parts)

    def group(self, axis: str = "world") -> Group:
        """The group of this rank along ``axis``: "world", "inter" or "intra"."""
        try:
            return self._groups[axis]
        except KeyError:
            raise ValueError(
                f"unknown mesh axis {axis!r}; use one of {list(self._groups)}"
            ) from None

    def barrier(self, axis: str = "world") -> None:
        self.transport.barrier(self.group(axis))

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Scope of one multi-message operation; see :meth:`sf_comm.Transport.call`."""
        return self.transport.call(name)

    def close(self) -> None:
        """Release the transport's buffers and segments and the process groups this context
        created (idempotent; not collective). The context is unusable afterwards."""
        self.transport.close()
        owned, self._owned = self._owned, []
        destroy_groups(owned, pending=self.transport.broken is not None)
        # drop the last references, so the groups' sockets close now rather than at GC
        self._groups = {}
        self._partitions.clear()
        self.mesh = None  # type: ignore[assignment]

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Context(rank={self.rank}/{self.world_size}, topology={self.topology}, "
            f"transport={self.transport.name}, device={self.device})"
        )


def _default_timeout() -> float:
    return float(os.environ.get("SF_TIMEOUT", 120))


def local_cuda_device() -> torch.device:
    """This process's GPU: ``LOCAL_RANK`` (torchrun's) modulo the visible devices, else the
    current one (Note [One GPU per local rank])."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or not local.isdigit():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", int(local) % torch.cuda.device_count())


def _one_rank_per_gpu() -> bool:
    """Whether each local rank has a GPU of its own (NCCL refuses two ranks on one GPU; with
    more local ranks than GPUs, e.g. under CUDA MPS, the job's process group is gloo and the
    GPU transports carry the data: Note [One GPU per local rank])."""
    if not torch.cuda.is_available():
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return not local.isdigit() or int(local) <= torch.cuda.device_count()


def _ensure_process_group(timeout: float) -> None:
    if dist.is_initialized():
        return
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "cuda:nccl,cpu:gloo" if _one_rank_per_gpu() else "gloo"
        if torch.cuda.is_available():  # before NCCL binds this process to a device
            torch.cuda.set_device(local_cuda_device())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        return
    # A single process with no launcher: a world of one, so the same code runs everywhere.
    dist.init_process_group(
        "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _cuda_transport_available(name: str) -> bool:
    if name == "nvshmem":
        try:
            import nvshmem.core  # noqa: F401
        except Exception:
            return False
        return True
    if name == "torch-symm":
        try:
            import torch.distributed._symmetric_memory as symm  # noqa: F401
        except Exception:
            return False
        return torch.cuda.is_available()
    return False


def _auto_candidates(device: torch.device, timeout: float) -> list[str]:
    """What ``transport="auto"`` tries on ``device``, in order (the first that builds wins).

    On CPU: shm when every rank is on one machine, else shm+gloo (shm inside each machine,
    gloo between them); which ranks share a machine is detected, collectively
    (Note [Machine identity] in :mod:`sf_comm.shm_gloo`).
    """
    if device.type == "cuda":
        return [n for n in ("nvshmem", "torch-symm") if _cuda_transport_available(n)] + ["nccl"]
    from .shm_gloo import job_machines

    machines = job_machines(rank=dist.get_rank(), world=dist.get_world_size(), timeout=timeout)
    return ["shm"] if len(machines) == 1 else ["shm+gloo"]


# Environment variables that change the layout or protocol of the shm heaps: every rank must
# see the same values (Note [Settings agreement]).
_SHM_ENV = ("SF_SHM_SLOT_MB", "SF_SHM_CMA_MIN_KB", "SF_SHM_DIR")
# Variables of the layers above that decide which collectives a call issues (registered by
# them with agree_on_env, e.g. sf_attn's SF_GATHER_KV).
_AGREED_ENV: set[str] = set()


def agree_on_env(*names: str) -> None:
    """Make :func:`init` check that every rank sees the same value of these environment
    variables (Note [Settings agreement]); for settings of the layers above sf_comm that
    change which collectives run. Register them at import, before ``init``."""
    _AGREED_ENV.update(names)


def _local_settings(
    topology: Topology | str | None,
    transport: str,
    device: torch.device | str | None,
    options: dict[str, Any],
) -> tuple[dict[str, str], Topology | None]:
    """This rank's view of what every rank must agree on, and its topology (None when this
    rank could not work one out: the reason is in the settings under "topology")."""
    world = dist.get_world_size()
    topo: Topology | None = None
    try:
        if topology is None:
            topo = Topology.detect(world_size=world)
        elif isinstance(topology, str):
            topo = Topology.parse(topology)
            topo.check_world(world, source=f"topology {topology!r}")
        else:
            topo = topology
            topo.check_world(world, source=f"Topology {topo}")
        where = f"{topo.machines}x{topo.gpus_per_machine}"
    except ValueError as exc:
        where = f"error: {exc}"
    settings = {
        "topology": where,
        "transport": transport
        if transport in transport_names()
        else f"error: unknown transport {transport!r}; choose one of {transport_names()}",
        "device type": torch.device(device).type if device is not None else "default",
        "transport options": repr(sorted(options.items())),
        "sf-comm version": __version__,
    }
    if transport in ("shm", "shm+gloo", "auto"):
        settings.update({name: os.environ.get(name, "unset") for name in _SHM_ENV})
    settings.update({name: os.environ.get(name, "unset") for name in sorted(_AGREED_ENV)})
    return settings, topo


def _agree_on_settings(
    topology: Topology | str | None,
    transport: str,
    timeout: float,
    device: torch.device | str | None,
    options: dict[str, Any],
) -> Topology:
    """Note [Settings agreement]: one tiny collective before any group is built.

    Ranks that disagree on the topology build different process groups and wait on each other
    forever inside the library; ranks that disagree on the transport or the shm layout
    misread each other's heaps. So every rank's settings are compared first, and every rank
    fails with the same message, showing each rank's value.

    Raises:
        ValueError: on every rank, when a rank's settings are invalid or differ.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    settings, topo = _local_settings(topology, transport, device, options)
    backend = str(dist.get_backend())
    on = "cpu" if "gloo" in backend or not torch.cuda.is_available() else "cuda"
    views = [
        json.loads(text)
        for text in gather_strings(
            json.dumps(settings),
            rank=rank,
            world=world,
            timeout=timeout,
            what="sf_comm.init (settings agreement)",
            words=256,
            device=on,
        )
    ]
    problems = []
    for key in settings:
        values = [view[key] for view in views]
        errors = sorted({v for v in values if v.startswith("error: ")})
        if errors and len(set(values)) == 1:
            problems.append(errors[0].removeprefix("error: "))
        elif len(set(values)) > 1:
            problems.append(f"ranks disagree on the {key}: {_by_value(values)}")
        elif errors:
            problems.extend(e.removeprefix("error: ") for e in errors)
    if problems:
        raise ValueError(
            f"rank {rank}: sf_comm.init: " + "; ".join(problems) + " (every rank must be started "
            "with the same topology, transport and SF_* settings)"
        )
    assert topo is not None
    return topo


def _by_value(values: list[str]) -> str:
    """ "rank 0: 1x4; ranks 1-3: 2x2" for per-rank values."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    parts = []
    for value, ranks in groups.items():
        spans = []
        start = prev = ranks[0]
        for r in [*ranks[1:], None]:
            if r is not None and r == prev + 1:
                prev = r
                continue
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            if r is not None:
                start = prev = r
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{label} {', '.join(spans)}: {value.removeprefix('error: ')}")
    return "; ".join(parts)


def init(
    topology: Topology | str | None = None,
    transport: str = "auto",
    *,
    timeout: float | None = None,
    device: torch.device | str | None = None,
    **transport_options: Any,
) -> Context:
    """Create the communication context of this rank (collective: every rank calls it).

    Args:
        topology: a :class:`Topology`, a ``"MACHINESxGPUS"`` string, or None to detect
            (``SF_TOPOLOGY``, then torchrun's variables).
        transport: one of "auto", "shm", "shm+gloo", "gloo", "nccl", "nvshmem", "torch-symm".
            "auto" takes nvshmem or torch-symm on CUDA where available (else nccl); on CPU shm,
            or shm+gloo when the ranks are on more than one machine (real or emulated).
        timeout: seconds any wait may take (default ``SF_TIMEOUT`` or 120).
        device: where tensors live (default: with NCCL, the GPU of torchrun's ``LOCAL_RANK``,
            made current; else CPU). "cuda" without an index also means that GPU.
        transport_options: passed to the transport's factory (e.g. ``slot_bytes`` for shm).

    Returns:
        The :class:`Context`.

    Raises:
        ValueError: on every rank: unknown transport, a topology that does not match the world
            size, or ranks whose topology, transport or SF_SHM_* settings differ (Note
            [Settings agreement]).
    """
    timeout = _default_timeout() if timeout is None else float(timeout)
    _ensure_process_group(timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = _agree_on_settings(topology, transport, timeout, device, transport_options)
    uses_nccl = "nccl" in str(dist.get_backend())
    if device is None:
        device = "cuda" if uses_nccl else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = local_cuda_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tries = _auto_candidates(device, timeout) if transport == "auto" else [transport]
    # The mesh's device type picks the process groups' backend: CUDA meshes need NCCL, which
    # refuses several ranks on one GPU; a gloo job keeps a CPU mesh even for CUDA tensors.
    mesh_type = device.type if uses_nccl else "cpu"
    mesh = init_device_mesh(mesh_type, topo.shape, mesh_dim_names=AXES)
    made = None
    try:
        for i, candidate in enumerate(tries):
            try:
                made = make_transport(
                    candidate,
                    rank=rank,
                    world_size=world,
                    timeout=timeout,
                    device=device,
                    **transport_options,
                )
                break
            except Exception as exc:  # auto: fall back to the next transport
                if i == len(tries) - 1:
                    raise
                log.warning(
                    "rank %d: transport %s unavailable (%s); trying %s",
                    rank,
                    candidate,
                    exc,
                    tries[i + 1],
                )
    except BaseException:  # the mesh's process groups would outlive the failed init
        groups = [mesh.get_group(axis) for axis in AXES]
        destroy_groups([pg for pg in groups if pg is not dist.group.WORLD], pending=False)
        raise
    assert made is not None
    log.debug("rank %d: topology %s, transport %s", rank, topo, made.name)
    return Context(topology=topo, mesh=mesh, transport=made, device=device)


# Note [One GPU per local rank]
# torchrun starts one process per GPU and tells each its LOCAL_RANK; nothing binds the process
# to that GPU, so without this every rank of a node would allocate on cuda:0 (and NCCL would
# refuse the duplicate device). init (and the process group it creates) makes cuda:LOCAL_RANK
# current, so tensors the user builds with device="cuda" afterwards land on the right GPU.
# Several ranks sharing one GPU (CUDA MPS, tests on one device) take LOCAL_RANK modulo the
# device count; NCCL refuses that ("duplicate GPU"), so such a job's process group is gloo
# (a CPU mesh) and its tensors move through a one-sided GPU transport or gloo.


# -- this process's default contexts -------------------------------------------------------

_DEFAULTS: dict[tuple[Topology | str | None, str, tuple[tuple[str, Any], ...]], Context] = {}


def default_context(
    topology: Topology | str | None = None, transport: str = "auto", **options: Any
) -> Context:
    """This process's context for these arguments: created by :func:`init` on first use, then
    cached (for code with no context passed in, such as the ``streamfusion`` compile backend).

    The call that creates a context is collective, so every rank must ask for contexts in the
    same order (it holds when all ranks run the same program). A cached context whose
    transport broke (Note [Failure contract]) or was closed is replaced by a new one, again
    collectively: its peers' transports broke too, so they replace theirs on their next call.
    :func:`close_default_contexts` releases them all.

    Args:
        topology, transport: as for :func:`init`.
        options: the other arguments of :func:`init` (``timeout``, ``device``, transport
            options); values must be hashable.

    Returns:
        The cached :class:`Context`.

    Raises:
        ValueError: as :func:`init`.
    """
    key = (topology, transport, tuple(sorted(options.items())))
    ctx = _DEFAULTS.get(key)
    if ctx is not None and ctx.transport.broken is None and not ctx.transport.closed:
        return ctx
    if ctx is not None:
        del _DEFAULTS[key]
        with contextlib.suppress(Exception):  # not collective; frees segments and groups
            ctx.close()
    ctx = init(topology=topology, transport=transport, **options)
    _DEFAULTS[key] = ctx
    return ctx


def close_default_contexts() -> None:
    """Close and forget every context :func:`default_context` made in this process (not
    collective; the next :func:`default_context` creates a new one, collectively)."""
    for ctx in _DEFAULTS.values():
        with contextlib.suppress(Exception):
            ctx.close()
    _DEFAULTS.clear()


# -- transport registrations ----------------------------------------------------------------


def _make_shm(
    *, rank: int, world_size: int, timeout: float, device: torch.device, **kw: Any
) -> Transport:
    from ._shm_setup import create

    if device.type != "cpu":
        raise ValueError(f"the shm transport moves CPU tensors; device is {device}")
    cpu_pg = None
    with contextlib.suppress(Exception):
        if "gloo" not in str(dist.get_backend()):
            cpu_pg = dist.new_group(backend="gloo")
    try:
        return create(rank=rank, world_size=world_size, timeout=timeout, pg=cpu_pg, **kw)
    finally:
        if cpu_pg is not None:  # used for set-up only
            destroy_groups([cpu_pg], pending=False)


def _make_shm_gloo(
    *, rank: int, world_size: int, timeout: float, device: torch.device, **kw: Any
) -> Transport:
    from . import shm_gloo

    if device.type != "cpu":
        raise ValueError(f"the shm+gloo transport moves CPU tensors; device is {device}")
    if "gloo" not in str(dist.get_backend()):
        raise ValueError("the shm+gloo transport needs a gloo process group")
    return shm_gloo.create(rank=rank, world_size=world_size, timeout=timeout, **kw)


def _make_two_sided(backend: str):  # type: ignore[no-untyped-def]
    def factory(
        *, rank: int, world_size: int, timeout: float, device: torch.device, **kw: Any
    ) -> Transport:
        from .twosided import TwoSidedTransport

        if kw:
            raise ValueError(f"the {backend} transport takes no options, got {sorted(kw)}")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("the nccl transport needs CUDA tensors; use gloo or shm on CPU")
        return TwoSidedTransport(rank=rank, world_size=world_size, timeout=timeout, backend=backend)

    return factory


def _make_gpu(name: str):  # type: ignore[no-untyped-def]
    def factory(
        *, rank: int, world_size: int, timeout: float, device: torch.device, **kw: Any
    ) -> Transport:
        from . import gpu

        if device.type != "cuda":
            raise ValueError(f"the {name} transport needs CUDA tensors; use shm or gloo on CPU")
        return gpu.create(
            name, rank=rank, world_size=world_size, timeout=timeout, device=device, **kw
        )

    return factory


register_transport("shm", _make_shm)
register_transport("shm+gloo", _make_shm_gloo)
register_transport("gloo", _make_two_sided("gloo"))
register_transport("nccl", _make_two_sided("nccl"))
register_transport("nvshmem", _make_gpu("nvshmem"))
register_transport("torch-symm", _make_gpu("torch-symm"))
