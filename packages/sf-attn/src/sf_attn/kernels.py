"""The built-in attention kernels behind :func:`sf_attn.attention_with_lse`, and their
registration (:func:`sf_attn.backends.register_backend`).

Built in, in the order ``backend="auto"`` tries them:

=================  =====================================================================
``flash-attn``     ``flash_attn.flash_attn_func`` (optional package), CUDA fp16/bf16, no mask
``sdpa-flash``     ``aten._scaled_dot_product_flash_attention``, CUDA fp16/bf16, no mask
``sdpa-efficient`` ``aten._scaled_dot_product_efficient_attention``, CUDA fp16/bf16/fp32, mask
``sdpa-cudnn``     ``aten._scaled_dot_product_cudnn_attention``, CUDA fp16/bf16, no mask
``cpu-flash``      ``aten._scaled_dot_product_flash_attention_for_cpu``, CPU, mask
``reference``      plain math in float32 (float64 for float64 inputs), any device, mask
=================  =====================================================================

``auto`` measures the kernels that can run a class of inputs and takes the fastest correct
one (Note [Kernel choice by measurement] in :mod:`sf_attn.backends`): cuDNN's SDPA, which
has had correctness problems in some PyTorch releases, is used where it passes the probe.

Note [Non-finite inputs] (measured on torch 2.13, CPU with AVX-512; q, k, v in float32,
bfloat16 and float64, against ``F.scaled_dot_product_attention`` with the math and the
default backend)
    A score is +-inf or NaN when q or k holds one (an inf in q makes every score of its row
    +-inf, by the sign of k; an inf in k does that to its key's column). Per query row, SDPA
    (math) gives:

    - NaN if any score is NaN or +inf (``exp(inf - inf)``): an inf or NaN in that q row, a
      NaN in any key of its head, or an inf in a key that scores +inf against this row.
    - 0 if every score is -inf (math SDPA's safe softmax; the default backend agrees). This
      is an empty softmax, so the contract is out = 0, lse = -inf, as for a masked row.
    - otherwise finite; a -inf score just drops its key. inf/NaN in v spread as ``p @ v``.

    ``reference`` follows this (it used to return out = 0 in NaN rows). The CPU flash op
    (``cpu-flash``, also the default SDPA backend on CPU) differs in three ways:

    - a row with a +inf score (and finite others) comes back with lse = +inf once seq_k
      fills one vector of scores (16 in float32/bf16, 8 in float64 here), and with out = 0,
      not NaN, in bf16 (so default SDPA returns 0 there in bf16, where math returns NaN);
    - a row whose scores are all -inf comes back with out = 0 but lse = 0, not -inf (a merge
      would weigh its zeros as real keys);
    - a row whose scores are all NaN (NaN in q) comes back as out = 0, lse = 0 when seq_k is
      shorter than one vector, because the scalar tail of its max skips NaN (default SDPA
      then returns 0 where math returns NaN).

    lse = 0 and lse = +inf are thus the op's sentinels, and ``_cpu_flash`` redoes the (rare)
    rows that carry one, unless the mask empties them, with the reference math; an exact
    lse = 0 of a normal row is recomputed to the same value. NaN/inf in v needs no repair:
    every backend gives SDPA's NaN/inf elements. The merge treats lse = NaN and +inf alike
    (Note [Stable merge]), so backends may return either for a NaN row.

Note [Key-mask dtype on the CPU flash op] (measured on torch 2.13, CPU)
    The op rejects bool masks. A float32 mask is accepted for every query dtype, but with
    float64 queries it gives silently wrong results; a float64 mask is right there. For
    fp16/bf16 queries a float32 mask is more accurate than a mask in the query dtype (finite
    additive values are not rounded). So the mask is passed as float32, or float64 for
    float64 queries. The op also dies with SIGFPE on seq_q == 0 or seq_k == 0, which is one
    reason empty inputs never reach a backend.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import Tensor

from .backends import (
    _HALF,
    AttentionBackend,
    _additive_mask,
    _fully_masked,
    reference_attention,
    register_backend,
)

__all__: list[str] = []  # importing the module registers the kernels


def _bhsd_padded(t: Tensor, multiple: int = 8) -> Tensor:
    """[b, s, h, d] -> [b, h, s, d'] view/copy with d' a multiple of ``multiple`` (zero pad).

    Zero-padding q and k leaves q.k unchanged; padded v columns give output columns that are
    sliced off. The scale must then be passed explicitly (the kernels default to 1/sqrt(d')).
    """
    pad = -t.shape[-1] % multiple
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.transpose(1, 2)


# ---- CUDA backends -------------------------------------------------------------------------


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _needs_sm80(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    return None if major >= 8 else f"needs compute capability >= 8.0, got {major}.{minor}"


def _flash_attn_check(device: torch.device) -> str | None:
    if not _has_module("flash_attn"):
        return "flash_attn package is not installed"
    return _needs_sm80(device)


def _flash_attn(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # optional dependency, imported on first use

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse[..., : q.shape[1]]


def _sdpa_flash_check(device: torch.device) -> str | None:
    if not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no flash attention"
    return _needs_sm80(device)


def _sdpa_flash(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd_padded(q), _bhsd_padded(k), _bhsd_padded(v), 0.0, False, False, scale=scale
    )
    out, lse = res[0], res[1]  # [b, h, s_q, d'], [b, h, s_q] float32
    return out[..., : q.shape[-1]].transpose(1, 2), lse[..., : q.shape[1]]


def _sdpa_efficient(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, seq_q, heads, _ = q.shape
    bias = None
    if key_mask is not None:
        # The kernel wants a 4-D bias in q's dtype with an aligned row stride; pad seq_k to a
        # multiple of 16 in storage, then slice and broadcast (stride 0) over heads and seq_q.
        seq_k = k.shape[1]
        storage = q.new_zeros(batch, 1, 1, seq_k + (-seq_k % 16))
        storage[..., :seq_k] = _additive_mask(key_mask, q.dtype)[:, None, None, :]
        bias = storage[..., :seq_k].expand(batch, heads, seq_q, seq_k)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd_padded(q), _bhsd_padded(k), _bhsd_padded(v), bias, True, scale=scale
    )
    out, lse = res[0], res[1]  # lse: [b, h, s_q rounded up to a multiple of 32] float32
    return out[..., : q.shape[-1]].transpose(1, 2), lse[..., :seq_q]


def _sdpa_cudnn_check(device: torch.device) -> str | None:
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    version = torch.backends.cudnn.version() or 0
    if version < 90000:
        return f"needs cuDNN >= 9.0, got {version}"
    return _needs_sm80(device)


def _sdpa_cudnn(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd_padded(q), _bhsd_padded(k), _bhsd_padded(v), None, True, scale=scale
    )
    out, lse = res[0], res[1]  # lse: [b, h, s_q, 1] float32 ("softmax stats")
    batch, seq_q, heads, head_dim = q.shape
    return out[..., :head_dim].transpose(1, 2), lse.reshape(batch, heads, -1)[..., :seq_q]


# ---- CPU and reference backends --------------------------------------------------------------


def _cpu_flash(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    mask = None
    if key_mask is not None:  # Note [Key-mask dtype on the CPU flash op]
        mask_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = _additive_mask(key_mask, mask_dtype)[:, None, None, :]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    out = out.transpose(1, 2)
    # Note [Non-finite inputs]: rows with the op's sentinels lse = 0 (an all -inf or all NaN
    # row, or a true 0) and +inf (a NaN row, out 0 in bf16) are redone exactly; rows the mask
    # empties are left to the caller (Note [Fully masked rows]).
    suspect = (lse == 0) | (lse == math.inf)  # [batch, heads, seq_q]
    if key_mask is not None:
        suspect &= ~_fully_masked(key_mask)[:, None, None]
    if suspect.any():
        ref_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        rows = suspect.any(1)  # [batch, seq_q]
        for b in rows.any(1).nonzero().flatten().tolist():
            sel = rows[b].nonzero().flatten()
            ref_o, ref_lse = reference_attention(
                q[b : b + 1, sel],
                k[b : b + 1],
                v[b : b + 1],
                scale=scale,
                key_mask=None if key_mask is None else key_mask[b : b + 1],
                dtype=ref_dtype,
            )
            out[b, sel] = ref_o[0].to(out.dtype)
            lse[b, :, sel] = ref_lse[0].to(lse.dtype)
    return out, lse


def _meta(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, seq_q, heads, _ = q.shape
    return torch.empty_like(q), torch.empty(
        batch, heads, seq_q, dtype=torch.float32, device=q.device
    )


def _reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    ref_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return reference_attention(q, k, v, scale=scale, key_mask=key_mask, dtype=ref_dtype)


_CUDA = frozenset({"cuda"})
for _backend in (
    AttentionBackend(
        name="flash-attn",
        fn=_flash_attn,
        devices=_CUDA,
        dtypes=_HALF,
        max_head_dim=256,
        supports_key_mask=False,
        device_check=_flash_attn_check,
    ),
    AttentionBackend(
        name="sdpa-flash",
        fn=_sdpa_flash,
        devices=_CUDA,
        dtypes=_HALF,
        max_head_dim=256,
        supports_key_mask=False,
        device_check=_sdpa_flash_check,
    ),
    AttentionBackend(
        name="sdpa-efficient",
        fn=_sdpa_efficient,
        devices=_CUDA,
        dtypes=_HALF | {torch.float32},
    ),
    AttentionBackend(
        name="sdpa-cudnn",
        fn=_sdpa_cudnn,
        devices=_CUDA,
        dtypes=_HALF,
        max_head_dim=128,
        supports_key_mask=False,
        device_check=_sdpa_cudnn_check,
    ),
    AttentionBackend(name="cpu-flash", fn=_cpu_flash, devices=frozenset({"cpu"})),
    # Shapes only: the simulator runs strategies on meta tensors (sf_attn.sim.layer).
    AttentionBackend(name="meta", fn=_meta, devices=frozenset({"meta"}), measured=False),
    AttentionBackend(name="reference", fn=_reference, measured=False),
):
    register_backend(_backend)
del _backend
