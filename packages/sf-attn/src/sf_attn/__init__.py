"""StreamFusion attention.

Entry point: :func:`parallel_attention` (exact attention over a sequence sharded across the
ranks of an :mod:`sf_comm` context). Local pieces: :func:`attention_with_lse`,
:func:`merge_attention`; sharding helpers :func:`shard` / :func:`gather`.
"""

from sf_comm import require as _require

_require("sf-comm", "0.1.0", by="sf-attn")

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
from .sharding import chunk_sizes, gather, shard  # noqa: E402
from .simulate import CostModel, SimResult, simulate  # noqa: E402
from .step import StepResult, simulate_step  # noqa: E402
from .strategies import Strategy, get_strategy, register_strategy, strategy_names  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "CostModel",
    "Layout",
    "Plan",
    "SimResult",
    "StepResult",
    "Strategy",
    "__version__",
    "attention_with_lse",
    "available_backends",
    "chunk_sizes",
    "gather",
    "get_strategy",
    "make_layout",
    "merge_attention",
    "merge_attention_",
    "parallel_attention",
    "plan",
    "reference_attention",
    "register_backend",
    "register_strategy",
    "shard",
    "simulate",
    "simulate_step",
    "strategy_names",
]
