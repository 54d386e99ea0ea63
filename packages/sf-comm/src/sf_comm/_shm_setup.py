"""Set-up of the ``shm`` transport: size, probe, create and map every rank's heap.

:func:`create` is the only entry point; everything here runs once, collectively, while a
context is built (Note [shm sizing], Note [shm cleanup] and the probe of Note [shm
rendezvous], all in :mod:`sf_comm.shm`). The transport it returns never calls back here.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._liveness import pid_alive
from ._setup import gather_strings, settle
from .shm import _BASE, _LIBC, _MAGIC, _PAGE, _PID, _WORLD, ShmTransport, _vm_read
from .transport import CommError

log = logging.getLogger(__name__)

_MIN_SLOT = 64 * 1024  # smallest slot Note [shm sizing] shrinks to
_NAME_RE = re.compile(r"sf-[0-9a-f]{16}-\d+-(\d+)$")


@contextlib.contextmanager
def _signals_run(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` on SIGTERM/SIGHUP inside the block, then chain to the previous handler
    (or die of the signal, as the default action would). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, object] = {}

    def handler(signum: int, frame: object) -> None:
        signum = signal.Signals(signum)
        cleanup()
        prev = previous[signum]
        signal.signal(signum, prev)  # type: ignore[arg-type]
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]


def _sweep_stale(shm_dir: str, older_than: float) -> None:
    """Remove segments of ours whose creator died (a job SIGKILLed inside its set-up window)
    and that are older than ``older_than`` seconds (Note [shm cleanup])."""
    try:
        entries = list(os.scandir(shm_dir))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _NAME_RE.match(entry.name)
        if not match or pid_alive(int(match[1])):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat()
            if st.st_uid == os.getuid() and now - st.st_mtime > older_than:
                os.unlink(entry.path)
                log.warning("shm: removed stale segment %s (its creator died)", entry.path)


def create(
    *,
    rank: int,
    world_size: int,
    timeout: float,
    pg: dist.ProcessGroup | None = None,
    slot_bytes: int | None = None,
    slots: int = 2,
    shm_dir: str | None = None,
    cma_min: int | None = None,
) -> ShmTransport:
    """Create and map every rank's heap; collective over ``pg`` (default: world).

    Args:
        rank, world_size: this rank in the job.
        timeout: seconds any wait may take before it raises.
        pg: a CPU (gloo) process group of the ranks that share the heaps (default: all),
            used only for set-up; ``rank`` and ``world_size`` are then within it.
        slot_bytes: bytes per inbox slot (default ``SF_SHM_SLOT_MB`` or 8 MiB); capped
            by the rendezvous threshold and by the free space (Note [shm sizing]).
        slots: inbox slots per peer (2 = double buffering).
        shm_dir: where segments live (default ``SF_SHM_DIR`` or /dev/shm).
        cma_min: smallest message (bytes) read by rendezvous, Note [shm rendezvous]
            (default ``SF_SHM_CMA_MIN_KB`` or 256 KiB; 0 disables it).

    Raises:
        ValueError: bad sizes.
        CommError: the directory lacks the space for the heaps (the message says how much
            is needed and where), or a peer failed during set-up.
    """
    if slot_bytes is None:
        slot_bytes = int(float(os.environ.get("SF_SHM_SLOT_MB", 8)) * 2**20)
    if cma_min is None:
        cma_min = int(float(os.environ.get("SF_SHM_CMA_MIN_KB", 256)) * 1024)
    if slot_bytes < 64 or slots < 1 or cma_min < 0:
        raise ValueError(
            f"shm needs slot_bytes >= 64, slots >= 1 and cma_min >= 0; got {slot_bytes}, "
            f"{slots}, {cma_min}"
        )
    shm_dir = shm_dir or os.environ.get("SF_SHM_DIR", "/dev/shm")
    _sweep_stale(shm_dir, older_than=timeout)
    cma_min, pids = _probe(rank, world_size, pg, cma_min, timeout)
    if cma_min:  # Note [shm rendezvous]: no eager message exceeds the threshold
        slot_bytes = min(slot_bytes, -(-cma_min // _PAGE) * _PAGE)
    token, slot_bytes = _size(rank, world_size, pg, shm_dir, slot_bytes, slots, timeout)
    size = ShmTransport.heap_bytes(world_size, slot_bytes, slots)
    names = [os.path.join(shm_dir, f"sf-{token:016x}-{r}-{pids[r]}") for r in range(world_size)]

    def unlink(which: Sequence[str]) -> None:
        for name in which:
            with contextlib.suppress(OSError):
                os.unlink(name)

    maps: list[mmap.mmap | None] = [None] * world_size
    with _signals_run(lambda: unlink([names[rank]])):
        try:
            problem = ""
            try:
                maps[rank] = _create_own(names[rank], size, rank, world_size, shm_dir)
            except CommError as exc:
                problem = str(exc)
            _agree(rank, world_size, pg, timeout, "creating the heaps", problem)
            problem = ""
            try:
                for r, name in enumerate(names):
                    if r != rank:
                        maps[r] = _map_peer(name, size, rank, r, world_size)
            except (OSError, CommError) as exc:
                problem = f"rank {rank}: mapping a peer's heap failed: {exc}"
            _agree(rank, world_size, pg, timeout, "mapping the peers' heaps", problem)
        except BaseException:
            unlink(names)  # a failed init must not leave any rank's segment behind
            for m in maps:
                if m is not None:
                    m.close()
            raise
        finally:
            unlink([names[rank]])
    return ShmTransport(
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        maps=maps,  # type: ignore[arg-type]
        slot_bytes=slot_bytes,
        slots=slots,
        cma_min=cma_min,
    )


def _probe(
    rank: int, world: int, pg: dist.ProcessGroup | None, threshold: int, timeout: float
) -> tuple[int, list[int]]:
    """(rendezvous threshold, or 0 unless every rank can read every peer's memory; pids).

    Each rank publishes a small probe (magic, pid) and reads its peers' probes through
    ``process_vm_readv`` (cross-memory attach); seccomp profiles or ptrace policies that
    forbid it make every rank fall back to the eager path (all ranks must agree).
    """
    probe = torch.tensor([_MAGIC, os.getpid()], dtype=torch.int64)
    table = torch.zeros(world, 2, dtype=torch.int64)  # [world, (pid, probe address)]
    table[rank] = torch.tensor([os.getpid(), probe.data_ptr()])
    settle(dist.all_reduce(table, group=pg, async_op=True), "probe", rank, timeout)  # type: ignore[union-attr]
    pids = table[:, 0].tolist()
    ok = threshold > 0 and hasattr(_LIBC, "process_vm_readv")
    seen = torch.zeros(2, dtype=torch.int64)
    for r in range(world):
        if not ok or r == rank:
            continue
        got = _vm_read(pids[r], seen.data_ptr(), int(table[r, 1]), 16)
        ok = got == 16 and seen.tolist() == [_MAGIC, pids[r]]
    verdict = torch.tensor([1 if ok else 0])
    settle(
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=pg, async_op=True),  # type: ignore[union-attr]
        "probe verdict",
        rank,
        timeout,
    )
    return (threshold if int(verdict) else 0), pids


def _size(
    rank: int,
    world: int,
    pg: dist.ProcessGroup | None,
    shm_dir: str,
    slot_bytes: int,
    slots: int,
    timeout: float,
) -> tuple[int, int]:
    """Rank 0's (name token, slot bytes) for every rank (Note [shm sizing]).

    Raises:
        CommError: on every rank, when even the smallest slots do not fit.
    """
    decision = torch.zeros(3, dtype=torch.int64)  # token, slot bytes, 1 if nothing fits
    if rank == 0:
        decision[0] = secrets.randbits(63)
        want = slot_bytes
        with contextlib.suppress(OSError):  # a missing directory fails at creation
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
            while world * ShmTransport.heap_bytes(world, slot_bytes, slots) > free * 0.9:
                if slot_bytes <= _MIN_SLOT:
                    decision[2] = 1
                    break
                slot_bytes = max(_MIN_SLOT, slot_bytes // 2 // _PAGE * _PAGE)
            if slot_bytes < want and not decision[2]:
                log.warning(
                    "shm: %s has %.1f MiB free; inbox slots reduced from %.2f to %.2f MiB "
                    "(large eager messages go in more pieces; SF_SHM_DIR picks another "
                    "directory)",
                    shm_dir,
                    free / 2**20,
                    want / 2**20,
                    slot_bytes / 2**20,
                )
        decision[1] = slot_bytes
    # group_src: ``pg`` may be one machine's ranks (sf_comm.shm_gloo), without global rank 0
    work = dist.broadcast(decision, group_src=0, group=pg, async_op=True)
    settle(work, "sizes", rank, timeout)
    token, slot_bytes, nothing_fits = (int(x) for x in decision)
    if nothing_fits:
        need = world * ShmTransport.heap_bytes(world, slot_bytes, slots)
        raise CommError(f"rank {rank}: {_space_message(shm_dir, need, world)}")
    return token, slot_bytes


def _space_message(shm_dir: str, need: int, world: int) -> str:
    try:
        st = os.statvfs(shm_dir)
        free = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
    except OSError as exc:
        free = f"unusable: {exc.strerror}"
    return (
        f"shm transport needs {need / 2**20:.1f} MiB of shared memory for {world} ranks in "
        f"{shm_dir} ({free}); point SF_SHM_DIR at a larger tmpfs (Docker: --shm-size), "
        "or use transport='gloo'"
    )


def _create_own(name: str, size: int, rank: int, world: int, shm_dir: str) -> mmap.mmap:
    """Create, reserve (Note [shm sizing]) and map this rank's segment."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CommError(
            f"rank {rank}: cannot create a shared-memory segment in {shm_dir}: "
            f"{exc.strerror} (SF_SHM_DIR picks the directory)"
        ) from None
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.unlink(name)
            raise CommError(
                f"rank {rank}: could not reserve {size / 2**20:.1f} MiB ({exc.strerror}): "
                + _space_message(shm_dir, world * size, world)
            ) from None
        heap = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    ctrl = np.ndarray((8,), np.int64, buffer=heap)
    ctrl[_PID], ctrl[_WORLD], ctrl[0] = os.getpid(), world, _MAGIC
    ctrl[_BASE] = ctypes.addressof(ctypes.c_char.from_buffer(heap))
    return heap


def _map_peer(name: str, size: int, rank: int, peer: int, world: int) -> mmap.mmap:
    fd = os.open(name, os.O_RDWR)
    try:
        heap = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    ctrl = np.ndarray((8,), np.int64, buffer=heap)
    if ctrl[0] != _MAGIC or ctrl[_WORLD] != world:
        heap.close()
        raise CommError(f"rank {rank}: shm heap of rank {peer} ({name}) is not ours")
    return heap


def _agree(
    rank: int, world: int, pg: dist.ProcessGroup | None, timeout: float, what: str, problem: str
) -> None:
    """Every rank got here without a problem, or every rank raises naming each problem."""
    problems = gather_strings(
        problem, rank=rank, world=world, timeout=timeout, what=f"shm set-up ({what})", pg=pg
    )
    if any(problems):
        listed = "; ".join(p for p in problems if p)
        raise CommError(f"rank {rank}: shm set-up failed while {what}: {listed}")
