"""StreamFusion's torch.compile backend.

Entry point: ``torch.compile(model, backend="streamfusion", options={...})`` (registered
through the ``torch_dynamo_backends`` entry point; :func:`streamfusion_backend` is the backend
itself, :class:`CompileOptions` its options). The FX pass is :func:`shard_graph`; its custom
ops live in :mod:`sf_compile.ops`; :func:`benchmark_world1` times the backend against Inductor.
"""

from sf_comm import require as _require

_require("sf-comm", "0.1.0", by="sf-compile")
_require("sf-attn", "0.1.0", by="sf-compile")

from .backend import streamfusion_backend  # noqa: E402
from .options import CompileOptions  # noqa: E402
from .rules import UnsupportedOpError  # noqa: E402
from .token_layout import Shard, Split  # noqa: E402
from .token_pass import ShardReport, shard_graph  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CompileOptions",
    "Shard",
    "ShardReport",
    "Split",
    "UnsupportedOpError",
    "__version__",
    "shard_graph",
    "streamfusion_backend",
]
