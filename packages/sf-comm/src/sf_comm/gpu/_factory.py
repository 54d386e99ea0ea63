"""The GPU transports' factory: :func:`create` builds ``torch-symm`` or ``nvshmem``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..transport import Transport
from ._streamed_protocol import GpuOptions, TransportUnavailable, _StreamedTransport
from .nvshmem import NvshmemTransport
from .torch_symm import TorchSymmTransport

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
