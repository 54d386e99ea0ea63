"""``shm``: a one-sided transport for ranks on one host, over POSIX shared memory.

Every rank owns a *symmetric heap*: one shared-memory segment of the same layout on every
rank, mapped by every peer. A put is a memcpy into a peer's heap, a signal is a store of a
counter into the peer's control words, a wait spins (with back-off) on a counter of one's
own heap. Nothing is paired: the receiver never posts a receive.

Heap layout (int64 control words, then data)::

    ctrl[0:8]                 magic, pid, world, aborted, -, -, -, -
    ctrl[FLAGS + src]         pieces ``src`` has written into my inbox from ``src``
    ctrl[ACKS + dst]          pieces of mine ``dst`` has consumed (written by ``dst``)
    ctrl[BAR + src]           barriers ``src`` has entered with me
    ctrl[SIG + i]             user signals (``signal``/``wait_signal``)
    ctrl[HDR + 4*(src*K+k)]   (message bytes, op code, mode, address) of slot k's piece
    data: inbox[src][k]       K slots of ``slot_bytes`` per source rank  # [world, K, slot_bytes]
    data: user region         symmetric allocations (``alloc``/``put``/``get``)

Message protocol (Note [shm credits]): a message src->dst is cut into pieces of at most
``slot_bytes``. Piece q (counting from 1 over the pair's whole history) goes to slot
(q-1) % K of dst's inbox for src; src may write it only once ``ACKS[dst] >= q - K`` (dst
consumed the piece that used the slot before), then publishes it with ``FLAGS[src] = q``.
dst copies it out and stores ``ACKS[dst] = q`` in src's heap. Each counter has one writer,
so plain 8-byte stores suffice; on x86-64 (TSO) the data stores are visible before the flag
store that follows them in program order.

Note [shm rendezvous]: a message of at least ``SF_SHM_CMA_MIN_KB`` (256 KiB) is not cut into
pieces nor copied into a slot: the sender publishes its address (``mode = RNDV``) and the
receiver copies it straight into its output with ``process_vm_readv`` (cross-memory attach:
a one-sided get, one copy instead of two). The sender keeps the buffer alive until the
receiver's ack. Used only if every rank could read every peer's memory at creation
(seccomp or ptrace policy may forbid it); otherwise all messages go eager.

Concurrency contract: one thread per rank uses the transport; pending exchanges progress in
issue order inside ``wait()`` (and opportunistically when issued), so pieces of different
messages on one pair never interleave.

Lifetime (Note [shm cleanup]): segments get random names (``sf-<token>-<rank>``, mode 0600),
are mapped by all ranks, and are unlinked as soon as every rank has mapped them: from then
on the kernel frees the memory when the last process exits, crash or not, and nothing is
left in /dev/shm. Only the short window inside ``ShmTransport.create`` can leak, and an
``atexit`` hook plus the error path close it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import mmap
import os
import secrets
import time
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._liveness import pid_alive
from .transport import CommError, CommTimeout, Group, Handle, Recv, Send, Transport

_MAGIC = 0x5F53_4D48_4541_5001
_PID, _WORLD, _ABORTED, _BASE = 1, 2, 3, 4
_HDR_WORDS = 4  # per slot: message bytes, op code, mode, source address
_EAGER, _RNDV = 0, 1
_USER_SIGNALS = 64
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


def _agree_on_cma(
    maps: list[mmap.mmap], rank: int, pg: dist.ProcessGroup | None, threshold: int | None
) -> int:
    """Rendezvous threshold in bytes if every rank can read every peer's memory, else 0.

    Each rank reads its peers' heap headers through ``process_vm_readv`` (cross-memory
    attach) and checks them against the shared mapping; seccomp profiles or ptrace policies
    that forbid it make every rank fall back to the eager path (all ranks must agree).
    """
    if threshold is None:
        threshold = int(float(os.environ.get("SF_SHM_CMA_MIN_KB", 256)) * 1024)
    ok = threshold > 0 and hasattr(_LIBC, "process_vm_readv")
    if ok:
        probe = torch.zeros(8, dtype=torch.int64)
        for r, m in enumerate(maps):
            if r == rank:
                continue
            header = np.ndarray((8,), np.int64, buffer=m)
            got = _vm_read(int(header[_PID]), probe.data_ptr(), int(header[_BASE]), 64)
            if got != 64 or int(probe[0]) != _MAGIC or int(probe[_PID]) != int(header[_PID]):
                ok = False
                break
    verdict = torch.tensor([1 if ok else 0])
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=pg)
    return threshold if int(verdict) else 0


def _op_code(op: str) -> int:
    return zlib.crc32(op.encode()) & 0x7FFF_FFFF


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclasses.dataclass(slots=True)
class _Job:
    peer: int
    data: torch.Tensor  # [nbytes] uint8, flat view of the tensor sent / received into
    pieces: int
    done: int = 0
    ack: int = 0  # rendezvous: the piece number whose ack frees ``data`` (0: eager)


@dataclasses.dataclass(slots=True)
class _Op:
    name: str
    code: int
    sends: list[_Job]
    recvs: list[_Job]
    outputs: list[torch.Tensor]
    finished: bool = False


class _Backoff:
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


class ShmTransport(Transport):
    """One-sided transport over POSIX shared memory; see the module docstring.

    Build with :meth:`create` (collective over the job's gloo group).
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
        user_bytes: int,
        cma_min: int = 0,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        w, k = world_size, slots
        self.slot_bytes, self.slots, self.user_bytes = slot_bytes, slots, user_bytes
        self.FLAGS, self.ACKS, self.BAR = 8, 8 + w, 8 + 2 * w
        self.SIG = 8 + 3 * w
        self.HDR = self.SIG + _USER_SIGNALS
        ctrl_words = self.HDR + _HDR_WORDS * w * k
        self.data_off = -(-ctrl_words * 8 // _PAGE) * _PAGE
        self.user_off = self.data_off + w * k * slot_bytes
        self._maps = maps
        # ctrl[r]: [ctrl_words] int64 control words of rank r's heap
        self._ctrl = [np.ndarray((ctrl_words,), np.int64, buffer=m) for m in maps]
        # heap[r]: [heap_bytes] uint8 view of rank r's heap
        self._heap = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self._sent = [0] * w  # pieces sent to each peer
        self._recvd = [0] * w  # pieces consumed from each peer
        self._bars = [0] * w  # barriers entered with each peer
        self._pids = [int(c[_PID]) for c in self._ctrl]
        self._pending: list[_Op] = []
        self._alloc_top = 0
        self._cma_min = cma_min  # Note [shm rendezvous]; 0 disables it
        self._broken: str | None = None
        self._closed = False

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def heap_bytes(world_size: int, slot_bytes: int, slots: int, user_bytes: int) -> int:
        ctrl_words = 8 + 3 * world_size + _USER_SIGNALS + _HDR_WORDS * world_size * slots
        data_off = -(-ctrl_words * 8 // _PAGE) * _PAGE
        return data_off + world_size * slots * slot_bytes + user_bytes

    @classmethod
    def create(
        cls,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        pg: dist.ProcessGroup | None = None,
        slot_bytes: int | None = None,
        slots: int = 2,
        user_bytes: int | None = None,
        shm_dir: str | None = None,
        cma_min: int | None = None,
    ) -> ShmTransport:
        """Create and map every rank's heap; collective over ``pg`` (default: world).

        Args:
            rank, world_size: this rank in the job.
            timeout: seconds any wait may take before it raises.
            pg: a CPU (gloo) process group of all ranks, used only to agree on names.
            slot_bytes: bytes per inbox slot (default ``SF_SHM_SLOT_MB`` or 8 MiB).
            slots: inbox slots per peer (2 = double buffering).
            user_bytes: size of the symmetric user region (default ``SF_SHM_USER_MB`` or
                64 MiB; pages are only backed once written).
            shm_dir: where segments live (default ``SF_SHM_DIR`` or /dev/shm).
            cma_min: smallest message (bytes) read by rendezvous, Note [shm rendezvous]
                (default ``SF_SHM_CMA_MIN_KB`` or 256 KiB; 0 disables it).
        """
        slot_bytes = slot_bytes or int(float(os.environ.get("SF_SHM_SLOT_MB", 8)) * 2**20)
        if user_bytes is None:
            user_bytes = int(float(os.environ.get("SF_SHM_USER_MB", 64)) * 2**20)
        if slot_bytes < 64 or slots < 1:
            raise ValueError(
                f"shm slot_bytes must be >= 64 and slots >= 1, got {slot_bytes}, {slots}"
            )
        shm_dir = shm_dir or os.environ.get("SF_SHM_DIR", "/dev/shm")
        size = cls.heap_bytes(world_size, slot_bytes, slots, user_bytes)
        token = [secrets.token_hex(8) if rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=pg)
        names = [os.path.join(shm_dir, f"sf-{token[0]}-{r}") for r in range(world_size)]
        own = names[rank]

        def unlink_own() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(own)

        atexit.register(unlink_own)
        maps: list[mmap.mmap | None] = [None] * world_size
        try:
            fd = os.open(own, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                maps[rank] = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            ctrl = np.ndarray((8,), np.int64, buffer=maps[rank])
            ctrl[_PID], ctrl[_WORLD], ctrl[0] = os.getpid(), world_size, _MAGIC
            ctrl[_BASE] = ctypes.addressof(ctypes.c_char.from_buffer(maps[rank]))  # type: ignore[arg-type]
            dist.barrier(group=pg)
            for r, name in enumerate(names):
                if r == rank:
                    continue
                fd = os.open(name, os.O_RDWR)
                try:
                    maps[r] = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
                peer = np.ndarray((8,), np.int64, buffer=maps[r])
                if peer[0] != _MAGIC or peer[_WORLD] != world_size:
                    raise CommError(f"rank {rank}: shm heap of rank {r} ({name}) is not ours")
            dist.barrier(group=pg)
            cma_min = _agree_on_cma(maps, rank, pg, cma_min)  # type: ignore[arg-type]
        except BaseException:
            for name in names:  # a failed init must not leave any rank's segment behind
                with contextlib.suppress(OSError):
                    os.unlink(name)
            raise
        finally:
            unlink_own()
            atexit.unregister(unlink_own)
        return cls(
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            maps=maps,  # type: ignore[arg-type]
            slot_bytes=slot_bytes,
            slots=slots,
            user_bytes=user_bytes,
            cma_min=cma_min,
        )

    # -- failure detection ------------------------------------------------------------

    def _check(self) -> None:
        if self._broken:
            raise CommError(f"rank {self.rank}: shm transport unusable: {self._broken}")
        if self._closed:
            raise CommError(f"rank {self.rank}: shm transport is closed")

    def _fail(
        self, message: str, exc: type[CommError] = CommError, dead: int | None = None
    ) -> CommError:
        self._broken = message
        # Peers waiting on us fail fast; 2 + rank passes on which rank died.
        self._ctrl[self.rank][_ABORTED] = 1 if dead is None else 2 + dead
        return exc(f"rank {self.rank}: {message}")

    def _watch(self, peers: Sequence[int], what: str, start: float) -> None:
        """Raise if a peer died or aborted, or if the wait is past the timeout."""
        for p in peers:
            code = int(self._ctrl[p][_ABORTED])
            if code >= 2:
                dead = code - 2
                raise self._fail(
                    f"rank {dead} (pid {self._pids[dead]}) died during {what} (seen by rank {p})",
                    dead=dead,
                )
            if code:
                raise self._fail(f"rank {p} aborted (it raised an error) during {what}")
            if not pid_alive(self._pids[p]):
                raise self._fail(f"rank {p} (pid {self._pids[p]}) died during {what}", dead=p)
        if time.monotonic() - start > self.timeout:
            raise self._fail(
                f"{what} timed out after {self.timeout:.0f}s waiting for ranks {list(peers)}",
                CommTimeout,
            )

    def _spin(self, ready, peers: Sequence[int], what: str) -> None:  # type: ignore[no-untyped-def]
        start = last = time.monotonic()
        backoff = _Backoff()
        while not ready():
            backoff()
            now = time.monotonic()
            if now - last > 0.05:
                last = now
                self._watch(peers, what, start)

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
            peer[hdr], peer[hdr + 1] = job.data.numel(), op.code
            peer[self.FLAGS + me] = q
            self._sent[dst] = q
            job.done += 1
        # a rendezvous send is complete once the receiver has read (and acked) the bytes
        return not job.ack or self._ctrl[me][self.ACKS + dst] >= job.ack

    def _try_recv(self, job: _Job, op: _Op) -> bool:
        me, src = self.rank, job.peer
        while job.done < job.pieces:
            q = self._recvd[src] + 1
            if self._ctrl[me][self.FLAGS + src] < q:
                return False
            off, hdr = self._slot(src, q)
            nbytes, code = int(self._ctrl[me][hdr]), int(self._ctrl[me][hdr + 1])
            if code != op.code or nbytes != job.data.numel():
                raise self._fail(
                    f"{op.name}: expected {job.data.numel()} bytes from rank {src}, but rank "
                    f"{src} sent {nbytes} bytes"
                    + ("" if code == op.code else " in a different operation")
                    + " (shapes, dtypes or the order of collectives differ across ranks)"
                )
            if self._ctrl[me][hdr + 2] == _RNDV:
                self._read_peer(src, int(self._ctrl[me][hdr + 3]), job.data, op.name)
            else:
                a = job.done * self.slot_bytes
                b = min(a + self.slot_bytes, nbytes)
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
                    raise self._fail(
                        f"rank {src} (pid {self._pids[src]}) died during {what}", dead=src
                    )
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

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self._check()
        self.record(op, sends)
        outputs = [torch.empty(shape, dtype=dtype) for _, shape, dtype in recvs]
        send_jobs = []
        for peer, t in sends:
            if t.device.type != "cpu":
                raise ValueError(f"shm transport moves CPU tensors; got a tensor on {t.device}")
            data = _as_bytes(t)
            send_jobs.append(_Job(peer, data, self._pieces(data.numel())))
        recv_jobs = [
            _Job(peer, _as_bytes(out), self._pieces(out.numel() * out.element_size()))
            for (peer, _, _), out in zip(recvs, outputs)
        ]
        for job in (*send_jobs, *recv_jobs):
            if job.peer == self.rank or not 0 <= job.peer < self.world_size:
                raise ValueError(f"{op}: invalid peer rank {job.peer} for rank {self.rank}")
        pending = _Op(op, _op_code(op), send_jobs, recv_jobs, outputs)
        self._pending.append(pending)
        try:
            self._progress()
        except BaseException:
            self._broken = self._broken or "an exchange raised"
            raise
        peers = sorted({j.peer for j in (*send_jobs, *recv_jobs)})

        def finish() -> list[torch.Tensor]:
            if not pending.finished:
                self._spin(lambda: self._step(pending), peers, op)
            return outputs

        return Handle(finish, lambda: pending.finished)

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

        self._spin(arrived, peers, "barrier")

    # -- raw one-sided primitives on the symmetric user region -------------------------

    def alloc(self, nbytes: int, align: int = 64) -> int:
        """Reserve ``nbytes`` of the user region; same offset on every rank.

        Every rank must make the same ``alloc`` calls in the same order (symmetric heap).
        """
        top = -(-self._alloc_top // align) * align
        if top + nbytes > self.user_bytes:
            raise ValueError(
                f"shm user region exhausted: {nbytes} bytes requested, "
                f"{self.user_bytes - top} free (raise SF_SHM_USER_MB)"
            )
        self._alloc_top = top + nbytes
        return top

    def local(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """This rank's symmetric buffer at ``offset`` as a tensor (a view, no copy)."""
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        base = self.user_off + offset
        return self._heap[self.rank][base : base + nbytes].view(dtype).view(*shape)

    def put(self, peer: int, offset: int, src: torch.Tensor) -> None:
        """Copy ``src`` into ``peer``'s user region at ``offset``."""
        self._check()
        data = _as_bytes(src)
        base = self.user_off + offset
        self._heap[peer][base : base + data.numel()].copy_(data)

    def get(self, peer: int, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Copy ``peer``'s user region at ``offset`` into ``out`` and return it."""
        self._check()
        data = out.view(-1).view(torch.uint8)
        base = self.user_off + offset
        data.copy_(self._heap[peer][base : base + data.numel()])
        return out

    def signal(self, peer: int, index: int, value: int) -> None:
        """Set user signal ``index`` in ``peer``'s heap to ``value`` (after prior puts)."""
        self._ctrl[peer][self.SIG + index] = value

    def wait_signal(self, index: int, value: int, peers: Sequence[int] = ()) -> None:
        """Wait until this rank's user signal ``index`` is >= ``value``."""
        self._check()
        mine = self._ctrl[self.rank]
        watch = list(peers) or [p for p in range(self.world_size) if p != self.rank]
        self._spin(lambda: mine[self.SIG + index] >= value, watch, f"wait_signal[{index}]")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._heap.clear()
        self._ctrl.clear()
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
