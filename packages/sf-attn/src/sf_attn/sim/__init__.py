"""Simulation without devices: the strategies' own code on meta tensors against a clock.

- :mod:`sf_attn.sim.layer`: one attention layer (:func:`simulate`, the planner's cost).
- :mod:`sf_attn.sim.step`: a whole DiT denoising step (:func:`simulate_step`).
- :mod:`sf_attn.sim.models`: architecture numbers of the public DiTs.
- :mod:`sf_attn.sim.calibration`: the step model against xDiT's published figures.
"""

from .layer import CostModel, SimContext, SimResult, VirtualTracer, simulate
from .step import StepCost, StepResult, simulate_step, step_latency

__all__ = [
    "CostModel",
    "SimContext",
    "SimResult",
    "StepCost",
    "StepResult",
    "VirtualTracer",
    "simulate",
    "simulate_step",
    "step_latency",
]
