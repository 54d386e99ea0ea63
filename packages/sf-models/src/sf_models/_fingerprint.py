"""Order-aware fingerprints of tensors, to check that every rank was given the same input
(Note [Same inputs on every rank] in :mod:`sf_models.pipeline`) with a few numbers each."""

from __future__ import annotations

import torch

__all__ = ["fingerprint", "same_fingerprint"]


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum |x|, sum x^2, sum x * ramp] of ``t`` in float64; the ramp makes it order-aware."""
    flat = t.detach().reshape(-1).to(torch.float64)
    ramp = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), flat.abs().sum(), flat.square().sum(), (flat * ramp).sum()])


def same_fingerprint(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Identical tensors may sum in another order on a differently configured rank: allow 1e-9
    # of the magnitude (float64 rounding is ~1e-16 per term), while noise from another seed
    # moves the sums by ~1/sqrt(numel) of it (1e-4 for 1e8 elements).
    tol = 1e-9 * torch.stack([a[1], a[1], a[2], a[1]])
    close = ((a - b).abs() <= tol) | torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    return bool(close.all())
