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

Note [Failure contract]
    A transport is either usable or *broken*; it never silently resynchronises. It breaks
    when one of its own operations fails (a peer died, a wait timed out, a received header
    does not match what this rank expects) or when an exception leaves a call scope
    (:meth:`Transport.call`) after messages may have been issued: an interrupted rank cannot
    know which of its peers' messages are still in flight, so any later message on the
    same pair could be consumed by the wrong call. Breaking is sticky: every later
    operation raises :class:`CommError` naming the first cause, and the rank tells its
    peers (``abort``), so they fail within one poll interval instead of at their timeout.
    Recovery is a new context (``sf_comm.init``).

Note [Call tags]
    Each message carries, besides its size and operation, a *call tag*: for the pair
    (src, dst), the number of call scopes in which src has sent to dst (outside any scope,
    the scope the pair last used). The receiver computes the same count for (src, dst) from
    its own scopes, so a message from a different call (a peer that restarted a call, or
    ranks that run different numbers of calls) is rejected with both calls named, even when
    its size and operation happen to match. Counting per pair rather than per rank keeps
    programs correct whose groups run different numbers of calls (a CFG half that does
    extra work, say).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
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


def op_code(op: str) -> int:
    """A stable 31-bit code of an operation name, for message headers."""
    return zlib.crc32(op.encode()) & 0x7FFF_FFFF


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 tensor (a view when ``t`` is contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class Backoff:
    """Spin briefly, then yield, then sleep with growing intervals (ranks share cores)."""

    __slots__ = ("polls",)

    def __init__(self) -> None:
        self.polls = 0

    def __call__(self) -> None:
        self.polls += 1
        if self.polls < 64:
            return
        if self.polls < 256:
            os.sched_yield()
            return
        time.sleep(min(1e-3, 1e-5 * (self.polls - 255)))


def ranks_text(ranks: Sequence[int]) -> str:
    """Ranks for messages: ``rank 3`` or ``ranks 0, 3``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


# How often a waiting rank looks for dead, aborted or timed-out peers (seconds).
WATCH_INTERVAL = 0.05


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
        self._broken: str | None = None  # Note [Failure contract]: the first cause
        self._closed = False
        # Call scopes (Note [Call tags]): outermost scopes entered, current depth and name.
        self._scopes = 0
        self._depth = 0
        self._scope_name = ""
        # per peer: [scopes with traffic, the last such scope] for sends and for receives
        self._send_calls = [[0, -1] for _ in range(world_size)]
        self._recv_calls = [[0, -1] for _ in range(world_size)]

    # -- failure contract (Note [Failure contract]) ----------------------------------------

    @property
    def broken(self) -> str | None:
        """Why this transport is unusable, or None while it works."""
        return self._broken

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released it (transports with nothing to release say False)."""
        return self._closed

    def _check(self) -> None:
        """Raise if the transport is broken or closed."""
        if self._broken:
            raise CommError(
                f"rank {self.rank}: {self.name} transport unusable after an earlier failure "
                f"({self._broken}); create a new context with sf_comm.init"
            )
        if self._closed:
            raise CommError(f"rank {self.rank}: {self.name} transport is closed")

    def _fail(
        self, message: str, exc: type[CommError] = CommError, *, cause: str | None = None
    ) -> CommError:
        """Break the transport, tell the peers, and return the error to raise.

        Args:
            message: what went wrong, in this rank's words.
            exc: the error class.
            cause: a peer's reason this failure passes on (the root cause the peers are
                told instead of ``message``, so every rank names the rank that caused it).
        """
        own = f"rank {self.rank}: {message}"
        self.abort(cause or own)
        return exc(own)

    def abort(self, reason: str) -> None:
        """Mark this transport broken and tell the peers ``reason`` (idempotent: the first
        reason stays). Transports that can reach their peers override :meth:`_notify_peers`."""
        if self._broken is not None:
            return
        self._broken = reason
        with contextlib.suppress(Exception):
            self._notify_peers(reason)

    def _notify_peers(self, reason: str) -> None:  # noqa: B027 - optional hook
        """Make peers waiting on this rank fail fast with ``reason``."""

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Scope of one multi-message operation (e.g. one ``parallel_attention``)::

            with ctx.transport.call("parallel_attention"):
                ...  # collectives and compute

        An exception leaving the outermost scope breaks the transport and tells the peers
        (Note [Failure contract]); messages carry the scope count (Note [Call tags]). Scopes
        nest; only the outermost counts. Errors that every rank raises alike before any
        message is issued (bad arguments) belong before the scope.
        """
        return self._scope(name)

    @contextlib.contextmanager
    def _scope(self, name: str) -> Iterator[None]:
        self._check()
        outer = self._depth == 0
        if outer:
            self._scopes += 1
            self._scope_name = name
        self._depth += 1
        try:
            yield
        except BaseException as exc:
            if outer:
                detail = f": {exc}" if str(exc) else ""
                self.abort(f"rank {self.rank}: {type(exc).__name__} during {name}{detail}")
            raise
        finally:
            self._depth -= 1

    def activity(self, op: str) -> str:
        """What this rank is doing, for error messages: ``op`` and its call scope."""
        if self._depth:
            return f"{op} (call #{self._scopes} {self._scope_name})"
        return op

    @staticmethod
    def _tag(calls: list[list[int]], peer: int, scope: int) -> int:
        entry = calls[peer]
        if entry[1] != scope:
            entry[0] += 1
            entry[1] = scope
        return entry[0]

    def send_tag(self, dst: int) -> int:
        """Call tag of the next message to ``dst`` (Note [Call tags])."""
        return self._tag(self._send_calls, dst, self._scopes)

    def recv_tag(self, src: int) -> int:
        """Call tag this rank expects on the next message from ``src``."""
        return self._tag(self._recv_calls, src, self._scopes)

    @staticmethod
    def header_mismatch(
        what: str,
        src: int,
        want: tuple[int, int, int],
        got: tuple[int, int, int],
        their_op: str = "",
    ) -> str | None:
        """Why a received header (bytes, op code, call tag) differs from the expected one, or
        None when it matches. ``what`` is this rank's operation (with its call scope)."""
        (w_bytes, w_code, w_tag), (g_bytes, g_code, g_tag) = want, got
        if g_tag != w_tag:
            return (
                f"{what}: rank {src} sent a message of its call #{g_tag} with this rank, but "
                f"this rank is in call #{w_tag} with it (a rank abandoned or skipped a call: "
                "the ranks no longer run the same collectives)"
            )
        if g_code != w_code:
            theirs = f" ({their_op})" if their_op else ""
            return (
                f"{what}: rank {src} sent a message of a different operation{theirs} (the "
                "ranks run different collectives or strategies)"
            )
        if g_bytes != w_bytes:
            return (
                f"{what}: expected {w_bytes} bytes from rank {src}, but rank {src} sent "
                f"{g_bytes} bytes (shapes, dtypes or sequence lengths differ across ranks)"
            )
        return None

    # -- waiting -----------------------------------------------------------------------

    def _spin(self, ready: Callable[[], bool], peers: Sequence[int], what: str) -> None:
        """Poll ``ready`` with back-off; every :data:`WATCH_INTERVAL` let :meth:`_watch` raise
        for a dead, aborted or late peer."""
        start = last = time.monotonic()
        backoff = Backoff()
        while not ready():
            backoff()
            now = time.monotonic()
            if now - last > WATCH_INTERVAL:
                last = now
                self._watch(peers, what, start)

    def _watch(self, peers: Sequence[int], what: str, start: float) -> None:
        """Raise if the wait for ``peers`` in ``what`` must end (default: the timeout)."""
        if time.monotonic() - start > self.timeout:
            raise self._fail(
                f"{what} timed out after {self.timeout:.0f}s waiting for ranks {list(peers)}",
                CommTimeout,
            )

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

    def check_peers(self, sends: Sequence[Send], recvs: Sequence[Recv], op: str) -> None:
        """Raises ValueError for a send or receive whose peer is this rank or not in the job
        (what every :meth:`exchange` refuses before it moves anything)."""
        for peer in [p for p, _ in sends] + [p for p, _, _ in recvs]:
            if peer == self.rank or not 0 <= peer < self.world_size:
                raise ValueError(f"{op}: invalid peer rank {peer} for rank {self.rank}")

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
