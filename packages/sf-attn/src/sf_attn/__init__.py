"""StreamFusion attention.

Entry point: :func:`parallel_attention` (exact attention over a sequence sharded across the
ranks of an :mod:`sf_comm` context). Which strategy and degrees a layer runs with is decided
in one place, :func:`resolve` (``strategy="auto"``: the planner, :func:`plan`). Local
pieces: :func:`attention_with_lse`, :func:`merge_attention`; sharding helpers :func:`shard` /
:func:`gather`. No devices needed: :func:`simulate` (one layer) and :func:`simulate_step`
(a whole DiT step) run the strategies' own code on meta tensors against a modelled clock, so
the schedule the simulator costs is the code that executes (:mod:`sf_attn.sim`).
"""

from sf_comm import require as _require

_require("sf-comm", "0.1.0", by="sf-attn")

from . import kernels as _kernels  # noqa: E402, F401 - importing registers the built-in kernels
from .api import parallel_attention  # noqa: E402
from .backends import (  # noqa: E402
    AttentionBackend,
    attention_with_lse,
    available_backends,
    reference_attention,
    register_backend,
)
from .layout import Layout, make_layout  # noqa: E402
from .merge import merge_attention, merge_attention_  # noqa: E402
from .planner import Plan, plan  # noqa: E402
from .resolution import Resolution, recording_resolutions, resolve  # noqa: E402
from .sharding import chunk_sizes, gather, shard  # noqa: E402
from .sim import CostModel, SimResult, StepResult, simulate, simulate_step  # noqa: E402
from .strategies import (  # noqa: E402
    Strategy,
    baseline_strategy,
    get_strategy,
    register_strategy,
    strategy_names,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "CostModel",
    "Layout",
    "Plan",
    "Resolution",
    "SimResult",
    "StepResult",
    "Strategy",
    "__version__",
    "attention_with_lse",
    "available_backends",
    "baseline_strategy",
    "chunk_sizes",
    "gather",
    "get_strategy",
    "make_layout",
    "merge_attention",
    "merge_attention_",
    "parallel_attention",
    "plan",
    "recording_resolutions",
    "reference_attention",
    "register_backend",
    "register_strategy",
    "resolve",
    "shard",
    "simulate",
    "simulate_step",
    "strategy_names",
]
