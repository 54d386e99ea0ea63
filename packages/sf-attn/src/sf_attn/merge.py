"""Online-softmax merge of partial attention results over disjoint key sets.

Entry points: :func:`merge_attention` (out of place) and :func:`merge_attention_` (updates
float32 accumulators in place, for loops such as a ring pass). If ``(o1, lse1)`` is attention
of some queries over key set K1 and ``(o2, lse2)`` over a disjoint K2, the merge is attention
over K1 ∪ K2::

    lse = logaddexp(lse1, lse2)
    o   = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2

Note [Stable merge]
    Computed as ``m = max(lse1, lse2)``, ``w_i = exp(lse_i - m)``, ``lse = m + log(w1 + w2)``,
    ``o = (w1 o1 + w2 o2) / (w1 + w2)``. The larger weight is exactly 1, so nothing overflows
    however large the lse values are (1e4 is fine in float32). Arithmetic is in float32
    (float64 if any input is float64). Per row, by the lse values:

    - -inf (all keys masked, or no keys): the block gets weight 0 and its ``o`` is ignored,
      even if it holds NaN/inf (never written). If both are -inf, ``m`` is replaced by 0 so
      no ``-inf - -inf`` appears, and the result is o = 0, lse = -inf.
    - NaN or +inf (a NaN or +inf score: single-device attention is NaN in that row, Note
      [Non-finite inputs] in ``sf_attn.kernels``): the block poisons the row, o = NaN and
      lse = NaN, whatever the other block holds (-inf included), and stays poisoned through
      later merges. Otherwise the answer would depend on how a strategy splits the keys.

    Both rules live in the coefficients, so the o pass is the same as for finite rows: a
    poisoned row has ``w1 + w2 = NaN`` (``exp(inf - inf)``, or ``exp(NaN)``), hence
    ``lse = NaN`` and ``c_i = w_i / (w1 + w2) = NaN``, and only ``c_i == 0`` drops a block
    (``where(c != 0, c * o, 0)``), so a NaN coefficient reaches ``o``. This holds whether or
    not ``max`` propagates NaN (Triton's may not): ``exp(NaN - m)`` is NaN either way. A block
    with finite lse whose weight underflows to 0 (lse ~100 below the other's in float32) is
    dropped too, NaN in its ``o`` included, where SDPA would compute 0 * NaN = NaN; only
    NaN/inf in v can produce such an ``o``.

On CUDA the merge runs as one Triton kernel (``sf_attn._triton_merge``, imported only when
used); elsewhere as a few torch ops. ``impl="triton"`` forces the kernel, which also runs on
CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported) so it can be tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import Tensor

from sf_comm import trace

__all__ = ["merge_attention", "merge_attention_"]

_IMPLS = ("auto", "torch", "triton")


def merge_attention(
    o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, *, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Merges two partial attentions over disjoint key sets (Note [Stable merge]).

    Equivalent to::

        lse = torch.logaddexp(lse1, lse2)                      # [batch, heads, seq]
        w1 = torch.exp(lse1 - lse).transpose(1, 2)[..., None]  # [batch, seq, heads, 1]
        w2 = torch.exp(lse2 - lse).transpose(1, 2)[..., None]
        o = w1 * o1 + w2 * o2

    but without NaN when both lse are -inf and without overflow for large lse, and with
    o = lse = NaN in rows where either lse is NaN or +inf.

    Args:
        o1: Attention output over the first key set, [batch, seq, heads, head_dim].
        lse1: Its log-sum-exp, [batch, heads, seq].
        o2: Attention output over the second key set, same shape as ``o1``.
        lse2: Its log-sum-exp, same shape as ``lse1``.
        impl: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or
            ``"triton"``.

    Returns:
        ``(o, lse)``: o in o1's dtype, lse in float32 (float64 if an input is float64).

    Raises:
        TypeError: If an input is not a floating-point tensor.
        ValueError: If shapes or devices do not match, or ``impl`` cannot run here.
    """
    compute_dtype = _check(o1, lse1, o2, lse2, names=("o1", "lse1", "o2", "lse2"))
    if _pick_impl(impl, o1, compute_dtype) == "triton":
        from sf_attn import _triton_merge

        o = torch.empty_like(o1)
        lse = torch.empty(lse1.shape, dtype=compute_dtype, device=lse1.device)
        _triton_merge.merge_into(o1, lse1, o2, lse2, o, lse)
        return o, lse
    c1, c2, lse = _coefficients(lse1, lse2, compute_dtype)
    o = _scaled(o1, c1, compute_dtype) + _scaled(o2, c2, compute_dtype)
    return o.to(o1.dtype), lse


def merge_attention_(
    acc_o: Tensor, acc_lse: Tensor, o: Tensor, lse: Tensor, *, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Merges ``(o, lse)`` into the accumulators ``(acc_o, acc_lse)`` in place.

    Equivalent to::

        new_o, new_lse = merge_attention(acc_o, acc_lse, o, lse)
        acc_o.copy_(new_o)
        acc_lse.copy_(new_lse)

    Start a loop from ``acc_o = torch.zeros(..., dtype=torch.float32)`` and
    ``acc_lse = torch.full(..., -inf)`` (or from the first block's result, converted)::

        for k_chunk, v_chunk in chunks:
            merge_attention_(acc_o, acc_lse, *attention_with_lse(q, k_chunk, v_chunk))
        out = acc_o.to(q.dtype)

    Args:
        acc_o: Accumulated output, [batch, seq, heads, head_dim], float32 (or float64).
        acc_lse: Accumulated log-sum-exp, [batch, heads, seq], same dtype as ``acc_o``.
        o: Attention output over new keys, same shape as ``acc_o``, any float dtype.
        lse: Its log-sum-exp, same shape as ``acc_lse``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` as in :func:`merge_attention`.

    Returns:
        ``(acc_o, acc_lse)``, the same tensors, updated.

    Raises:
        TypeError: If the accumulators are not float32/float64 of one dtype.
        ValueError: As :func:`merge_attention`.
    """
    if trace.active() is None:
        return _merge_attention_(acc_o, acc_lse, o, lse, impl=impl)
    # read acc + block, write acc: memory-bound
    nbytes = 2 * acc_o.numel() * acc_o.element_size() + o.numel() * o.element_size()
    with trace.compute_span("merge", nbytes=nbytes):
        return _merge_attention_(acc_o, acc_lse, o, lse, impl=impl)


def _merge_attention_(
    acc_o: Tensor, acc_lse: Tensor, o: Tensor, lse: Tensor, *, impl: str
) -> tuple[Tensor, Tensor]:
    """:func:`merge_attention_` without the trace span."""
    if (
        not isinstance(acc_o, Tensor)
        or not isinstance(acc_lse, Tensor)
        or acc_o.dtype not in (torch.float32, torch.float64)
        or acc_lse.dtype != acc_o.dtype
    ):
        found = [getattr(t, "dtype", type(t).__name__) for t in (acc_o, acc_lse)]
        raise TypeError(
            f"acc_o and acc_lse must be tensors of one dtype, float32 or float64; got {found}"
        )
    compute_dtype = _check(acc_o, acc_lse, o, lse, names=("acc_o", "acc_lse", "o", "lse"))
    if compute_dtype != acc_o.dtype:
        raise TypeError(f"o and lse must not be float64 when acc_o is {acc_o.dtype}")
    if _pick_impl(impl, acc_o, compute_dtype) == "triton":
        from sf_attn import _triton_merge

        _triton_merge.merge_into(acc_o, acc_lse, o, lse, acc_o, acc_lse)
        return acc_o, acc_lse
    c1, c2, new_lse = _coefficients(acc_lse, lse, compute_dtype)
    acc_o.mul_(c1).masked_fill_(c1 == 0, 0.0)  # as _scaled: weight 0 drops, NaN poisons
    acc_o.add_(_scaled(o, c2, compute_dtype))
    acc_lse.copy_(new_lse)
    return acc_o, acc_lse


def _coefficients(lse1: Tensor, lse2: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (c1, c2) [batch, seq, heads, 1] with o = c1 o1 + c2 o2, and lse [batch, heads, seq].

    A c is 0 for a dropped (-inf) block and NaN in a poisoned row (Note [Stable merge])."""
    l1, l2 = lse1.to(dtype), lse2.to(dtype)
    m = torch.maximum(l1, l2)
    m = m.masked_fill(m == -math.inf, 0.0)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2  # in [1, 2], 0 (both empty) or NaN (poisoned)
    lse = m + torch.log(total)
    inv = torch.where(total == 0, 0.0, 1.0 / total)  # NaN stays NaN
    c1, c2 = ((w * inv).transpose(1, 2).unsqueeze(-1) for w in (w1, w2))
    return c1, c2, lse


def _scaled(o: Tensor, c: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(c != 0, o.to(dtype) * c, 0.0)


def _check(
    o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, *, names: tuple[str, ...]
) -> torch.dtype:
    """Validates shapes/devices/dtypes and returns the compute dtype."""
    tensors = (o1, lse1, o2, lse2)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != o1.device:
            raise ValueError(f"{name} must be on {names[0]}'s device ({o1.device}), got {t.device}")
    if o1.dim() != 4:
        raise ValueError(
            f"{names[0]} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(o1.shape)}"
        )
    if o2.shape != o1.shape:
        raise ValueError(
            f"{names[2]} must have the shape of {names[0]} {tuple(o1.shape)}, got {tuple(o2.shape)}"
        )
    batch, seq, heads, _ = o1.shape
    for name, t in ((names[1], lse1), (names[3], lse2)):
        if tuple(t.shape) != (batch, heads, seq):
            raise ValueError(
                f"{name} must have shape [batch, heads, seq] = {[batch, heads, seq]} to match "
                f"{names[0]}.shape={tuple(o1.shape)}, got {list(t.shape)}"
            )
    wide = any(t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pick_impl(impl: str, o: Tensor, compute_dtype: torch.dtype) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        use = o.is_cuda and compute_dtype == torch.float32 and _triton_installed()
        return "triton" if use else "torch"
    if impl == "triton":
        if not _triton_installed():
            raise ValueError("impl='triton' needs the triton package, which is not installed")
        if compute_dtype != torch.float32:
            raise ValueError(f"impl='triton' computes in float32 only, inputs need {compute_dtype}")
        if not o.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' on {o.device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported"
            )
    return impl
