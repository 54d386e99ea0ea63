"""StreamFusion models: diffusers Diffusion Transformers under sequence parallelism.

Entry point: :func:`parallelize` (a diffusers transformer -> a module that takes the same full
inputs and returns the same full outputs on every rank, with the token sequence split
inside); :func:`generate` (a local pipeline directory and a prompt -> an image or video, on
every rank there is). The ``streamfusion`` command lives in :mod:`sf_models.cli`.
"""

from sf_comm import require as _require

_require("sf-comm", "0.1.0", by="sf-models")
_require("sf-attn", "0.1.0", by="sf-models")

from .cfg import CFGPlan, register_cfg_plan, supported_cfg_pipelines  # noqa: E402
from .generate import GenerateOptions, generate  # noqa: E402
from .parallelize import parallelize  # noqa: E402
from .pipeline import ParallelPipeline  # noqa: E402
from .plan import (  # noqa: E402
    SequenceParallelPlan,
    ShardState,
    get_plan,
    register_plan,
    supported_models,
)
from .wrapper import SequenceParallelModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CFGPlan",
    "GenerateOptions",
    "ParallelPipeline",
    "SequenceParallelModel",
    "SequenceParallelPlan",
    "ShardState",
    "__version__",
    "generate",
    "get_plan",
    "parallelize",
    "register_cfg_plan",
    "register_plan",
    "supported_cfg_pipelines",
    "supported_models",
]
