"""``torch-symm`` and ``nvshmem``: one-sided transports for CUDA tensors.

Both run the protocol of the ``shm`` transport (Note [shm credits]) on GPU memory. Every rank
owns a *symmetric heap*, one CUDA buffer of the same layout on every rank::

    hdr[src][k]     16 B  (message bytes, op code) of the first piece in slot k  # [world, K, 2] int64
    inbox[src][k]   slot_bytes, page-aligned after the headers                  # [world, K, slot]

A message src->dst is cut into pieces of at most ``slot_bytes``; piece q (counted from 1
over the pair's history) goes to slot (q-1) % K of dst's inbox for src. src writes it only
after dst acknowledged piece q-K (the credit), then signals dst; dst waits for the signal,
copies the piece into a fresh output tensor and acknowledges it. The backends differ only
in how bytes and signals move:

- ``torch-symm`` (torch.distributed._symmetric_memory, CUDA backend): a put is a
  ``copy_`` into the peer's heap as mapped into this process (``get_remote_tensor`` /
  ``get_buffer``); signals are the handle's ``put_signal``/``wait_signal`` kernels on the
  allocation's signal pad, one 0/1 flag per (peer, channel). Channel 0 is the barrier,
  1+k the data signal of slot k, 1+K+k its acknowledgement; a flag is re-armed only after
  its waiter consumed it, which the credit order guarantees.
- ``nvshmem`` (nvshmem4py): ``put_signal``/``signal_op``/``signal_wait`` on streams with
  64-bit counters (pieces written, pieces consumed, barriers) in a second symmetric tensor.

Note [gpu streams]: every op is stream-ordered; nothing spins on the host except the
watchdog. Each (peer, direction) has its own CUDA stream. One stream per rank would
deadlock: with messages larger than K pieces, rank A's stream can block on credits from B
while B's blocks on credits from C and C's on A. Per-pair streams only depend on the same
pair's other stream. Pieces of one pair stay in issue order because they share a stream::

    send stream A->B:  put 1 | put 2 | wait ack 1, put 3 | wait ack 2, put 4 ...
    recv stream B<-A:        wait 1, copy 1, ack 1 | wait 2, copy 2, ack 2 | ...

Concurrency and buffer-reuse contract (relied on by every caller):

- One thread per rank issues operations, in the same order on every rank (the ordering
  contract of :mod:`sf_comm.transport`).
- ``exchange`` captures the *current* stream: the sends read their tensors after the work
  already queued there. A sent tensor must not be modified until the handle was waited on
  (as with NCCL's async ops); freeing it early is safe (``record_stream``).
- ``wait()`` makes the *current* stream wait for the receives, then (``host_wait=True``,
  the default) blocks the host until they completed or ``timeout`` passed, and checks the
  message headers. Results never alias the heap. With ``host_wait=False`` nothing blocks
  the host; only torch-symm's device-side timeouts (a trap) then guard against hangs.
- Errors (timeout, dead peer on this host, headers that disagree, a device-side failure)
  name the rank, the transport, the operation and the peers, and leave the transport
  unusable. Its kernels may still spin on the device, so ``close()`` then leaks the heap
  instead of freeing it (a free could block on those kernels or on a collective).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._liveness import dead_ranks, rank_processes
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
)

_HDR = 16  # bytes of one slot header: (message bytes, op code) as int64
_PAGE = 4096
_LEAKED: list[Any] = []  # heaps of broken transports, kept alive on purpose (see close)


class TransportUnavailable(CommError):
    """A GPU transport cannot be built here (no CUDA, library missing or too old, init failed).

    ``transport="auto"`` should fall back to the next candidate on this error.
    """


def _default_slot_bytes() -> int:
    return int(float(os.environ.get("SF_GPU_SLOT_MB", 8)) * 2**20)


@dataclasses.dataclass(kw_only=True, slots=True)
class GpuOptions:
    """Options of both GPU transports (``sf_comm.init(transport=..., **options)``)."""

    slot_bytes: int = dataclasses.field(default_factory=_default_slot_bytes)  # per inbox slot
    slots: int = 2  # inbox slots per peer (2 = double buffering)
    host_wait: bool = True  # wait() blocks the host until done (see the module docstring)
    check: bool = True  # send and verify a (bytes, op code) header per message

    def __post_init__(self) -> None:
        if self.slot_bytes < 64:
            raise ValueError(f"GpuOptions.slot_bytes={self.slot_bytes}: must be >= 64")
        if self.slots < 1:
            raise ValueError(f"GpuOptions.slots={self.slots}: must be >= 1")


class _StreamedTransport(Transport):
    """The protocol of the module docstring; backends supply puts, signals and waits."""

    one_sided = True

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        device: torch.device,
        opts: GpuOptions,
        procs: list[tuple[str, int]],
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        self.device = device
        self.slot_bytes, self.slots = opts.slot_bytes, opts.slots
        self.host_wait, self.check = opts.host_wait, opts.check
        self._data_off, self._stride = self.layout(world_size, opts.slot_bytes, opts.slots)
        self._procs = procs
        self._sent = [0] * world_size  # pieces sent to each peer
        self._recvd = [0] * world_size  # pieces consumed from each peer
        self._streams: dict[tuple[str, int], torch.cuda.Stream] = {}

    @staticmethod
    def layout(world_size: int, slot_bytes: int, slots: int) -> tuple[int, int]:
        """(offset of the inboxes, bytes between slots) in the heap."""
        data_off = -(-world_size * slots * _HDR // _PAGE) * _PAGE
        return data_off, -(-slot_bytes // 256) * 256

    @classmethod
    def heap_bytes(cls, world_size: int, slot_bytes: int, slots: int) -> int:
        data_off, stride = cls.layout(world_size, slot_bytes, slots)
        return data_off + world_size * slots * stride

    def _hdr_off(self, src: int, k: int) -> int:
        return (src * self.slots + k) * _HDR

    def _slot_off(self, src: int, k: int) -> int:
        return self._data_off + (src * self.slots + k) * self._stride

    # -- backend hooks; all enqueue on ``stream`` (also the current stream when called) ----

    @abc.abstractmethod
    def _put(
        self,
        dst: int,
        k: int,
        q: int,
        piece: torch.Tensor,
        hdr: torch.Tensor | None,
        stream: torch.cuda.Stream,
    ) -> None:
        """Write ``piece`` (and ``hdr``) into slot k of ``dst``, then signal piece q."""

    @abc.abstractmethod
    def _wait_put(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait until piece q from ``src`` is in slot k here."""

    @abc.abstractmethod
    def _ack(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        """Tell ``src`` that piece q (slot k) was copied out."""

    @abc.abstractmethod
    def _wait_ack(self, dst: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait until ``dst`` acknowledged piece q (slot k)."""

    @abc.abstractmethod
    def _local(self, offset: int, nbytes: int) -> torch.Tensor:
        """This rank's heap bytes [offset, offset + nbytes)."""

    @abc.abstractmethod
    def _barrier_signals(self, peers: Sequence[int], stream: torch.cuda.Stream) -> None:
        """Signal every peer and make ``stream`` wait for all of theirs (a device barrier)."""

    @abc.abstractmethod
    def _release(self, clean: bool) -> None:
        """Drop the heap (``clean``) or park it in ``_LEAKED``."""

    # -- failure handling -------------------------------------------------------------

    def _watch_events(
        self, events: Sequence[torch.cuda.Event], what: str, peers: Sequence[int]
    ) -> None:
        """Block until ``events`` completed; raise on timeout, dead peer or device error."""
        start = last = time.monotonic()
        while True:
            try:
                if all(e.query() for e in events):
                    return
            except RuntimeError as exc:  # a trapped wait kernel (torch-symm timeout) or worse
                raise self._fail(
                    f"{what} with ranks {list(peers)} failed on the device: {exc}"
                ) from exc
            now = time.monotonic()
            if now - start > 0.05:  # spin first (latency), then yield the core, then sleep
                time.sleep(min(1e-3, (now - start) * 1e-2))
            elif now - start > 2e-3:
                os.sched_yield()
            if now - last > 0.05:
                last = now
                dead = dead_ranks(self._procs, peers)
                if dead:
                    raise self._fail(
                        f"{what}: rank(s) {dead} died (pids {[self._procs[p][1] for p in dead]})"
                    )
                if now - start > self.timeout:
                    raise self._fail(
                        f"{what} timed out after {self.timeout:.1f}s waiting for ranks {list(peers)} "
                        "(a peer hangs, or the ranks' collectives, shapes or dtypes differ)",
                        CommTimeout,
                    )

    # -- the protocol -------------------------------------------------------------------

    def _stream(self, role: str, peer: int) -> torch.cuda.Stream:
        stream = self._streams.get((role, peer))
        if stream is None:
            stream = self._streams[(role, peer)] = torch.cuda.Stream(device=self.device)
        return stream

    def _pieces(self, nbytes: int) -> list[tuple[int, int]]:
        return [
            (a, min(a + self.slot_bytes, nbytes)) for a in range(0, max(nbytes, 1), self.slot_bytes)
        ]

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        """Pipelined puts into the peers' inboxes; see the module docstring for the timeline.

        Equivalent plain code (two-sided)::

            works = dist.batch_isend_irecv([P2POp(isend, t, peer) for peer, t in sends] +
                                           [P2POp(irecv, out, peer) for peer, out in recvs])
        """
        self._check()
        peers = sorted({p for p, _ in sends} | {p for p, _, _ in recvs})
        for peer in peers:
            if peer == self.rank or not 0 <= peer < self.world_size:
                raise ValueError(f"{op}: invalid peer rank {peer} for rank {self.rank}")
        for _, t in sends:
            if t.device != self.device:
                raise ValueError(
                    f"{self.name} moves tensors on {self.device}; got one on {t.device}"
                )
        self.record(op, sends)
        dev, code = self.device, op_code(op)
        datas = [as_bytes(t) for _, t in sends]
        outputs = [torch.empty(shape, dtype=dtype, device=dev) for _, shape, dtype in recvs]
        hdrs = got = None
        if self.check:
            # hdrs[i] / got[j]: (bytes, op code) of send i / as received for recv j  # [n, 2] int64
            hdrs = torch.tensor(
                [[d.numel(), code] for d in datas] or [[0, 0]], dtype=torch.int64, device=dev
            )
            got = torch.zeros((max(len(recvs), 1), 2), dtype=torch.int64, device=dev)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
        events: list[torch.cuda.Event] = []
        try:
            for i, ((peer, _), data) in enumerate(zip(sends, datas)):
                stream = self._stream("send", peer)
                stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    for n, (a, b) in enumerate(self._pieces(data.numel())):
                        q = self._sent[peer] + 1
                        k = (q - 1) % self.slots
                        if q > self.slots:
                            self._wait_ack(peer, k, q - self.slots, stream)
                        hdr = hdrs[i].view(torch.uint8) if hdrs is not None and n == 0 else None
                        self._put(peer, k, q, data[a:b], hdr, stream)
                        self._sent[peer] = q
                data.record_stream(stream)  # the caller may free it before we read it
                if hdrs is not None:
                    hdrs.record_stream(stream)
                events.append(torch.cuda.Event())
                events[-1].record(stream)
            for j, ((peer, _, _), out) in enumerate(zip(recvs, outputs)):
                stream = self._stream("recv", peer)
                stream.wait_event(ready)
                flat = out.view(-1).view(torch.uint8)
                with torch.cuda.stream(stream):
                    for n, (a, b) in enumerate(self._pieces(flat.numel())):
                        q = self._recvd[peer] + 1
                        k = (q - 1) % self.slots
                        self._wait_put(peer, k, q, stream)
                        if got is not None and n == 0:
                            got[j].view(torch.uint8).copy_(
                                self._local(self._hdr_off(peer, k), _HDR)
                            )
                        if b > a:
                            flat[a:b].copy_(self._local(self._slot_off(peer, k), b - a))
                        self._ack(peer, k, q, stream)
                        self._recvd[peer] = q
                out.record_stream(stream)
                if got is not None:
                    got.record_stream(stream)
                events.append(torch.cuda.Event())
                events[-1].record(stream)
        except CommError:
            raise
        except Exception as exc:  # an API that differs from what this module expects
            raise self._fail(f"{op}: enqueueing failed: {type(exc).__name__}: {exc}") from exc

        def finish() -> list[torch.Tensor]:
            current = torch.cuda.current_stream(dev)
            for event in events:
                current.wait_event(event)
            if self.host_wait:
                self._watch_events(events, op, peers)
                if got is not None and recvs:
                    self._verify(got, recvs, outputs, code, op)
            return outputs

        return Handle(finish, lambda: all(e.query() for e in events))

    def _verify(
        self,
        got: torch.Tensor,
        recvs: Sequence[Recv],
        outputs: Sequence[torch.Tensor],
        code: int,
        op: str,
    ) -> None:
        for (src, _, _), out, (nbytes, their_code) in zip(recvs, outputs, got.tolist()):
            want = out.numel() * out.element_size()
            if nbytes != want or their_code != code:
                raise self._fail(
                    f"{op}: expected {want} bytes from rank {src}, but rank {src} sent {nbytes} "
                    "bytes"
                    + ("" if their_code == code else " in a different operation")
                    + " (shapes, dtypes or the order of collectives differ across ranks)"
                )

    def barrier(self, group: Group) -> None:
        """Return once every member entered the barrier (also orders the current stream)."""
        self._check()
        peers = [p for p in group.ranks if p != self.rank]
        if not peers:
            return
        stream = torch.cuda.current_stream(self.device)
        try:
            self._barrier_signals(peers, stream)
        except Exception as exc:
            raise self._fail(f"barrier: enqueueing failed: {type(exc).__name__}: {exc}") from exc
        event = torch.cuda.Event()
        event.record(stream)
        self._watch_events([event], "barrier", peers)

    def close(self) -> None:
        """Wait for this rank's pending work, then release the heap (not collective).

        A broken transport (or one whose pending work does not finish within the timeout)
        keeps its heap alive for the rest of the process: wait kernels may still spin on it.
        """
        if self._closed:
            return
        if self._broken is None and self._streams:
            events = []
            for stream in self._streams.values():
                events.append(torch.cuda.Event())
                events[-1].record(stream)
            with contextlib.suppress(CommError):
                self._watch_events(events, "close", [p for _, p in self._streams])
        self._closed = True
        self._release(clean=self._broken is None)
        self._streams.clear()


# -- torch-symm ----------------------------------------------------------------------------


class TorchSymmTransport(_StreamedTransport):
    """Symmetric heap from torch.distributed._symmetric_memory; build with :meth:`create`."""

    name = "torch-symm"

    def __init__(
        self, *, hdl: Any, heap: torch.Tensor, views: list[torch.Tensor], **kw: Any
    ) -> None:
        super().__init__(**kw)
        self._hdl = hdl
        self._heap = heap  # [heap_bytes] uint8, this rank's symmetric allocation
        self._views = views  # views[r]: [heap_bytes] uint8, rank r's heap mapped here

    @classmethod
    def create(
        cls,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        device: torch.device,
        pg: Any,
        opts: GpuOptions,
    ) -> TorchSymmTransport:
        """Allocate and rendezvous every rank's heap; collective over ``pg`` (see :func:`create`).

        Raises:
            TransportUnavailable: symmetric memory is missing, lacks an API used here, or
                the rendezvous failed (e.g. ranks sharing one GPU without
                ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``).
            ValueError: too few signal channels for ``opts.slots``.
        """
        try:
            import torch.distributed._symmetric_memory as symm
            from torch._C._distributed_c10d import _SymmetricMemory
        except ImportError as exc:
            raise TransportUnavailable(
                f"rank {rank}: torch-symm needs torch.distributed._symmetric_memory "
                f"(torch {torch.__version__}): {exc}"
            ) from exc
        need = ("put_signal", "wait_signal", "get_buffer")
        missing = [m for m in need if not hasattr(_SymmetricMemory, m)]
        if missing:
            raise TransportUnavailable(
                f"rank {rank}: torch {torch.__version__} symmetric memory lacks {missing}"
            )
        get_pad = getattr(symm, "get_signal_pad_size", None)
        pad_bytes = int(get_pad()) if get_pad else 2048
        channels = pad_bytes // (4 * world_size)
        if 1 + 2 * opts.slots > channels:
            raise ValueError(
                f"GpuOptions.slots={opts.slots}: torch-symm needs {1 + 2 * opts.slots} signal "
                f"channels, the {pad_bytes}-byte pad has {channels} for {world_size} ranks "
                "(raise it with symm_mem.set_signal_pad_size before the first allocation)"
            )
        torch.cuda.set_device(device)
        nbytes = cls.heap_bytes(world_size, opts.slot_bytes, opts.slots)
        backend = None
        with contextlib.suppress(Exception):  # the user's TORCH_SYMMMEM choice wins
            if symm.get_backend(device) is None:
                symm.set_backend("CUDA")  # the backend whose signal pads this module uses
            backend = symm.get_backend(device)
        try:
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore")  # deprecated (and not needed) in recent torch
                symm.enable_symm_mem_for_group(pg.group_name)
            heap = symm.empty(nbytes, dtype=torch.uint8, device=device)
            hdl = symm.rendezvous(heap, pg.group_name)
        except Exception as exc:
            hint = (
                ""
                if os.environ.get("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES")
                else ("; ranks sharing one GPU need TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1")
            )
            raise TransportUnavailable(
                f"rank {rank}: torch-symm allocation/rendezvous of {nbytes} bytes (backend "
                f"{backend}) failed: {exc}{hint}"
            ) from exc
        if (hdl.rank, hdl.world_size) != (rank, world_size):
            raise TransportUnavailable(
                f"rank {rank}: torch-symm handle is rank {hdl.rank} of {hdl.world_size}; "
                f"the process group must hold all {world_size} ranks in order"
            )
        # get_remote_tensor honours the handle's offset inside a pooled block; get_buffer
        # (older torch) counts from the block's start. Our own view must alias the heap.
        if hasattr(hdl, "get_remote_tensor"):
            views = [hdl.get_remote_tensor(r, (nbytes,), torch.uint8) for r in range(world_size)]
        else:
            off = heap.data_ptr() - hdl.get_buffer(rank, (1,), torch.uint8, 0).data_ptr()
            views = [hdl.get_buffer(r, (nbytes,), torch.uint8, off) for r in range(world_size)]
        if views[rank].data_ptr() != heap.data_ptr():
            raise TransportUnavailable(
                f"rank {rank}: torch-symm view of the own heap is at {views[rank].data_ptr():#x}, "
                f"the heap at {heap.data_ptr():#x} (symmetric-memory API differs from expected)"
            )
        procs = rank_processes(pg)
        dist.barrier(group=pg)
        return cls(
            hdl=hdl,
            heap=heap,
            views=views,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device=device,
            opts=opts,
            procs=procs,
        )

    def _tmo_ms(self) -> int:
        # Longer than the host watchdog, so its clearer error usually wins; still finite so a
        # lost peer can never pin the GPU forever (the kernel traps, the context is lost).
        return int((self.timeout * 1.1 + 1.0) * 1000)

    def _put(
        self,
        dst: int,
        k: int,
        q: int,
        piece: torch.Tensor,
        hdr: torch.Tensor | None,
        stream: torch.cuda.Stream,
    ) -> None:
        view = self._views[dst]
        if hdr is not None:
            h = self._hdr_off(self.rank, k)
            view[h : h + _HDR].copy_(hdr)
        if piece.numel():
            o = self._slot_off(self.rank, k)
            view[o : o + piece.numel()].copy_(piece)
        self._hdl.put_signal(dst, 1 + k, self._tmo_ms())

    def _wait_put(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._hdl.wait_signal(src, 1 + k, self._tmo_ms())

    def _ack(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._hdl.put_signal(src, 1 + self.slots + k, self._tmo_ms())

    def _wait_ack(self, dst: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._hdl.wait_signal(dst, 1 + self.slots + k, self._tmo_ms())

    def _local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._heap[offset : offset + nbytes]

    def _barrier_signals(self, peers: Sequence[int], stream: torch.cuda.Stream) -> None:
        for p in peers:
            self._hdl.put_signal(p, 0, self._tmo_ms())
        for p in peers:
            self._hdl.wait_signal(p, 0, self._tmo_ms())

    def _release(self, clean: bool) -> None:
        if not clean:
            _LEAKED.append((self._hdl, self._heap, self._views))
        self._hdl, self._views = None, []
        self._heap = torch.empty(0, dtype=torch.uint8)


# -- nvshmem -------------------------------------------------------------------------------

_NVSHMEM: dict[str, Any] = {"pes": None, "heaps": []}  # process-wide: NVSHMEM inits once


def _nvshmem() -> Any:
    """``nvshmem.core``, imported lazily (it loads libnvshmem and cuda.core)."""
    try:
        import nvshmem.core as nvc
    except ImportError as first:
        # nvshmem4py builds for cuda-core < 0.5 import ``cuda.core.experimental._memory`` /
        # ``._stream``, which later cuda-core moved to ``cuda.core._memory`` / ``._stream``.
        aliased = False
        for sub in ("_memory", "_stream", "_device") if "cuda.core" in str(first) else ():
            old = f"cuda.core.experimental.{sub}"
            with contextlib.suppress(ImportError):
                importlib.import_module(old)
                continue
            with contextlib.suppress(ImportError):
                sys.modules[old] = importlib.import_module(f"cuda.core.{sub}")
                aliased = True
        if not aliased:
            raise TransportUnavailable(
                f"the nvshmem transport needs nvshmem4py (pip install nvshmem4py-cu12 or "
                f"nvshmem4py-cu13, matching the CUDA of torch {torch.__version__}): {first}"
            ) from first
        try:
            import nvshmem.core as nvc
        except Exception as exc:
            raise TransportUnavailable(f"import nvshmem.core failed: {exc}") from exc
    except Exception as exc:
        raise TransportUnavailable(
            f"import nvshmem.core failed: {type(exc).__name__}: {exc}"
        ) from exc
    return nvc


def finalize_nvshmem() -> None:
    """Free every NVSHMEM heap of this process and finalize NVSHMEM (collective, optional).

    Transports never free NVSHMEM memory in ``close()``: ``nvshmem_free`` is a collective
    with a barrier that would hang if a peer never reaches it. Call this on every rank at
    the end of a job that used ``nvshmem``, or let process exit reclaim the memory.
    """
    if _NVSHMEM["pes"] is None:
        return
    nvc = _nvshmem()
    for t in _NVSHMEM["heaps"]:
        nvc.free_tensor(t)
    _NVSHMEM["heaps"].clear()
    nvc.finalize()
    _NVSHMEM["pes"] = None


class NvshmemTransport(_StreamedTransport):
    """Symmetric heap from nvshmem4py; build with :meth:`create`."""

    name = "nvshmem"

    def __init__(self, *, nvc: Any, heap: torch.Tensor, sig: torch.Tensor, **kw: Any) -> None:
        super().__init__(**kw)
        self._nvc = nvc
        self._heap = heap  # [heap_bytes] uint8 symmetric tensor
        # sig[0, src]: pieces src wrote here; sig[1, dst]: pieces of mine dst consumed;
        # sig[2, src]: barriers src entered with me  # [3, world] int64, symmetric
        self._sig = sig
        self._bars = [0] * self.world_size
        rma = importlib.import_module("nvshmem.core.rma")
        self._Buffer = getattr(rma, "Buffer", None) or importlib.import_module("cuda.core").Buffer
        self._set, self._ge = nvc.SignalOp.SIGNAL_SET, nvc.ComparisonType.CMP_GE

    @classmethod
    def create(
        cls,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        device: torch.device,
        pg: Any,
        opts: GpuOptions,
    ) -> NvshmemTransport:
        """Initialise NVSHMEM once per process (unique id sent over ``pg``), allocate the heap.

        Collective over ``pg`` (see :func:`create`).

        Raises:
            TransportUnavailable: nvshmem4py missing or unusable, or NVSHMEM failed to
                initialise (the message names the step that failed).
        """
        nvc = _nvshmem()
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # torch owns the primary context before cuda.core binds it
        step = "init"
        try:
            if _NVSHMEM["pes"] is None:
                try:
                    from cuda.core import Device
                except ImportError:
                    from cuda.core.experimental import Device
                step = "unique id"
                cdev = Device(device.index)
                cdev.set_current()
                uid = nvc.get_unique_id(empty=rank != 0)
                raw = uid._data.view("u1")  # the id's bytes, a numpy array
                box = [bytes(raw)]
                dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
                raw[:] = list(box[0])
                step = "nvshmem.core.init"
                nvc.init(
                    device=cdev, uid=uid, rank=rank, nranks=world_size, initializer_method="uid"
                )
                _NVSHMEM["pes"] = world_size
            if (nvc.my_pe(), nvc.n_pes()) != (rank, world_size):
                raise TransportUnavailable(
                    f"rank {rank}: NVSHMEM is PE {nvc.my_pe()} of {nvc.n_pes()} in this process, "
                    f"not {rank} of {world_size}"
                )
            step = "symmetric allocation"
            nbytes = cls.heap_bytes(world_size, opts.slot_bytes, opts.slots)
            heap = nvc.tensor((nbytes,), dtype=torch.uint8)
            sig = nvc.tensor((3, world_size), dtype=torch.int64)
            _NVSHMEM["heaps"] += [heap, sig]
        except TransportUnavailable:
            raise
        except Exception as exc:
            raise TransportUnavailable(
                f"rank {rank}: nvshmem {step} failed: {type(exc).__name__}: {exc}"
            ) from exc
        sig.zero_()
        torch.cuda.synchronize(device)
        procs = rank_processes(pg)
        dist.barrier(group=pg)  # every rank's counters are zero before anyone signals
        return cls(
            nvc=nvc,
            heap=heap,
            sig=sig,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device=device,
            opts=opts,
            procs=procs,
        )

    def _buf(self, ptr: int, nbytes: int) -> Any:
        make: Callable[..., Any] = getattr(self._Buffer, "from_handle", self._Buffer)
        return make(ptr, nbytes)

    def _counter(self, kind: int, rank: int) -> Any:
        return self._buf(self._sig[kind, rank].data_ptr(), 8)

    def _put(
        self,
        dst: int,
        k: int,
        q: int,
        piece: torch.Tensor,
        hdr: torch.Tensor | None,
        stream: torch.cuda.Stream,
    ) -> None:
        nvc, base = self._nvc, self._heap.data_ptr()
        if hdr is not None:
            nvc.put(
                self._buf(base + self._hdr_off(self.rank, k), _HDR),
                self._buf(hdr.data_ptr(), _HDR),
                remote_pe=dst,
                stream=stream,
            )
            nvc.quiet(stream=stream)  # put_signal orders only its own data before the signal
        written = self._counter(0, self.rank)
        if piece.numel():
            dst_buf = self._buf(base + self._slot_off(self.rank, k), piece.numel())
            nvc.put_signal(
                dst_buf,
                self._buf(piece.data_ptr(), piece.numel()),
                written,
                q,
                self._set,
                remote_pe=dst,
                stream=stream,
            )
        else:
            nvc.signal_op(written, q, self._set, remote_pe=dst, stream=stream)

    def _wait_put(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._nvc.signal_wait(self._counter(0, src), q, self._ge, stream=stream)

    def _ack(self, src: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._nvc.signal_op(self._counter(1, self.rank), q, self._set, remote_pe=src, stream=stream)

    def _wait_ack(self, dst: int, k: int, q: int, stream: torch.cuda.Stream) -> None:
        self._nvc.signal_wait(self._counter(1, dst), q, self._ge, stream=stream)

    def _local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._heap[offset : offset + nbytes]

    def _barrier_signals(self, peers: Sequence[int], stream: torch.cuda.Stream) -> None:
        for p in peers:
            self._bars[p] += 1
            self._nvc.signal_op(
                self._counter(2, self.rank), self._bars[p], self._set, remote_pe=p, stream=stream
            )
        for p in peers:
            self._nvc.signal_wait(self._counter(2, p), self._bars[p], self._ge, stream=stream)

    def _release(self, clean: bool) -> None:
        # Freeing is collective (see finalize_nvshmem); the heap stays listed in _NVSHMEM.
        self._heap = self._sig = torch.empty(0)


# -- factory -------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., _StreamedTransport]] = {
    "torch-symm": TorchSymmTransport.create,
    "nvshmem": NvshmemTransport.create,
}


def create(
    name: str,
    *,
    rank: int,
    world_size: int,
    timeout: float,
    device: torch.device | str,
    pg: Any = None,
    **options: Any,
) -> Transport:
    """Build the GPU transport ``name`` ("torch-symm" or "nvshmem"); collective over ``pg``.

    Args:
        name: which transport.
        rank, world_size: this rank in the job; ``pg`` must hold all ranks in order.
        timeout: seconds any wait may take before it raises.
        device: this rank's CUDA device (an index-less "cuda" means the current one).
        pg: process group for the set-up (default: world). Any backend with a store works;
            ranks sharing one GPU can use gloo (NCCL refuses that).
        options: fields of :class:`GpuOptions` (``slot_bytes``, ``slots``, ``host_wait``,
            ``check``).

    Returns:
        The transport.

    Raises:
        ValueError: unknown name or option, a bad option value, or a non-CUDA device.
        TransportUnavailable: CUDA or the library is missing, or initialisation failed;
            ``transport="auto"`` should then fall back.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown GPU transport {name!r}; choose one of {sorted(_FACTORIES)}")
    fields = {f.name for f in dataclasses.fields(GpuOptions)}
    if set(options) - fields:
        raise ValueError(
            f"{name}: unknown options {sorted(set(options) - fields)}; use {sorted(fields)}"
        )
    opts = GpuOptions(**options)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the {name} transport needs a CUDA device, got {device}")
    if not torch.cuda.is_available():
        raise TransportUnavailable(
            f"rank {rank}: the {name} transport needs CUDA, but torch {torch.__version__} sees none"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pg = pg if pg is not None else dist.group.WORLD
    return _FACTORIES[name](
        rank=rank, world_size=world_size, timeout=timeout, device=device, pg=pg, opts=opts
    )
