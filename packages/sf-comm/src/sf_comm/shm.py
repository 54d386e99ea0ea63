"""``shm``: a one-sided transport for ranks on one host, over POSIX shared memory.

Every rank owns a *symmetric heap*: one shared-memory segment of the same layout on every
rank, mapped by every peer. A put is a memcpy into a peer's heap, a signal is a store of a
counter into the peer's control words, a wait spins (with back-off) on a counter of one's
own heap. Nothing is paired: the receiver never posts a receive.

Heap layout (int64 control words, then data)::

    ctrl[0:8]                 magic, pid, world, aborted, address of the heap, -, -, -
    ctrl[FLAGS + src]         pieces ``src`` has written into my inbox from ``src``
    ctrl[ACKS + dst]          pieces of mine ``dst`` has consumed (written by ``dst``)
    ctrl[BAR + src]           barriers ``src`` has entered with me
    ctrl[STATUS : +16]        what I am doing: waiting?, since (ns), text (Note [shm blame])
    ctrl[REASON : +128]       why I aborted, utf-8 (Note [shm blame])
    ctrl[HDR + 8*(src*K+k)]   header of slot k's piece: bytes, op code, mode, address,
                              call tag, op name (2 words), -
    data: inbox[src][k]       K slots of ``slot_bytes`` per source rank  # [world, K, slot_bytes]

Message protocol (Note [shm credits]): a message src->dst is cut into pieces of at most
``slot_bytes``. Piece q (counting from 1 over the pair's whole history) goes to slot
(q-1) % K of dst's inbox for src; src may write it only once ``ACKS[dst] >= q - K`` (dst
consumed the piece that used the slot before), then publishes it with ``FLAGS[src] = q``.
dst checks the header (size, operation and call tag: Note [Call tags] in
:mod:`sf_comm.transport`), copies the piece out and stores ``ACKS[dst] = q`` in src's heap.
Each counter has one writer, so plain 8-byte stores suffice; on x86-64 (TSO) the data stores
are visible before the flag store that follows them in program order.

Note [shm rendezvous]: a message of at least ``SF_SHM_CMA_MIN_KB`` (256 KiB) is not cut into
pieces nor copied into a slot: the sender publishes its address (``mode = RNDV``) and the
receiver copies it straight into its output with ``process_vm_readv`` (cross-memory attach:
a one-sided get, one copy instead of two). The sender keeps the buffer alive until the
receiver's ack. Used only if every rank could read every peer's memory at creation
(seccomp or ptrace policy may forbid it); otherwise all messages go eager. With rendezvous
on, no eager message is larger than the threshold, so slots are never made larger than it.

Note [shm sizing]: the heaps are reserved at creation (``posix_fallocate``), so running out
of shared memory is an error at ``init`` naming the size and the directory, never a SIGBUS
at the first large write (tmpfs files are sparse; Docker's /dev/shm is 64 MB by default).
Rank 0 sizes the slots to what the directory has free (halving them down to 64 KiB, which
only cuts large eager messages into more pieces) before anything is created.

Note [shm blame]: every rank keeps in its own heap what it is doing (the operation and call
it waits in, since when) and, once it gives up, why. A rank that times out names what each
awaited peer is doing (a peer busy outside communication is the one that hangs), and peers
of a rank that gave up repeat its reason, so every error names the rank that caused it.

Concurrency contract: one thread per rank uses the transport; pending exchanges progress in
issue order inside ``wait()`` (and opportunistically when issued), so pieces of different
messages on one pair never interleave.

Lifetime (Note [shm cleanup]): segments get random names (``sf-<token>-<rank>-<pid>``, mode
0600), are mapped by all ranks, and are unlinked as soon as every rank has mapped them: from
then on the kernel frees the memory when the last process exits, crash or not, and nothing
is left in the directory. Only the short set-up window (:func:`sf_comm._shm_setup.create`)
holds names; it is closed by the error path (which also removes the peers' segments), by
SIGTERM/SIGHUP handlers installed for the window (chaining to the previous handlers; the
window's waits poll so the handlers run), and, for a SIGKILL of every rank, by the next
``create`` in the same directory, which removes segments whose creator is dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._liveness import pid_alive
from ._setup import pack, unpack
from .transport import (
    CommError,
    CommTimeout,
    Group,
    Handle,
    Recv,
    Send,
    Transport,
    as_bytes,
    op_code,
    ranks_text,
)

_MAGIC = 0x5F53_4D48_4541_5002
_PID, _WORLD, _ABORTED, _BASE = 1, 2, 3, 4
_HDR_WORDS = 8  # per slot: bytes, op code, mode, source address, call tag, op name x2, -
_NAME_WORDS = 2
_STATUS_WORDS, _REASON_WORDS = 16, 128
_EAGER, _RNDV = 0, 1
_PAGE = 4096


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    def __init__(self, base: int, length: int) -> None:
        super().__init__(base, length)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _vm_read(pid: int, dst: int, src: int, nbytes: int) -> int:
    """``process_vm_readv``: copy ``nbytes`` at address ``src`` of process ``pid`` to address
    ``dst`` here; the bytes read, or -1 with the reason in ``ctypes.get_errno()``."""
    local, remote = _IoVec(dst, nbytes), _IoVec(src, nbytes)
    return int(_LIBC.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))


@dataclasses.dataclass(slots=True)
class _Job:
    peer: int
    data: torch.Tensor  # [nbytes] uint8, flat view of the tensor sent / received into
    pieces: int
    tag: int  # call tag (Note [Call tags]), fixed when the exchange is issued
    done: int = 0
    ack: int = 0  # rendezvous: the piece number whose ack frees ``data`` (0: eager)


@dataclasses.dataclass(slots=True)
class _Op:
    name: str
    what: str  # name and call scope, for messages
    code: int
    label: np.ndarray  # [_NAME_WORDS] int64, the name as sent in headers
    sends: list[_Job]
    recvs: list[_Job]
    outputs: list[torch.Tensor]
    finished: bool = False


class ShmTransport(Transport):
    """One-sided transport over POSIX shared memory; see the module docstring.

    Build with :func:`sf_comm._shm_setup.create` (collective over the job's gloo group).
    """

    name = "shm"
    one_sided = True

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        maps: list[mmap.mmap],
        slot_bytes: int,
        slots: int,
        cma_min: int = 0,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        self.slot_bytes, self.slots = slot_bytes, slots
        layout = self.layout(world_size, slots)
        self.FLAGS, self.ACKS, self.BAR = layout["FLAGS"], layout["ACKS"], layout["BAR"]
        self.STATUS, self.REASON, self.HDR = layout["STATUS"], layout["REASON"], layout["HDR"]
        self.data_off = layout["data"]
        self._maps = maps
        # ctrl[r]: [data_off // 8] int64 control words of rank r's heap
        self._ctrl = [np.ndarray((self.data_off // 8,), np.int64, buffer=m) for m in maps]
        # heap[r]: [heap_bytes] uint8 view of rank r's heap
        self._heap = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self._sent = [0] * world_size  # pieces sent to each peer
        self._recvd = [0] * world_size  # pieces consumed from each peer
        self._bars = [0] * world_size  # barriers entered with each peer
        self._pids = [int(c[_PID]) for c in self._ctrl]
        self._pending: list[_Op] = []
        self._cma_min = cma_min  # Note [shm rendezvous]; 0 disables it
        self._dead: int | None = None  # a peer seen dead, passed on to the others

    # -- heap layout --------------------------------------------------------------------

    @staticmethod
    def layout(world_size: int, slots: int) -> dict[str, int]:
        """Word offsets of the control areas and the byte offset ("data") of the inboxes."""
        w = world_size
        out = {"FLAGS": 8, "ACKS": 8 + w, "BAR": 8 + 2 * w, "STATUS": 8 + 3 * w}
        out["REASON"] = out["STATUS"] + _STATUS_WORDS
        out["HDR"] = out["REASON"] + _REASON_WORDS
        ctrl_words = out["HDR"] + _HDR_WORDS * w * slots
        out["data"] = -(-ctrl_words * 8 // _PAGE) * _PAGE
        return out

    @classmethod
    def heap_bytes(cls, world_size: int, slot_bytes: int, slots: int) -> int:
        return cls.layout(world_size, slots)["data"] + world_size * slots * slot_bytes

    # -- failure detection (Note [Failure contract], Note [shm blame]) ------------------

    def _notify_peers(self, reason: str) -> None:
        mine = self._ctrl[self.rank]
        mine[self.REASON : self.REASON + _REASON_WORDS] = pack(reason, _REASON_WORDS)
        # Peers waiting on us fail fast; 2 + rank passes on which rank died.
        mine[_ABORTED] = 1 if self._dead is None else 2 + self._dead

    def _fail(
        self,
        message: str,
        exc: type[CommError] = CommError,
        *,
        cause: str | None = None,
        dead: int | None = None,
    ) -> CommError:
        if dead is not None and self._dead is None:
            self._dead = dead
        return super()._fail(message, exc, cause=cause)

    def _set_status(self, waiting: bool, text: str) -> None:
        status = self._ctrl[self.rank][self.STATUS : self.STATUS + _STATUS_WORDS]
        status[0], status[1] = int(waiting), time.monotonic_ns()
        status[2:] = pack(text, _STATUS_WORDS - 2)

    def _describe(self, peer: int) -> str:
        """What ``peer`` is doing, from its heap (Note [shm blame])."""
        status = self._ctrl[peer][self.STATUS : self.STATUS + _STATUS_WORDS]
        since = (time.monotonic_ns() - int(status[1])) / 1e9
        text = unpack(status[2:])
        if not text:
            return f"rank {peer} has not communicated yet"
        if status[0]:
            return f"rank {peer} waits in {text} ({since:.1f}s)"
        return (
            f"rank {peer} is busy outside communication for {since:.1f}s (it hangs or is slow; "
            f"its last operation was {text})"
        )

    def _watch(self, peers: Sequence[int], what: str, start: float) -> None:
        """Raise if a peer died or gave up, or if the wait is past the timeout."""
        for p in peers:
            code = int(self._ctrl[p][_ABORTED])
            if code >= 2:
                dead = code - 2
                raise self._fail(
                    f"{what}: rank {dead} (pid {self._pids[dead]}) died (seen by rank {p})",
                    dead=dead,
                )
            if code:
                cause = unpack(self._ctrl[p][self.REASON : self.REASON + _REASON_WORDS])
                raise self._fail(f"{what}: rank {p} gave up ({cause})", cause=cause)
            if not pid_alive(self._pids[p]):
                raise self._fail(f"{what}: rank {p} (pid {self._pids[p]}) died", dead=p)
        if time.monotonic() - start > self.timeout:
            blame = "; ".join(self._describe(p) for p in peers)
            idle = [
                r
                for r in range(self.world_size)
                if r != self.rank and r not in peers and not self._ctrl[r][self.STATUS]
            ]
            if idle:  # Note [shm blame]: the awaited peers may wait on one of these
                blame += f"; busy outside communication (hung or slow): {ranks_text(idle)}"
            raise self._fail(
                f"{what} timed out after {self.timeout:.0f}s waiting for ranks {list(peers)}: "
                f"{blame}",
                CommTimeout,
            )

    def _spin(self, ready: Callable[[], bool], peers: Sequence[int], what: str) -> None:
        self._set_status(True, f"{what} for ranks {list(peers)}")
        try:
            super()._spin(ready, peers, what)
        finally:
            self._set_status(False, what)

    # -- message protocol (Note [shm credits]) ----------------------------------------

    def _slot(self, src: int, q: int) -> tuple[int, int]:
        k = (q - 1) % self.slots
        slot = src * self.slots + k
        return self.data_off + slot * self.slot_bytes, self.HDR + _HDR_WORDS * slot

    def _try_send(self, job: _Job, op: _Op) -> bool:
        me, dst = self.rank, job.peer
        while job.done < job.pieces:
            q = self._sent[dst] + 1
            if self._ctrl[me][self.ACKS + dst] < q - self.slots:
                return False
            off, hdr = self._slot(me, q)
            peer = self._ctrl[dst]
            if self._rendezvous(job.data.numel()):
                # Note [shm rendezvous]: publish where the bytes are; the receiver reads them.
                peer[hdr + 2], peer[hdr + 3] = _RNDV, job.data.data_ptr()
                job.ack = q
            else:
                a = job.done * self.slot_bytes
                b = min(a + self.slot_bytes, job.data.numel())
                if b > a:
                    self._heap[dst][off : off + b - a].copy_(job.data[a:b])
                peer[hdr + 2] = _EAGER
            peer[hdr], peer[hdr + 1], peer[hdr + 4] = job.data.numel(), op.code, job.tag
            peer[hdr + 5 : hdr + 5 + _NAME_WORDS] = op.label
            peer[self.FLAGS + me] = q
            self._sent[dst] = q
            job.done += 1
        # a rendezvous send is complete once the receiver has read (and acked) the bytes
        return not job.ack or self._ctrl[me][self.ACKS + dst] >= job.ack

    def _try_recv(self, job: _Job, op: _Op) -> bool:
        me, src = self.rank, job.peer
        mine = self._ctrl[me]
        while job.done < job.pieces:
            q = self._recvd[src] + 1
            if mine[self.FLAGS + src] < q:
                return False
            off, hdr = self._slot(src, q)
            got = (int(mine[hdr]), int(mine[hdr + 1]), int(mine[hdr + 4]))
            problem = self.header_mismatch(
                op.what,
                src,
                (job.data.numel(), op.code, job.tag),
                got,
                unpack(mine[hdr + 5 : hdr + 5 + _NAME_WORDS]),
            )
            if problem:
                raise self._fail(problem)
            if mine[hdr + 2] == _RNDV:
                self._read_peer(src, int(mine[hdr + 3]), job.data, op.what)
            else:
                a = job.done * self.slot_bytes
                b = min(a + self.slot_bytes, got[0])
                if b > a:
                    job.data[a:b].copy_(self._heap[me][off : off + b - a])
            self._ctrl[src][self.ACKS + me] = q
            self._recvd[src] = q
            job.done += 1
        return True

    def _read_peer(self, src: int, address: int, out: torch.Tensor, what: str) -> None:
        """Copy ``out.numel()`` bytes at ``address`` in rank ``src``'s memory into ``out``."""
        total, done = out.numel(), 0
        while done < total:
            got = _vm_read(self._pids[src], out.data_ptr() + done, address + done, total - done)
            if got <= 0:
                err = ctypes.get_errno()
                if not pid_alive(self._pids[src]):
                    raise self._fail(f"{what}: rank {src} (pid {self._pids[src]}) died", dead=src)
                raise self._fail(
                    f"{what}: reading {total} bytes from rank {src} failed: {os.strerror(err)}"
                )
            done += got

    def _progress(self) -> None:
        busy_dst: set[int] = set()
        busy_src: set[int] = set()
        for op in self._pending:
            finished = True
            for job in op.sends:
                pending = job.done < job.pieces or job.ack
                if pending and (job.peer in busy_dst or not self._try_send(job, op)):
                    busy_dst.add(job.peer)
                    finished = False
                elif job.ack:
                    job.ack = 0  # read by the receiver: the buffer may go
            for job in op.recvs:
                if job.done < job.pieces and (job.peer in busy_src or not self._try_recv(job, op)):
                    busy_src.add(job.peer)
                    finished = False
            op.finished = finished
        self._pending = [op for op in self._pending if not op.finished]

    def _rendezvous(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` goes by rendezvous (Note [shm rendezvous])."""
        return bool(self._cma_min) and nbytes >= self._cma_min

    def _pieces(self, nbytes: int) -> int:
        if self._rendezvous(nbytes):
            return 1  # one rendezvous, any size (sender and receiver apply the same rule)
        return max(1, -(-nbytes // self.slot_bytes))

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run protocol code; anything escaping it (an interrupt included) leaves the protocol
        mid-message, so the transport breaks (Note [Failure contract])."""
        try:
            fn()
        except CommError:
            raise
        except BaseException as exc:
            self.abort(f"rank {self.rank}: {type(exc).__name__} inside a shm exchange")
            raise

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self._check()
        self.check_peers(sends, recvs, op)
        for _, t in sends:
            if t.device.type != "cpu":
                raise ValueError(f"shm transport moves CPU tensors; got a tensor on {t.device}")
        self.record(op, sends)
        outputs = [torch.empty(shape, dtype=dtype) for _, shape, dtype in recvs]
        send_jobs = []
        for peer, t in sends:
            data = as_bytes(t)
            send_jobs.append(_Job(peer, data, self._pieces(data.numel()), self.send_tag(peer)))
        recv_jobs = []
        for (peer, _, _), out in zip(recvs, outputs):
            data = as_bytes(out)
            recv_jobs.append(_Job(peer, data, self._pieces(data.numel()), self.recv_tag(peer)))
        pending = _Op(
            op,
            self.activity(op),
            op_code(op),
            pack(op, _NAME_WORDS),
            send_jobs,
            recv_jobs,
            outputs,
        )
        self._pending.append(pending)
        self._set_status(False, pending.what)  # Note [shm blame]: the last operation issued
        self._guarded(self._progress)
        peers = sorted({j.peer for j in (*send_jobs, *recv_jobs)})

        def finish() -> list[torch.Tensor]:
            if not pending.finished:
                self._guarded(lambda: self._spin(lambda: self._step(pending), peers, pending.what))
            return outputs

        return Handle(finish, lambda: pending.finished)

    def progress(self) -> None:
        """Move every pending exchange as far as it goes without waiting (for a caller that
        waits on this transport and another at once, :mod:`sf_comm.shm_gloo`)."""
        self._check()
        self._guarded(self._progress)

    def _step(self, op: _Op) -> bool:
        self._check()
        self._progress()
        return op.finished

    def barrier(self, group: Group) -> None:
        self._check()
        me, peers = self.rank, [p for p in group.ranks if p != self.rank]
        for p in peers:
            self._bars[p] += 1
            self._ctrl[p][self.BAR + me] = self._bars[p]
        mine = self._ctrl[me]

        def arrived() -> bool:
            self._progress()  # keep pending exchanges moving while we wait
            return all(mine[self.BAR + p] >= self._bars[p] for p in peers)

        self._guarded(lambda: self._spin(arrived, peers, self.activity("barrier")))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._heap.clear()
        self._ctrl.clear()
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
