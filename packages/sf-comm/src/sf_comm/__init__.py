"""StreamFusion communication layer.

Entry point: :func:`init` builds a :class:`Context` (topology, DeviceMesh with axes
("inter", "intra"), transport); :func:`default_context` keeps one per process for code that
is given none. The collectives (:func:`all_to_all`, :func:`shift`, :func:`ring_shift`,
:func:`all_gather`) run on a group of any :class:`CommContext` and return waitable handles.
:class:`Emulation` runs ranks as several machines on one host (network namespaces joined by
rate-limited links; ``streamfusion emulate``).
"""

from ._context_protocol import CommContext
from ._version import __version__, require
from .collectives import all_gather, all_to_all, ring_shift, shift
from .context import (
    AXES,
    Context,
    agree_on_env,
    close_default_contexts,
    default_context,
    init,
    local_cuda_device,
)
from .emulate import Emulation
from .topology import Topology
from .transport import (
    CommError,
    CommStats,
    CommTimeout,
    Group,
    Handle,
    Transport,
    register_transport,
    transport_names,
)

__all__ = [
    "AXES",
    "CommContext",
    "CommError",
    "CommStats",
    "CommTimeout",
    "Context",
    "Emulation",
    "Group",
    "Handle",
    "Topology",
    "Transport",
    "__version__",
    "agree_on_env",
    "all_gather",
    "all_to_all",
    "close_default_contexts",
    "default_context",
    "init",
    "local_cuda_device",
    "register_transport",
    "require",
    "ring_shift",
    "shift",
    "transport_names",
]
