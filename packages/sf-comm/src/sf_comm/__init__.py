"""StreamFusion communication layer.

Entry point: :func:`init` builds a :class:`Context` (topology, DeviceMesh with axes
("inter", "intra"), transport); the collectives (:func:`all_to_all`, :func:`shift`,
:func:`ring_shift`, :func:`all_gather`) run on a group of it and return waitable handles.
"""

from ._version import __version__, require
from .collectives import all_gather, all_to_all, ring_shift, shift
from .context import AXES, Context, init
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
    "CommError",
    "CommStats",
    "CommTimeout",
    "Context",
    "Group",
    "Handle",
    "Topology",
    "Transport",
    "__version__",
    "all_gather",
    "all_to_all",
    "init",
    "register_transport",
    "require",
    "ring_shift",
    "shift",
    "transport_names",
]
