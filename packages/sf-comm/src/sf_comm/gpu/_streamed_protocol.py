"""The protocol shared by the GPU transports ``torch-symm`` and ``nvshmem``: streamed puts.

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
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._liveness import dead_ranks
from ..transport import (
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
        self.check_peers(sends, recvs, op)
        peers = sorted({p for p, _ in sends} | {p for p, _, _ in recvs})
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
