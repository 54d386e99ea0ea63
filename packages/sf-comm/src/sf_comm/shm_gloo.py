"""``shm+gloo``: shared memory inside a machine, gloo between machines.

The ``shm`` transport maps every rank's heap from a shared-memory directory, which only
ranks of one host can share; and under an emulation (:mod:`sf_comm.emulate`) /dev/shm is
shared by all the emulated machines, so ``shm`` would carry their bytes without crossing the
emulated NIC. This transport routes each message by where its peer is::

    same machine as this rank  -> an ``shm`` transport over the machine's ranks only
    another machine            -> the ``gloo`` transport (sockets: the NIC, emulated or real)

So ``exchange(group, sends, recvs)`` is the plain code::

    local  = [(p, t) for p, t in sends if same_machine(p)]      # and the same for recvs
    remote = [(p, t) for p, t in sends if not same_machine(p)]
    h1 = shm.exchange(local...); h2 = gloo.exchange(remote...)
    return merge(h1.wait(), h2.wait())    # in the order of recvs

except that the two halves progress together (Note [Waiting on two transports]).
``sf_comm.init(transport="auto")`` picks it on CPU whenever the ranks span more than one
machine (:func:`job_machines`); on one machine ``auto`` stays ``shm``.

Note [Machine identity]
    "Same machine" is detected, never read from the topology: each rank describes where it
    runs by the kernel's boot id (one per host and boot; hostnames repeat across containers),
    the inode of its network namespace (one per emulated machine, :mod:`sf_comm.emulate`)
    and the device and inode of its shared-memory directory (containers of one host with
    their own /dev/shm cannot share heaps). Ranks with the same description share a machine.

Note [Waiting on two transports]
    A rank must keep both halves moving while it waits: shm messages larger than the inbox
    need this rank's attention to finish (credits, Note [shm credits]), gloo receives are
    posted only once their header is checked (Note [Checked two-sided messages]). Waiting on
    one half alone can deadlock: A waits on B's shm message, while B waits for its gloo send
    to C, whose receive C posts only once it stops waiting on D's shm message, ... back to A.
    So :meth:`ShmGlooTransport.exchange`'s wait polls both (``ShmTransport.progress``, the
    gloo handle's ``is_completed``) until both are done, and every poll interval lets each
    transport look for dead, aborted or late peers of its own.

Failure contract: one failure breaks both halves (Note [Failure contract] in
:mod:`sf_comm.transport`): local peers learn it through the shm heaps, remote ones through
the job's store.

Note [Rank numbers of the shm half]
    The shm half is an ordinary ``shm`` transport over the machine's ranks, numbered 0..G-1
    within the machine, and its messages (its errors, the reasons and status texts it keeps
    in its heap for its peers) use those numbers. Errors are raised again with the job's
    numbers (:meth:`ShmGlooTransport.global_ranks` rewrites "rank 1", "ranks [0, 1]",
    "ranks 0, 1"). Text this transport hands the shm half already has the job's numbers (a
    gloo failure passed on to the machine-mates, the status of a wait on both halves), so
    it goes in with those numbers marked (:func:`_keep_numbers`: no-break spaces), and the
    rewrite leaves them alone and unmarks them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import socket
from collections.abc import Iterator, Sequence

import torch

from ._setup import gather_strings
from .shm import ShmTransport
from .transport import CommError, Group, Handle, Recv, Send, Transport
from .twosided import TwoSidedTransport

# rank numbers in a message: "rank 3", "ranks [0, 1]", "ranks 0, 1" (transport.ranks_text)
_RANKS_RE = re.compile(r"\branks? (?:\[[\d, ]*\]|\d+(?:, \d+)*)")
_KEPT = "\u00a0"  # a no-break space: rank numbers written with it are the job's already


def _keep_numbers(text: str) -> str:
    """``text`` (with the job's rank numbers) as the shm half may carry it: its rank numbers
    marked so that :meth:`ShmGlooTransport.global_ranks` leaves them alone."""
    return _RANKS_RE.sub(lambda match: match[0].replace(" ", _KEPT), text)


def machine_identity(shm_dir: str | None = None) -> str:
    """Where this process runs, equal for exactly the ranks of one machine (Note [Machine
    identity])."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    try:
        net = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        net = "-"
    try:
        st = os.stat(shm_dir or os.environ.get("SF_SHM_DIR", "/dev/shm"))
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = "-"
    return f"{socket.gethostname()[:64]} boot {boot} net {net} shm {shm}"


def job_machines(*, rank: int, world: int, timeout: float) -> list[tuple[int, ...]]:
    """The job's machines, each a tuple of its ranks, in the order of their first rank
    (collective over the default group; Note [Machine identity])."""
    ids = gather_strings(
        machine_identity(),
        rank=rank,
        world=world,
        timeout=timeout,
        what="sf_comm.init (machine identity)",
        words=32,
    )
    machines: dict[str, list[int]] = {}
    for r, ident in enumerate(ids):
        machines.setdefault(ident, []).append(r)
    return [tuple(ranks) for ranks in machines.values()]


class ShmGlooTransport(Transport):
    """shm between ranks of one machine, gloo between machines; see the module docstring.

    Build with :func:`create` (collective).

    Attributes:
        machines: every machine's ranks.
        local: the shm transport over this machine's ranks (numbered within the machine), or
            None when this rank is alone on its machine.
        remote: the gloo transport over the whole job.
        routes: bytes sent by this rank, per (``"shm"`` or ``"gloo"``, peer rank).
    """

    name = "shm+gloo"
    one_sided = False  # the inter-machine half, which dominates the cost, is two-sided

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        machines: Sequence[tuple[int, ...]],
        local: ShmTransport | None,
        remote: TwoSidedTransport,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        self.machines = [tuple(m) for m in machines]
        self._machine = next(i for i, m in enumerate(self.machines) if rank in m)
        self._mine = self.machines[self._machine]
        self._index = {r: i for i, r in enumerate(self._mine)}  # global -> machine-local
        self.local = local
        self.remote = remote
        self.routes: collections.Counter[tuple[str, int]] = collections.Counter()
        self._local_group = Group("machine", tuple(range(len(self._mine))), self._index[rank])

    def _inner(self) -> list[Transport]:
        return [t for t in (self.local, self.remote) if t is not None]

    # -- failure contract -----------------------------------------------------------------

    @property
    def broken(self) -> str | None:
        return self._broken or next((t.broken for t in self._inner() if t.broken), None)

    def _notify_peers(self, reason: str) -> None:
        self.remote.abort(reason)
        if self.local is not None:  # Note [Rank numbers of the shm half]
            self.local.abort(_keep_numbers(reason))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Run the halves' code: one half's failure breaks the other too, and shm errors get
        the global ranks of the machine-local ones they name."""
        try:
            yield
        except CommError as exc:
            cause = next((t.broken for t in self._inner() if t.broken), None)
            from_shm = self.local is not None and self.local.broken and not self.remote.broken
            if from_shm and cause is not None:
                cause = self.global_ranks(cause)
            self.abort(cause or f"rank {self.rank}: {exc}")
            if from_shm:
                raise type(exc)(self.global_ranks(str(exc))) from exc
            raise

    def global_ranks(self, text: str) -> str:
        """``text`` of the shm half with the job's rank numbers (Note [Rank numbers of the
        shm half])."""

        def one(match: re.Match[str]) -> str:
            return str(self._mine[int(match[0])]) if int(match[0]) < len(self._mine) else match[0]

        def numbers(match: re.Match[str]) -> str:
            return re.sub(r"\d+", one, match[0])

        return _RANKS_RE.sub(numbers, text).replace(_KEPT, " ")

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._calls(name)

    @contextlib.contextmanager
    def _calls(self, name: str) -> Iterator[None]:
        """One call scope here and in both halves (their call tags count calls too)."""
        with self._scope(name), contextlib.ExitStack() as stack:
            for t in self._inner():
                stack.enter_context(t.call(name))
            yield

    def _watch(self, peers: Sequence[int], what: str, start: float) -> None:
        local = [self._index[p] for p in peers if p in self._index]
        remote = [p for p in peers if p not in self._index]
        with self._guard():
            if self.local is not None and local:
                self.local._watch(local, what, start)
            self.remote._watch(remote, what, start)

    # -- messages -------------------------------------------------------------------------

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self._check()
        self.check_peers(sends, recvs, op)
        self.record(op, sends)
        local_sends = [(self._index[p], t) for p, t in sends if p in self._index]
        remote_sends = [(p, t) for p, t in sends if p not in self._index]
        local_recvs = [(self._index[p], s, d) for p, s, d in recvs if p in self._index]
        remote_recvs = [(p, s, d) for p, s, d in recvs if p not in self._index]
        for p, t in sends:
            self.routes["shm" if p in self._index else "gloo", p] += t.numel() * t.element_size()
        with self._guard():
            lh = None
            if local_sends or local_recvs:
                assert self.local is not None  # a peer on this machine implies a local heap
                lh = self.local.exchange(self._local_group, local_sends, local_recvs, op=op)
            rh = None
            if remote_sends or remote_recvs:
                rh = self.remote.exchange(group, remote_sends, remote_recvs, op=op)
        peers = sorted({p for p, _ in sends} | {p for p, _, _ in recvs})
        what = self.activity(op)

        def ready() -> bool:  # Note [Waiting on two transports]
            with self._guard():
                if self.local is not None:  # earlier exchanges' messages too
                    self.local.progress()
                return (lh is None or lh.is_completed()) and (rh is None or rh.is_completed())

        def finish() -> list[torch.Tensor]:
            if self.local is not None and lh is not None:
                self.local._set_status(True, _keep_numbers(f"{what} for ranks {peers}"))
            try:
                self._spin(ready, peers, what)
                with self._guard():
                    got_local = iter(lh.wait() if lh is not None else [])
                    got_remote = iter(rh.wait() if rh is not None else [])
            finally:
                if self.local is not None and lh is not None:
                    self.local._set_status(False, what)
            return [next(got_local if p in self._index else got_remote) for p, _, _ in recvs]

        return Handle(finish, ready)

    def barrier(self, group: Group) -> None:
        """Every member sends one byte to every other and waits for theirs."""
        peers = [p for p in group.ranks if p != self.rank]
        if not peers:
            self._check()
            return
        token = torch.zeros(1, dtype=torch.uint8)
        one = torch.Size([1])
        self.exchange(
            group, [(p, token) for p in peers], [(p, one, torch.uint8) for p in peers], op="barrier"
        ).wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._inner():
            with contextlib.suppress(Exception):
                t.close()


def create(
    *, rank: int, world_size: int, timeout: float, **shm_options: object
) -> ShmGlooTransport:
    """Build the transport (collective over the default group, which must be gloo).

    Args:
        rank, world_size, timeout: as for every transport.
        shm_options: passed to the shm half (``slot_bytes``, ``slots``, ...).

    Raises:
        CommError: on every rank, when a machine's shm half could not be built.
    """
    import torch.distributed as dist

    from . import _shm_setup
    from ._setup import destroy_groups

    machines = job_machines(rank=rank, world=world_size, timeout=timeout)
    mine = next(m for m in machines if rank in m)
    local: ShmTransport | None = None
    problem = ""
    if max(len(m) for m in machines) > 1:
        pg, groups = dist.new_subgroups_by_enumeration([list(m) for m in machines])
        try:
            if len(mine) > 1:
                local = _shm_setup.create(
                    rank=mine.index(rank),
                    world_size=len(mine),
                    timeout=timeout,
                    pg=pg,
                    **shm_options,  # type: ignore[arg-type]
                )
        except CommError as exc:
            problem = f"rank {rank}: {exc}"
        finally:  # the machine groups serve the set-up only
            destroy_groups([g for g in groups if g is not None], pending=False)
    # every machine built its half, or every rank raises (a rank alone would wait for the
    # others in the gloo half's set-up until its timeout)
    problems = gather_strings(
        problem, rank=rank, world=world_size, timeout=timeout, what="shm+gloo set-up"
    )
    if any(problems):
        if local is not None:
            local.close()
        raise CommError(
            f"rank {rank}: shm+gloo set-up failed: {'; '.join(p for p in problems if p)}"
        )
    remote = TwoSidedTransport(rank=rank, world_size=world_size, timeout=timeout, backend="gloo")
    return ShmGlooTransport(
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        machines=machines,
        local=local,
        remote=remote,
    )
