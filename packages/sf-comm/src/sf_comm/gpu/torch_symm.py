"""``torch-symm``: the streamed protocol over torch.distributed._symmetric_memory.

Puts are ``copy_`` into the peer's heap as mapped into this process; signals are the
handle's ``put_signal``/``wait_signal`` kernels (see :mod:`sf_comm.gpu._streamed_protocol`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .._liveness import rank_processes
from ._streamed_protocol import _HDR, _LEAKED, GpuOptions, TransportUnavailable, _StreamedTransport


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
        """Allocate and rendezvous every rank's heap; collective over ``pg``.

        Called by :func:`sf_comm.gpu.create`, which checks the device and the options.

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
