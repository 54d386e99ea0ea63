"""One-sided transports for CUDA tensors: ``torch-symm`` and ``nvshmem``.

Entry point: :func:`create` (what ``sf_comm.init(transport="torch-symm" | "nvshmem")``
calls). Both backends run one streamed protocol (:mod:`sf_comm.gpu._streamed_protocol`);
each lives in its own module (:mod:`~sf_comm.gpu.torch_symm`, :mod:`~sf_comm.gpu.nvshmem`).
"""

from ._factory import create
from ._streamed_protocol import GpuOptions, TransportUnavailable
from .nvshmem import NvshmemTransport, finalize_nvshmem
from .torch_symm import TorchSymmTransport

__all__ = [
    "GpuOptions",
    "NvshmemTransport",
    "TorchSymmTransport",
    "TransportUnavailable",
    "create",
    "finalize_nvshmem",
]
