"""``nvshmem``: the streamed protocol over nvshmem4py.

``put_signal``/``signal_op``/``signal_wait`` on streams with 64-bit counters in a second
symmetric tensor (see :mod:`sf_comm.gpu._streamed_protocol`).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .._liveness import rank_processes
from ._streamed_protocol import _HDR, GpuOptions, TransportUnavailable, _StreamedTransport

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

        Collective over ``pg`` (see :func:`sf_comm.gpu.create`).

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
