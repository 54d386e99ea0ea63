"""Local (single-process) attention that also returns the log-sum-exp, over a backend registry.

Entry point: :func:`attention_with_lse`. Every sequence-parallel strategy computes blocks of
attention with it and combines the blocks with :func:`sf_attn.merge.merge_attention`, which is
why the log-sum-exp (LSE) is part of the result.

Backends are tried in registration order by ``backend="auto"``; each one states what it can run
(devices, dtypes, head_dim, key-mask support, whether its library/GPU is present), so a backend
that cannot run some inputs is skipped rather than failing inside a kernel. Built in, in order:

=================  =====================================================================
``flash-attn``     ``flash_attn.flash_attn_func`` (optional package), CUDA fp16/bf16, no mask
``sdpa-flash``     ``aten._scaled_dot_product_flash_attention``, CUDA fp16/bf16, no mask
``sdpa-efficient`` ``aten._scaled_dot_product_efficient_attention``, CUDA fp16/bf16/fp32, mask
``sdpa-cudnn``     ``aten._scaled_dot_product_cudnn_attention``, CUDA fp16/bf16, no mask
``cpu-flash``      ``aten._scaled_dot_product_flash_attention_for_cpu``, CPU, mask
``reference``      plain math in float32 (float64 for float64 inputs), any device, mask
=================  =====================================================================

``sdpa-cudnn`` sits after ``sdpa-efficient`` so ``auto`` never reaches it: cuDNN's SDPA has had
correctness problems in some PyTorch releases, so it is used only when named.

Note [Fully masked rows]
    A query row whose keys are all masked has an empty softmax. The contract is out = 0 and
    lse = -inf, which is exactly what a merge needs (such a block contributes nothing). The
    kernels disagree (the CPU flash op returns lse = 0), so :func:`attention_with_lse` fixes
    these rows up after every backend instead of trusting each one. Measured: the CPU flash
    op and ``sdpa-efficient`` (torch 2.11, H200) give out = 0 but lse = 0; cuDNN gives -inf.
    With a per-key mask ``[batch, seq_k]`` a row is fully masked exactly when its whole batch
    element is. Only the mask makes a row "fully masked", and a row the kernel returns with
    lse = NaN or +inf keeps its NaN: SDPA adds the mask to the scores, so a masked key whose
    score is +inf gives -inf + inf = NaN there too (Note [Non-finite inputs]).

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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sf_comm import trace

__all__ = [
    "AttentionBackend",
    "attention_with_lse",
    "available_backends",
    "reference_attention",
    "register_backend",
    "registered_backends",
    "unregister_backend",
]

# fn(q, k, v, scale, key_mask) -> (out [batch, seq_q, heads, head_dim], lse [batch, heads, seq_q]).
# Inputs are validated; key_mask is None or [batch, seq_k] bool/floating. Fully masked rows and
# the output dtypes are fixed up by the caller (Note [Fully masked rows]).
BackendFn = Callable[[Tensor, Tensor, Tensor, float, Tensor | None], tuple[Tensor, Tensor]]
# Returns None when the backend can run on this device, else the reason it cannot.
DeviceCheck = Callable[[torch.device], str | None]

# Score-matrix elements per query chunk in reference_attention (2**25 float64 = 256 MiB).
_REF_CHUNK_ELEMENTS = 1 << 25
_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionBackend:
    """One way of computing attention plus the constraints under which it can run.

    Attributes:
        name: Registry key, e.g. ``"cpu-flash"``.
        fn: The kernel, see ``BackendFn`` above.
        devices: Device types it runs on, e.g. ``{"cuda"}``; empty means any.
        dtypes: Query/key/value dtypes it accepts.
        max_head_dim: Largest head_dim it accepts, or None for no limit.
        supports_key_mask: Whether it takes ``key_mask``.
        device_check: Extra check (library installed, GPU capability), or None.
    """

    name: str
    fn: BackendFn
    devices: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = _FLOATS
    max_head_dim: int | None = None
    supports_key_mask: bool = True
    device_check: DeviceCheck | None = None

    def why_not(self, q: Tensor, key_mask: Tensor | None) -> str | None:
        """Returns None if this backend can run inputs like ``q``/``key_mask``, else the reason."""
        if self.devices and q.device.type not in self.devices:
            return f"needs device type {sorted(self.devices)}, got {q.device.type!r}"
        if q.dtype not in self.dtypes:
            allowed = sorted(str(d) for d in self.dtypes)
            return f"needs dtype in {allowed}, got {q.dtype}"
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            return f"needs head_dim <= {self.max_head_dim}, got {q.shape[-1]}"
        if key_mask is not None and not self.supports_key_mask:
            return "does not support key_mask"
        if self.device_check is not None:
            return self.device_check(q.device)
        return None


_REGISTRY: dict[str, AttentionBackend] = {}  # insertion order is the order "auto" tries
# Set by sf_attn.simulate while it runs: receives (seq_q, seq_k, batch * heads) of every block.
_block_shape_hook: Callable[[int, int, int], None] | None = None


def register_backend(
    backend: AttentionBackend, *, before: str | None = None, replace: bool = False
) -> None:
    """Adds a backend to the registry.

    Args:
        backend: The backend to add.
        before: Name of a registered backend that ``backend`` should be tried before by
            ``backend="auto"``; None appends it (tried last).
        replace: Allow replacing a registered backend of the same name (it keeps its place
            unless ``before`` is given).

    Raises:
        ValueError: If the name is taken and ``replace`` is False, or ``before`` is unknown.
    """
    if backend.name in _REGISTRY and not replace:
        raise ValueError(
            f"attention backend {backend.name!r} is already registered; pass replace=True"
        )
    if before is not None and before not in _REGISTRY:
        raise ValueError(f"before={before!r} is not a registered backend: {list(_REGISTRY)}")
    if before is None or before == backend.name:
        _REGISTRY[backend.name] = backend
        return
    items = [(n, b) for n, b in _REGISTRY.items() if n != backend.name]
    _REGISTRY.clear()
    for name, entry in items:
        if name == before:
            _REGISTRY[backend.name] = backend
        _REGISTRY[name] = entry


def unregister_backend(name: str) -> AttentionBackend:
    """Removes a backend from the registry and returns it.

    Raises:
        ValueError: If no backend of that name is registered.
    """
    if name not in _REGISTRY:
        raise ValueError(f"{name!r} is not a registered attention backend: {list(_REGISTRY)}")
    return _REGISTRY.pop(name)


def registered_backends() -> list[str]:
    """Names of all registered backends, in the order ``backend="auto"`` tries them."""
    return list(_REGISTRY)


def available_backends(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> list[str]:
    """Names of the backends that can run these inputs, in ``auto`` preference order.

    Raises:
        ValueError, TypeError: If the inputs are malformed (see :func:`attention_with_lse`).
    """
    _validate(q, k, v, key_mask)
    return [n for n, b in _REGISTRY.items() if b.why_not(q, key_mask) is None]


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    key_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scaled scores.

    Equivalent to (see :func:`reference_attention`)::

        s = scale * einsum("bqhd,bkhd->bhqk", q, k) + additive(key_mask)[:, None, None, :]
        lse = torch.logsumexp(s, dim=-1)                       # [batch, heads, seq_q]
        out = einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)

    Args:
        q: Queries, [batch, seq_q, heads, head_dim], floating point.
        k: Keys, [batch, seq_k, heads, head_dim], same dtype and device as ``q``.
        v: Values, [batch, seq_k, heads, head_dim], same dtype and device as ``q``.
        scale: Score scale; None means ``1 / sqrt(head_dim)``.
        key_mask: None, or [batch, seq_k] over keys: bool (True = attend) or floating
            additive (0 = attend, -inf = drop, other values are added to the scores; no
            +inf/NaN). Backends that take the mask in the query dtype round finite values.
        backend: A registered backend name, or ``"auto"`` for the first that can run.

    Returns:
        ``(out, lse)``: out [batch, seq_q, heads, head_dim] in q's dtype and lse
        [batch, heads, seq_q] in float32. Rows whose keys are all masked (or seq_k == 0), or
        whose scores are all -inf, give out = 0 and lse = -inf; rows with a NaN or +inf score
        (inf/NaN in q or k) give out = NaN and lse = NaN or +inf, as SDPA's math backend
        (Note [Non-finite inputs]).

    Raises:
        TypeError: If an input is not a tensor or has a dtype that is not allowed.
        ValueError: If shapes/devices do not match, the backend is unknown, or the named
            backend cannot run these inputs (the message says why and which can).
    """
    _validate(q, k, v, key_mask)
    entry = _resolve(backend, q, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, seq_q, heads, _ = q.shape
    if q.numel() == 0 or k.shape[1] == 0:  # kernels crash on empty inputs
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((batch, heads, seq_q), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse
    flops = 4.0 * batch * seq_q * k.shape[1] * heads * q.shape[-1]
    if _block_shape_hook is not None:
        _block_shape_hook(seq_q, k.shape[1], batch * heads)
    with trace.compute_span(
        "attn", flops=flops, nbytes=(q.numel() + k.numel() + v.numel()) * q.element_size()
    ):
        out, lse = entry.fn(q, k, v, scale, key_mask)
    out, lse = out.to(q.dtype), lse.to(torch.float32)
    if key_mask is not None:  # Note [Fully masked rows]
        # [batch, heads, seq_q]; lse < inf is False for NaN and +inf (a NaN row)
        dead = _fully_masked(key_mask)[:, None, None] & (lse < math.inf)
        out = out.masked_fill(dead.transpose(1, 2)[..., None], 0.0)
        lse = lse.masked_fill(dead, -math.inf)
    return out, lse


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    key_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Plain-math attention with LSE, computed in ``dtype``; the ground truth for tests.

    Same contract as :func:`attention_with_lse` except both results are in ``dtype``. Query
    rows are processed in chunks so the score matrix stays bounded in memory.

    Args:
        q: Queries, [batch, seq_q, heads, head_dim].
        k: Keys, [batch, seq_k, heads, head_dim].
        v: Values, [batch, seq_k, heads, head_dim].
        scale: Score scale; None means ``1 / sqrt(head_dim)``.
        key_mask: None or [batch, seq_k], bool or floating additive.
        dtype: Compute and result dtype (float32 or float64).

    Returns:
        ``(out, lse)``: out [batch, seq_q, heads, head_dim], lse [batch, heads, seq_q].

    Raises:
        TypeError, ValueError: As :func:`attention_with_lse`, or for a non-float32/64 ``dtype``.
    """
    _validate(q, k, v, key_mask)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"reference_attention: dtype must be float32 or float64, got {dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qf, kf, vf = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    bias = None if key_mask is None else _additive_mask(key_mask, dtype)[:, None, None, :]
    seq_q, seq_k = qf.shape[2], kf.shape[2]
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, qf.shape[0] * qf.shape[1] * seq_k))
    outs, lses = [], []
    for start in range(0, seq_q, chunk):
        s = torch.matmul(qf[:, :, start : start + chunk], kf.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        m = s.amax(-1, keepdim=True) if seq_k else s.new_zeros(*s.shape[:-1], 1)
        m = m.masked_fill(m == -math.inf, 0.0)  # all scores -inf: p = 0 below, no NaN
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        lses.append((m + torch.log(denom)).squeeze(-1))
        # denom is 0 (every score -inf: empty) or NaN (a NaN or +inf score), which stays NaN
        outs.append(torch.where(denom == 0, 0.0, torch.matmul(p, vf) / denom))
    if not outs:  # seq_q == 0
        return q.to(dtype), q.new_empty(q.shape[0], q.shape[2], 0, dtype=dtype)
    return torch.cat(outs, 2).transpose(1, 2), torch.cat(lses, 2)


def _validate(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            hint = " (add the batch dim, e.g. x.unsqueeze(0))" if t.dim() == 3 else ""
            raise ValueError(
                f"{name} must be 4-D [batch, seq, heads, head_dim], got {t.dim()}-D shape "
                f"{tuple(t.shape)}{hint}"
            )
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must have dtype in {sorted(map(str, _FLOATS))}, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
        for dim, what in ((0, "batch"), (2, "heads"), (3, "head_dim")):
            if t.shape[dim] != q.shape[dim]:
                raise ValueError(
                    f"{name} must have the same {what} (dim {dim}) as q: q.shape="
                    f"{tuple(q.shape)}, {name}.shape={tuple(t.shape)}"
                )
    if v.shape[1] != k.shape[1]:
        raise ValueError(
            f"v must have the same seq_k (dim 1) as k: k.shape={tuple(k.shape)}, "
            f"v.shape={tuple(v.shape)}"
        )
    if q.shape[3] < 1:
        raise ValueError(f"head_dim must be >= 1, got q.shape={tuple(q.shape)}")
    if key_mask is None:
        return
    if not isinstance(key_mask, Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool and not key_mask.is_floating_point():
        raise TypeError(
            f"key_mask must be bool (True = attend) or floating additive, got {key_mask.dtype}"
        )
    expected = (k.shape[0], k.shape[1])
    if tuple(key_mask.shape) != expected:
        raise ValueError(
            f"key_mask must have shape [batch, seq_k] = {list(expected)}, "
            f"got {list(key_mask.shape)}"
        )
    if key_mask.device != q.device:
        raise ValueError(f"key_mask must be on q's device ({q.device}), got {key_mask.device}")


def _resolve(backend: str, q: Tensor, key_mask: Tensor | None) -> AttentionBackend:
    if backend == "auto":
        reasons = []
        for entry in _REGISTRY.values():
            why = entry.why_not(q, key_mask)
            if why is None:
                return entry
            reasons.append(f"{entry.name}: {why}")
        raise ValueError("no attention backend can run these inputs: " + "; ".join(reasons))
    if backend not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {backend!r}; registered: {list(_REGISTRY)} or 'auto'"
        )
    entry = _REGISTRY[backend]
    why = entry.why_not(q, key_mask)
    if why is not None:
        can = [n for n, b in _REGISTRY.items() if b.why_not(q, key_mask) is None]
        raise ValueError(
            f"attention backend {backend!r} cannot run these inputs: {why}. "
            f"Backends that can: {can}; registered: {list(_REGISTRY)}"
        )
    return entry


def _fully_masked(key_mask: Tensor) -> Tensor:
    """[batch, seq_k] bool or additive -> [batch] True where the mask drops every key."""
    if key_mask.dtype == torch.bool:
        return ~key_mask.any(-1)
    return (key_mask == -math.inf).all(-1)


def _additive_mask(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[batch, seq_k] bool or floating -> additive float mask in ``dtype``."""
    if key_mask.dtype == torch.bool:
        zeros = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
        return zeros.masked_fill(~key_mask, -math.inf)
    return key_mask.to(dtype)


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
    # Shapes only: the simulator runs strategies on meta tensors (sf_attn.simulate).
    AttentionBackend(name="meta", fn=_meta, devices=frozenset({"meta"})),
    AttentionBackend(name="reference", fn=_reference),
):
    register_backend(_backend)
del _backend
