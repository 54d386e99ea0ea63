"""Calibration of the step simulator against xDiT's published FLUX.1-dev figures.

``streamfusion simulate --calibration`` prints :func:`xdit_flux_calibration`: the published
end-to-end seconds on 4x H100, the simulator's prediction of each, and which rows set the
constants (fitted) and which only check them (held out). See docs/simulator.md.
"""

from __future__ import annotations

import dataclasses

from sf_comm import Topology

from ..hybrid import rotating_rings
from .step import StepCost, step_latency


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
# Fitted (with StepCost.gemm_eff, block_overhead and CostModel.handshake) to the four rows
# marked fitted above; see docs/simulator.md. Refitted (2026-11-30) when the executed ring
# stopped merging its first block (as xDiT's does not either): the per-block and per-merge
# costs are then told apart, and the data put all of xDiT's fixed cost on the block (its
# merge keeps the memory pass at XDIT_MERGE_BW).
XDIT_BLOCK_OVERHEAD_S = 100e-6  # per attention block (CostModel.attn_overhead)
XDIT_MERGE_OVERHEAD_S = 0.0  # per merge (CostModel.merge_overhead)
XDIT_MERGE_BW = 1.0e12  # bytes/s of the unfused float32 merge (CostModel.mem_bw)


def xdit_cost() -> StepCost:
    """:class:`StepCost` for xDiT's implementation: the defaults plus its ring loop's overheads.

    xDiT's ring attention (yunchang) runs each ring step from Python: a flash-attention call
    with its own log-sum-exp bookkeeping, then an unfused float32 merge (several elementwise
    kernels where StreamFusion's merge is one). Those per-block and per-merge costs were
    fitted to the published numbers (Note [Step cost], docs/simulator.md); everything else is
    the default (shared) constants.
    """
    base = StepCost()
    xdit_attention = dataclasses.replace(
        base.attention,
        attn_overhead=XDIT_BLOCK_OVERHEAD_S,
        merge_overhead=XDIT_MERGE_OVERHEAD_S,
        mem_bw=XDIT_MERGE_BW,
    )
    return dataclasses.replace(base, attention=xdit_attention)


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
    "XDIT_FLUX_H100",
    "XDIT_PIPELINE_OVERHEAD_S",
    "XDIT_STEPS",
    "CalibrationRow",
    "xdit_cost",
    "xdit_flux_calibration",
]
