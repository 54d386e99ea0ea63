"""Local (single-process) attention that also returns the log-sum-exp, over a backend registry.

Entry point: :func:`attention_with_lse`. Every sequence-parallel strategy computes blocks of
attention with it and combines the blocks with :func:`sf_attn.merge.merge_attention`, which is
why the log-sum-exp (LSE) is part of the result.

Backends are tried in registration order by ``backend="auto"``; each one states what it can run
(devices, dtypes, head_dim, key-mask support, whether its library/GPU is present), so a backend
that cannot run some inputs is skipped rather than failing inside a kernel. The built-in ones
live in :mod:`sf_attn.kernels` (registered when ``sf_attn`` is imported).

Note [Fully masked rows]
    A query row whose keys are all masked has an empty softmax. The contract is out = 0 and
    lse = -inf, which is exactly what a merge needs (such a block contributes nothing). The
    kernels disagree (the CPU flash op returns lse = 0), so :func:`attention_with_lse` fixes
    these rows up after every backend instead of trusting each one. Measured: the CPU flash
    op and ``sdpa-efficient`` (torch 2.11, H200) give out = 0 but lse = 0; cuDNN gives -inf.
    With a per-key mask ``[batch, seq_k]`` a row is fully masked exactly when its whole batch
    element is. Only the mask makes a row "fully masked", and a row the kernel returns with
    lse = NaN or +inf keeps its NaN: SDPA adds the mask to the scores, so a masked key whose
    score is +inf gives -inf + inf = NaN there too (Note [Non-finite inputs] in
    :mod:`sf_attn.kernels`).
"""

from __future__ import annotations

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
    with trace.compute_span(
        "attn",
        flops=flops,
        nbytes=(q.numel() + k.numel() + v.numel()) * q.element_size(),
        shape=(seq_q, k.shape[1], batch * heads),
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
