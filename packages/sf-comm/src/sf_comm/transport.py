"""The transport interface: one exchange primitive, async handles, a registry.

Every collective in :mod:`sf_comm.collectives` is an *exchange*: a set of sends (peer,
tensor) and receives (peer, shape, dtype) issued together by every member of a group.
One-sided transports (``shm``, ``nvshmem``, ``torch-symm``) implement it with puts into a
peer's symmetric heap plus signals; two-sided ones (``gloo``, ``nccl``) with isend/irecv or
the library's own all-to-all.

Ordering contract (every transport relies on it): all ranks issue their exchanges in the
same program order, so that for every pair (src, dst) the k-th message src sends to dst is
the k-th message dst expects from src. SPMD code that calls collectives in the same order on
every rank satisfies this.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class CommError(RuntimeError):
    """A communication failed: a peer died, a wait timed out, or ranks disagreed."""


class CommTimeout(CommError, TimeoutError):
    """A wait ran past its timeout."""


class Handle(Generic[T]):
    """An operation in flight; ``wait()`` returns its result, ``with handle:`` waits on exit.

    Example::

        h = sf_comm.shift(group, kv, offset=1)     # starts the transfer
        partial = attend(q, kv_current)            # overlaps with it
        kv_next = h.wait()
    """

    __slots__ = ("_done", "_finish", "_result", "_test")

    def __init__(self, finish: Callable[[], T], test: Callable[[], bool] | None = None) -> None:
        self._finish = finish
        self._test = test
        self._done = False
        self._result: T | None = None

    @classmethod
    def completed(cls, result: T) -> Handle[T]:
        handle: Handle[T] = cls(lambda: result)
        handle.wait()
        return handle

    def wait(self) -> T:
        """Block until the operation is complete and return its result (idempotent)."""
        if not self._done:
            self._result = self._finish()
            self._done = True
        return self._result  # type: ignore[return-value]

    def is_completed(self) -> bool:
        """True when ``wait()`` would not block."""
        return self._done or (self._test is not None and self._test())

    def __enter__(self) -> Handle[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.wait()


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """A set of ranks that communicate together, in member order.

    ``ranks`` are global ranks; a collective's "member i" is ``ranks[i]``. ``pg`` is the
    torch.distributed process group of these ranks (from the DeviceMesh).
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        """This rank's position in the group."""
        return self.ranks.index(self.rank)

    def peer(self, offset: int) -> int:
        """Global rank of the member ``offset`` places after this one (mod size)."""
        return self.ranks[(self.index + offset) % self.size]


Send = tuple[int, torch.Tensor]  # (global peer rank, tensor)
Recv = tuple[int, torch.Size, torch.dtype]  # (global peer rank, shape, dtype)


@dataclasses.dataclass(slots=True)
class CommStats:
    """What a transport moved: calls per operation and bytes sent to other ranks."""

    calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    bytes_sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    messages: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def snapshot(self) -> CommStats:
        return CommStats(
            collections.Counter(self.calls),
            collections.Counter(self.bytes_sent),
            collections.Counter(self.messages),
        )

    def __sub__(self, other: CommStats) -> CommStats:
        return CommStats(
            self.calls - other.calls,
            self.bytes_sent - other.bytes_sent,
            self.messages - other.messages,
        )


class Transport(abc.ABC):
    """Moves tensors between the ranks of a job.

    Subclasses implement :meth:`exchange`; they may override :meth:`all_to_all` when their
    library has a native one (the two-sided baseline does).
    """

    name: str = "?"
    one_sided: bool = False

    def __init__(self, *, rank: int, world_size: int, timeout: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.stats = CommStats()

    @abc.abstractmethod
    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        """Send and receive a set of tensors; the handle yields the received ones in order.

        Sends and receives whose peer is this rank are not allowed (collectives copy those
        locally).
        """

    def all_to_all(
        self, group: Group, inputs: Sequence[torch.Tensor], out_shapes: Sequence[torch.Size]
    ) -> Handle[list[torch.Tensor]]:
        """``inputs[i]`` goes to member i; result ``[j]`` came from member j."""
        me = group.index
        dtype = inputs[me].dtype
        sends = [(r, inputs[i]) for i, r in enumerate(group.ranks) if i != me]
        recvs = [(r, out_shapes[i], dtype) for i, r in enumerate(group.ranks) if i != me]
        handle = self.exchange(group, sends, recvs, op="all_to_all")
        local = inputs[me].clone()

        def finish() -> list[torch.Tensor]:
            received = handle.wait()
            return received[:me] + [local] + received[me:]

        return Handle(finish, handle.is_completed)

    @abc.abstractmethod
    def barrier(self, group: Group) -> None:
        """Return once every member of ``group`` has entered the barrier."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release buffers and segments (idempotent)."""

    def record(self, op: str, sends: Sequence[Send]) -> None:
        self.stats.calls[op] += 1
        self.stats.messages[op] += len(sends)
        self.stats.bytes_sent[op] += sum(t.numel() * t.element_size() for _, t in sends)


TransportFactory = Callable[..., Transport]
_REGISTRY: dict[str, TransportFactory] = {}


def register_transport(name: str, factory: TransportFactory) -> None:
    """Make ``sf_comm.init(transport=name)`` build transports with ``factory``."""
    _REGISTRY[name] = factory


def transport_names() -> list[str]:
    return ["auto", *sorted(_REGISTRY)]


def make_transport(name: str, **kwargs: Any) -> Transport:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose one of {transport_names()}") from None
    return factory(**kwargs)
