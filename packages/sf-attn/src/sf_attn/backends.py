"""Local (single-process) attention that also returns the log-sum-exp, over a backend registry.

Entry point: :func:`attention_with_lse`. Every sequence-parallel strategy computes blocks of
attention with it and combines the blocks with :func:`sf_attn.merge.merge_attention`, which is
why the log-sum-exp (LSE) is part of the result.

Each backend states what it can run (devices, dtypes, head_dim, key-mask support, whether
its library/GPU is present), so one that cannot run some inputs is never called on them;
``backend="auto"`` measures the ones that can (Note [Kernel choice by measurement]). The
built-in ones live in :mod:`sf_attn.kernels` (registered when ``sf_attn`` is imported).

Note [Kernel choice by measurement]
    The first time a class of inputs is seen (device, dtype, head_dim, with a key mask or
    not), ``auto`` runs every registered kernel that can run it on a small probe, rejects any
    whose output differs from float64 attention by more than the dtype's tolerance (a kernel
    that is wrong in this torch build or on this device is never used, whatever its speed),
    and keeps the fastest of the rest; the choice is cached for the process and logged in
    one line. ``SF_ATTN_BACKEND=name`` (or ``backend=name``) forces one. The plain float
    reference and the simulator's meta kernel are not measured: they run only when named or
    when nothing else can.

    Ranks must run the same kernel (replicated results such as text outputs are assembled
    from several ranks, and kernels round differently), so ``parallel_attention`` agrees
    once per class and job (:func:`agree_on_kernel`): every rank measures, the times are gathered, and
    the kernel with the best slowest-rank time wins on every rank.

    On the H200 here (torch 2.11, bf16, with the log-sum-exp) cuDNN ran 1.9x faster than
    FlashAttention-2 at the same error (results/, REFERENCES.md); on CPU the flash op is the
    only measured kernel, so nothing is timed there.

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

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import sf_comm
from sf_comm import trace

log = logging.getLogger(__name__)

__all__ = [
    "AttentionBackend",
    "agree_on_kernel",
    "attention_with_lse",
    "available_backends",
    "choose_kernel",
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
        measured: Whether ``auto`` measures it against the others (Note [Kernel choice by
            measurement]); False for references that run only when named or when nothing
            else can.
    """

    name: str
    fn: BackendFn
    devices: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = _FLOATS
    max_head_dim: int | None = None
    supports_key_mask: bool = True
    device_check: DeviceCheck | None = None
    measured: bool = True

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


# insertion order: table order, and "auto"'s order where nothing is measured (a tie, or
# only unmeasured kernels can run)
_REGISTRY: dict[str, AttentionBackend] = {}


def register_backend(
    backend: AttentionBackend, *, before: str | None = None, replace: bool = False
) -> None:
    """Adds a backend to the registry.

    Args:
        backend: The backend to add.
        before: Name of a registered backend that ``backend`` should come before in the
            registry's order; None appends it.
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
    _forget_choices()
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
    _forget_choices()
    return _REGISTRY.pop(name)


def registered_backends() -> list[str]:
    """Names of all registered backends, in registration order."""
    return list(_REGISTRY)


def available_backends(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> list[str]:
    """Names of the backends that can run these inputs, in registration order.

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
        return choose_kernel(q, key_mask)
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


# ---- kernel choice (Note [Kernel choice by measurement]) ------------------------------------

# Max |out - float64 reference| a kernel may show on the probe (unit-scale random inputs;
# outputs are averages of unit-scale values): a few ulps of the dtype at that scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_PROBE = {"cuda": (1, 1024, 8), "cpu": (1, 256, 4)}  # batch, tokens, heads of the probe
_REPEATS = 5

Class = tuple[str, int | None, torch.dtype, int, bool]  # device, index, dtype, head_dim, mask
_TIMES: dict[Class, dict[str, float]] = {}  # probe seconds per kernel (inf: rejected)
_CHOSEN: dict[Class, str] = {}
_AGREED: set[Class] = set()


def _input_class(q: Tensor, masked: bool) -> Class:
    return (q.device.type, q.device.index, q.dtype, q.shape[-1], masked)


def _forced() -> str | None:
    """The kernel ``SF_ATTN_BACKEND`` names, if set."""
    return os.environ.get("SF_ATTN_BACKEND") or None


def choose_kernel(q: Tensor, key_mask: Tensor | None) -> AttentionBackend:
    """The kernel ``backend="auto"`` runs for inputs like ``q``/``key_mask`` on this process
    (Note [Kernel choice by measurement]).

    Raises:
        ValueError: no registered kernel can run these inputs (each one's reason listed), or
            ``SF_ATTN_BACKEND`` names one that cannot.
    """
    kernels = _REGISTRY
    name = _forced()
    if name is not None:
        if name not in kernels:
            raise ValueError(
                f"SF_ATTN_BACKEND={name!r} is not a registered attention backend: {list(kernels)}"
            )
        return kernels[name]
    key = _input_class(q, key_mask is not None)
    if key not in _CHOSEN:
        times = _probe_times(q, key_mask)
        _CHOSEN[key] = _fastest(times) or _first_runnable(q, key_mask)
    return kernels[_CHOSEN[key]]


def _probe_times(q: Tensor, key_mask: Tensor | None) -> dict[str, float]:
    """Probe seconds of every measured kernel that can run this class (inf where its result
    is wrong); measured once per class and process."""
    key = _input_class(q, key_mask is not None)
    if key in _TIMES:
        return _TIMES[key]
    candidates = [
        entry
        for entry in _REGISTRY.values()
        if entry.measured and entry.why_not(q, key_mask) is None
    ]
    times: dict[str, float] = {}
    if len(candidates) == 1:
        times[candidates[0].name] = 0.0  # nothing to choose between
    elif candidates:
        times = _measure(candidates, q, key_mask is not None)
        ranked = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(times.items(), key=_by_time))
        log.info(
            "sf_attn: attention kernels for %s %s head_dim=%d%s: %s",
            q.device,
            str(q.dtype).removeprefix("torch."),
            q.shape[-1],
            " masked" if key_mask is not None else "",
            ranked.replace(" inf ms", " rejected (wrong result)"),
        )
    _TIMES[key] = times
    return times


def agree_on_kernel(ctx: sf_comm.CommContext, q: Tensor, masked: bool) -> None:
    """Make every rank of ``ctx`` run the same kernel for this class (collective, once per
    class): the kernel whose slowest-rank probe time is the best (Note [Kernel choice by
    measurement]). A no-op with ``SF_ATTN_BACKEND`` set or for a world of one."""
    key = _input_class(q, masked)
    if _forced() is not None or key in _AGREED:
        return
    mask = torch.ones(1, 1, dtype=torch.bool, device=q.device) if masked else None
    probe = q.new_empty(1, 1, 1, q.shape[-1])
    times = _probe_times(probe, mask)
    names = list(_REGISTRY)  # the same list on every rank (same registrations)
    mine = torch.tensor([times.get(n, math.inf) for n in names], dtype=torch.float64)
    if ctx.world_size > 1:
        with trace.untraced():  # one-time set-up, not part of any layer's schedule
            table = sf_comm.all_gather(ctx, ctx.group("world"), mine.to(ctx.device)).wait()
        mine = torch.stack(table).cpu().max(dim=0).values
    best = min(range(len(names)), key=lambda i: float(mine[i]))
    if math.isfinite(float(mine[best])):
        _CHOSEN[key] = names[best]
    else:  # no measured kernel runs everywhere: the registry order decides, as before
        _CHOSEN[key] = _first_runnable(probe, mask)
    _AGREED.add(key)


def _measure(candidates: list[AttentionBackend], like: Tensor, masked: bool) -> dict[str, float]:
    batch, seq, heads = _PROBE.get(like.device.type, _PROBE["cuda"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, seq, heads, like.shape[-1], generator=g).to(like.device, like.dtype)
        for _ in range(3)
    )
    mask = None
    if masked:  # a quarter of the keys masked, no row empty
        mask = (torch.arange(seq) % 4 != 3).expand(batch, seq).to(like.device)
    ref, _ = reference_attention(q, k, v, key_mask=mask, dtype=torch.float64)
    scale = like.shape[-1] ** -0.5
    times = {}
    for entry in candidates:
        try:
            out, _ = entry.fn(q, k, v, scale, mask)
            wrong = float((out.double() - ref).abs().max()) > TOLERANCE[like.dtype]
        except Exception as exc:  # a kernel that fails on the probe is as good as wrong
            log.warning("sf_attn: attention kernel %s failed its probe: %s", entry.name, exc)
            wrong = True
        times[entry.name] = math.inf if wrong else _seconds(entry, q, k, v, scale, mask)
    return times


def _seconds(
    entry: AttentionBackend, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None
) -> float:
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    best = math.inf
    for _ in range(_REPEATS):
        sync()
        start = time.perf_counter()
        entry.fn(q, k, v, scale, mask)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _forget_choices() -> None:
    """The registry changed: measure again (collectively again, in parallel_attention)."""
    _TIMES.clear()
    _CHOSEN.clear()
    _AGREED.clear()


def _by_time(item: tuple[str, float]) -> Any:
    return item[1]


def _fastest(times: dict[str, float]) -> str | None:
    finite = {n: t for n, t in times.items() if math.isfinite(t)}
    return min(finite, key=finite.__getitem__) if finite else None


def _first_runnable(q: Tensor, key_mask: Tensor | None) -> str:
    """The first registered kernel that can run these inputs (what ``auto`` took before
    kernels were measured); ValueError listing every kernel's reason if none can."""
    reasons = []
    for entry in _REGISTRY.values():
        why = entry.why_not(q, key_mask)
        if why is None:
            return entry.name
        reasons.append(f"{entry.name}: {why}")
    raise ValueError("no attention backend can run these inputs: " + "; ".join(reasons))
