"""Calibration of the step simulator against xDiT's published FLUX.1-dev figures.

``streamfusion simulate --calibration`` prints :func:`xdit_flux_calibration`: the published
end-to-end seconds on 4x H100, the simulator's prediction of each, and which rows set the
constants (fitted) and which only check them (held out); then
:func:`xdit_hunyuanvideo_check`, a second model nothing was fitted to. See
docs/simulator.md.
"""

from __future__ import annotations

import dataclasses

from sf_comm import Topology

from ..hybrid import rotating_rings
from .step import (
    StepCost,
    step_latency,
    xdit_cost,
)


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrationRow:
    """One published configuration and the simulator's prediction of it."""

    label: str
    gpus: int
    strategy: str
    ulysses_degree: int
    published_s: float
    predicted_s: float
    fitted: bool  # used to set the constants (False: held out, a check)

    @property
    def error(self) -> float:
        return self.predicted_s / self.published_s - 1.0


# xDiT docs/performance/flux.md: FLUX.1-dev, 1024x1024 px, 28 steps, bf16, torch.compile,
# end-to-end seconds on 4x H100 (one machine, NVLink).
XDIT_FLUX_H100: tuple[tuple[str, int, str, int, float, bool], ...] = (
    ("1 GPU", 1, "ulysses", 1, 4.30, True),
    ("Ulysses-4", 4, "ulysses", 4, 1.63, True),
    ("Ring-4", 4, "ring", 1, 1.98, True),
    ("Ulysses-2 x Ring-2", 4, "usp", 2, 1.80, True),
    ("Ulysses-2", 2, "ulysses", 2, 2.68, False),
    ("Ring-2", 2, "ring", 1, 2.60, False),
)
XDIT_STEPS = 28
# Outside the 28 transformer calls: T5-XXL + CLIP text encoding, VAE decode of a 1024 px
# image, scheduler and launch: an estimate, not fitted (it is the same for every row).
XDIT_PIPELINE_OVERHEAD_S = 0.12
# xDiT's ring loop costs (XDIT_*_OVERHEAD_S, XDIT_MERGE_BW, xdit_cost) live in sf_attn.sim.step,
# beside the baseline that uses them; they were fitted here (docs/simulator.md).


# xDiT docs/performance/hunyuanvideo.md: HunyuanVideo (the official repository, not
# diffusers), 1280x720, 129 frames, 50 steps, Ulysses over 1-8 H100s, end-to-end seconds.
# Held out: nothing was fitted to it.
XDIT_HUNYUANVIDEO_H100: tuple[tuple[str, int, float], ...] = (
    ("Ulysses-1", 1, 1904.08),
    ("Ulysses-2", 2, 925.04),
    ("Ulysses-4", 4, 514.08),
    ("Ulysses-8", 8, 337.58),
)
HUNYUANVIDEO_STEPS = 50
# The official repository calls flash_attn's varlen function, FlashAttention-2 (no Hopper
# kernel): its rate, not cuDNN's, is the one those seconds were run at (Note [Kernel rates]).
HUNYUANVIDEO_KERNEL = "fa2"


def xdit_hunyuanvideo_check(cost: StepCost | None = None) -> list[CalibrationRow]:
    """Predicted vs published HunyuanVideo latency on 1-8 H100s (held out, see docs).

    ``predicted = 50 * step`` (nothing added for the VAE decode and the text encoders, which
    the published seconds include), each step on ``Topology.preset("h100-ib")`` cut to one
    machine of ``gpus`` GPUs, Ulysses at degree ``gpus``, two-sided, xDiT's costs, and the
    attention at FlashAttention-2's rate (:data:`HUNYUANVIDEO_KERNEL`).
    """
    if cost is None:
        base = xdit_cost()
        attention = dataclasses.replace(base.attention, kernel=HUNYUANVIDEO_KERNEL)
        cost = dataclasses.replace(base, attention=attention)
    rows = []
    with rotating_rings():
        for label, gpus, published in XDIT_HUNYUANVIDEO_H100:
            topo = Topology.preset("h100-ib", 1).replace(gpus_per_machine=gpus)
            step = step_latency(
                "hunyuanvideo",
                topo,
                height=720,
                width=1280,
                frames=129,
                strategy="ulysses",
                ulysses_degree=gpus,
                one_sided=False,
                text="sharded",
                cost=cost,
            )
            predicted = HUNYUANVIDEO_STEPS * step.latency_s
            rows.append(CalibrationRow(label, gpus, "ulysses", gpus, published, predicted, False))
    return rows


def xdit_flux_calibration(cost: StepCost | None = None) -> list[CalibrationRow]:
    """Predicted vs published end-to-end FLUX.1-dev latency on H100s (xDiT, see docs).

    Each prediction is ``XDIT_STEPS * step + XDIT_PIPELINE_OVERHEAD_S`` with the step on
    ``Topology.preset("h100-ib")`` cut to one machine of ``gpus`` GPUs, text sharded (as
    xDiT does for Flux), two-sided transfers (NCCL), rings that rotate (xDiT's never gather,
    Note [Gathered ring] in :mod:`sf_attn.hybrid`).
    """
    cost = cost or xdit_cost()
    rows = []
    with rotating_rings():
        for label, gpus, strategy, degree, published, fitted in XDIT_FLUX_H100:
            topo = Topology.preset("h100-ib", 1).replace(gpus_per_machine=gpus)
            step = step_latency(
                "flux",
                topo,
                height=1024,
                width=1024,
                strategy=strategy,
                ulysses_degree=degree,
                one_sided=False,
                text="sharded",
                cost=cost,
            )
            predicted = XDIT_STEPS * step.latency_s + XDIT_PIPELINE_OVERHEAD_S
            rows.append(CalibrationRow(label, gpus, strategy, degree, published, predicted, fitted))
    return rows


__all__ = [
    "HUNYUANVIDEO_KERNEL",
    "HUNYUANVIDEO_STEPS",
    "XDIT_FLUX_H100",
    "XDIT_HUNYUANVIDEO_H100",
    "XDIT_PIPELINE_OVERHEAD_S",
    "XDIT_STEPS",
    "CalibrationRow",
    "xdit_cost",
    "xdit_flux_calibration",
    "xdit_hunyuanvideo_check",
]
