"""Tier 1: local attention with LSE (sf_attn.backends) against a float64 reference.

Tolerances (used everywhere below, compared against float64 math on the *same* rounded
inputs, so only the kernel's own arithmetic is measured):
- float32: 1e-5 rel/abs. Scores, exp and the P.V sums are float32 with O(1) values; the
  observed error is ~1e-6, the slack covers other kernels' summation orders.
- bf16/fp16: 1e-2 rel/abs on out. The output alone is rounded to 8 (bf16) mantissa bits,
  ~4e-3 relative, and kernels round the probabilities to the input dtype before P.V.
- lse is float32 even for half inputs (scores accumulate in float32), so 1e-4 rel/abs for
  half inputs (1e-5 for float32/float64 inputs): anything coarser means the wrong scale
  or a wrong softmax denominator.
- float64 inputs: out 1e-10, lse float32-level (1e-6), since lse is returned in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_attn import backends
from sf_attn.backends import (
    AttentionBackend,
    attention_with_lse,
    available_backends,
    reference_attention,
    register_backend,
    registered_backends,
    unregister_backend,
)

OUT_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}
LSE_TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
CPU_BACKENDS = ["cpu-flash", "reference"]
CUDA_BACKENDS = ["flash-attn", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"]
# (batch, seq_q, heads, head_dim, seq_k): odd head_dims and lengths that divide nothing.
SHAPES = [(2, 37, 3, 72, 53), (1, 5, 2, 40, 129), (1, 1, 1, 8, 1), (2, 19, 4, 128, 7)]

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qkv(shape, dtype, device="cpu", seed=0):
    batch, seq_q, heads, head_dim, seq_k = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g)
    k = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    v = torch.randn(batch, seq_k, heads, head_dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _key_mask(batch, seq_k, kind, device="cpu", seed=1):
    """Random key mask with batch element 0 fully masked (when batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, seq_k, generator=g) > 0.3
    keep[:, 0] = True
    if batch > 1:
        keep[0] = False
    if kind == "bool":
        return keep.to(device)
    bias = torch.randn(batch, seq_k, generator=g).masked_fill(~keep, -math.inf)
    return bias.to(device)


def _check_against_reference(q, k, v, backend, *, key_mask=None, scale=None):
    out, lse = attention_with_lse(q, k, v, backend=backend, key_mask=key_mask, scale=scale)
    ref_out, ref_lse = reference_attention(q, k, v, key_mask=key_mask, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any() and not lse.isnan().any()
    tol, lse_tol = OUT_TOL[q.dtype], LSE_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=lse_tol, atol=lse_tol)
    return out, lse


def _skip_unless_can_run(backend, q, k, v, key_mask=None):
    if backend not in available_backends(q, k, v, key_mask):
        pytest.skip(f"{backend} cannot run {q.dtype} on {q.device.type} here")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_matches_float64_reference(backend, dtype, shape):
    """Catches a wrong layout (BSHD vs BHSD), wrong default scale, lse in log2 or without the
    scale, or lse of the wrong shape/order, for every CPU backend and dtype."""
    q, k, v = _qkv(shape, dtype)
    _skip_unless_can_run(backend, q, k, v)
    _check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_mask_and_fully_masked_rows(backend, dtype, kind):
    """Catches an inverted bool mask, finite additive values ignored or rounded away, the CPU
    flash op's wrong results for float64 queries with a float32 mask, and fully masked rows
    returning NaN or lse = 0 instead of out = 0, lse = -inf."""
    q, k, v = _qkv((3, 11, 2, 40, 23), dtype)
    key_mask = _key_mask(3, 23, kind)
    out, lse = _check_against_reference(q, k, v, backend, key_mask=key_mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(lse[0], torch.full_like(lse[0], -math.inf))
    assert torch.isfinite(lse[1:]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale_is_inside_lse(backend):
    """Catches a backend that ignores `scale` or returns lse of unscaled scores."""
    q, k, v = _qkv((1, 9, 2, 24, 13), torch.float32)
    _check_against_reference(q, k, v, backend, scale=0.37)


def test_reference_matches_torch_math():
    """Catches a bug in the reference itself, by an independent route: torch's math SDPA for
    out and torch.logsumexp on explicit scores for lse, with a mask and a dead row."""
    q, k, v = _qkv((2, 7, 3, 16, 10), torch.float64)
    key_mask = _key_mask(2, 10, "additive")
    out, lse = reference_attention(q, k, v, key_mask=key_mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0 + key_mask[:, None, None, :]
    live = slice(1, 2)  # batch 0 is fully masked: SDPA gives NaN there, the contract gives 0
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[live].transpose(1, 2),
        k[live].transpose(1, 2),
        v[live].transpose(1, 2),
        attn_mask=key_mask[live, None, None, :],
    ).transpose(1, 2)
    torch.testing.assert_close(out[live], sdpa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_reference_float32_dtype_and_chunking(monkeypatch):
    """Catches reference_attention ignoring `dtype` or its query-chunk loop dropping or
    misplacing rows (the chunk budget is shrunk so 37 rows take 5 chunks, the last short)."""
    q, k, v = _qkv((2, 37, 3, 8, 11), torch.float32)
    out64, lse64 = reference_attention(q, k, v)
    monkeypatch.setattr(backends, "_REF_CHUNK_ELEMENTS", 2 * 3 * 11 * 8)
    out32, lse32 = reference_attention(q, k, v, dtype=torch.float32)
    chunked64 = reference_attention(q, k, v)
    torch.testing.assert_close(chunked64, (out64, lse64), rtol=1e-12, atol=1e-12)
    assert out32.dtype == lse32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse32.double(), lse64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    """Catches a backend that assumes contiguous BSHD memory (e.g. uses .view): inputs here
    are transposed views of [batch, heads, seq, head_dim] buffers."""
    q, k, v = (
        t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(SHAPES[0], torch.float32)
    )
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sequences(backend):
    """Catches empty inputs reaching the CPU flash op (it dies with SIGFPE on seq_k == 0 or
    seq_q == 0) and seq_k == 0 not giving out = 0, lse = -inf."""
    q, k, v = _qkv((2, 5, 3, 8, 0), torch.float32)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.equal(lse, torch.full((2, 3, 5), -math.inf))
    q, k, v = _qkv((2, 0, 3, 8, 4), torch.float32)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert out.shape == (2, 0, 3, 8) and lse.shape == (2, 3, 0)


def test_auto_picks_first_available_backend():
    """Catches `auto` skipping the fast CPU op for the reference, or choosing a CUDA backend
    on CPU tensors."""
    q, k, v = _qkv(SHAPES[0], torch.float32)
    assert available_backends(q, k, v) == ["cpu-flash", "reference"]
    auto = attention_with_lse(q, k, v)
    named = attention_with_lse(q, k, v, backend="cpu-flash")
    assert torch.equal(auto[0], named[0]) and torch.equal(auto[1], named[1])


def test_named_backend_that_cannot_run_says_why():
    """Catches a CUDA-only backend being run on CPU (an obscure kernel error instead), and an
    error message that does not name the reason and the usable backends."""
    q, k, v = _qkv(SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match=r"'sdpa-flash' cannot run.*cuda.*cpu-flash"):
        attention_with_lse(q, k, v, backend="sdpa-flash")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*reference"):
        attention_with_lse(q, k, v, backend="nope")


@pytest.mark.parametrize(
    ("shapes", "error", "pattern"),
    [
        (((1, 2, 3), (1, 2, 2, 3), (1, 2, 2, 3)), ValueError, r"q must be 4-D.*3-D.*\(1, 2, 3\)"),
        (((1, 2, 2, 3), (1, 2, 2, 3, 1), (1, 2, 2, 3)), ValueError, r"k must be 4-D.*5-D"),
        (((1, 2, 2, 3), (2, 2, 2, 3), (2, 2, 2, 3)), ValueError, r"k must have the same batch"),
        (((1, 2, 2, 3), (1, 2, 4, 3), (1, 2, 2, 3)), ValueError, r"k must have the same heads"),
        (((1, 2, 2, 3), (1, 2, 2, 3), (1, 2, 2, 5)), ValueError, r"v must have the same head_d"),
        (((1, 2, 2, 3), (1, 4, 2, 3), (1, 5, 2, 3)), ValueError, r"v must have the same seq_k"),
    ],
)
def test_bad_shapes_are_named(shapes, error, pattern):
    """Catches malformed q/k/v reaching a kernel (which fails obscurely or broadcasts
    silently) instead of an error naming the argument and the shape found."""
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(error, match=pattern):
        attention_with_lse(q, k, v)


def test_bad_dtypes_and_masks_are_named():
    """Catches mixed dtypes, integer inputs, and wrong key masks (shape, dtype) slipping
    through to a kernel, and messages that do not say what is allowed."""
    q, k, v = _qkv((2, 3, 2, 8, 5), torch.float32)
    with pytest.raises(TypeError, match=r"v.dtype must equal q.dtype.*bfloat16"):
        attention_with_lse(q, k, v.bfloat16())
    with pytest.raises(TypeError, match=r"q must have dtype in .*int64"):
        attention_with_lse(q.long(), k, v)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor"):
        attention_with_lse(q, "k", v)
    with pytest.raises(ValueError, match=r"key_mask must have shape \[batch, seq_k\] = \[2, 5\]"):
        attention_with_lse(q, k, v, key_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_mask must be bool.*int64"):
        attention_with_lse(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.long))


def test_register_backend_plugs_in_and_orders():
    """Catches a registry where a new backend cannot be placed before built-ins or named,
    duplicate names silently overwrite, or unregistering leaves the order changed."""
    before = registered_backends()
    calls = []

    def fake(q, k, v, scale, key_mask):
        calls.append(scale)
        return reference_attention(q, k, v, scale=scale, key_mask=key_mask, dtype=torch.float32)

    custom = AttentionBackend(name="custom", fn=fake, devices=frozenset({"cpu"}))
    register_backend(custom, before="cpu-flash")
    try:
        assert registered_backends().index("custom") == before.index("cpu-flash")
        q, k, v = _qkv(SHAPES[1], torch.float32)
        assert available_backends(q, k, v)[0] == "custom"
        _check_against_reference(q, k, v, "custom")
        assert calls == [1 / math.sqrt(40)]
        with pytest.raises(ValueError, match="already registered"):
            register_backend(custom)
        with pytest.raises(ValueError, match="not a registered backend"):
            register_backend(custom, before="missing", replace=True)
    finally:
        unregister_backend("custom")
    assert registered_backends() == before


def _wrong(q, k, v, scale, key_mask):
    out, lse = reference_attention(q, k, v, scale=scale, key_mask=key_mask, dtype=torch.float32)
    return out + 0.01, lse  # fast enough, and wrong by far more than float32 allows


def _slow(q, k, v, scale, key_mask):
    import time

    time.sleep(0.02)
    return reference_attention(q, k, v, scale=scale, key_mask=key_mask, dtype=torch.float32)


def test_auto_takes_the_fastest_correct_kernel(monkeypatch, caplog):
    """Catches ``auto`` taking a kernel by registration order (a kernel broken in this build
    would be used if it came first) or a slower one when a faster correct one exists, and a
    forced kernel (SF_ATTN_BACKEND) being ignored (Note [Kernel choice by measurement])."""
    import logging

    from sf_attn.backends import choose_kernel

    monkeypatch.delenv("SF_ATTN_BACKEND", raising=False)
    wrong = AttentionBackend(name="wrong-first", fn=_wrong, devices=frozenset({"cpu"}))
    slow = AttentionBackend(name="slow-right", fn=_slow, devices=frozenset({"cpu"}))
    register_backend(wrong, before="cpu-flash")
    register_backend(slow, before="cpu-flash")
    try:
        q, k, v = _qkv(SHAPES[1], torch.float32)
        with caplog.at_level(logging.INFO, logger="sf_attn.backends"):
            assert choose_kernel(q, None).name == "cpu-flash"
        assert "wrong-first rejected (wrong result)" in caplog.text
        assert "slow-right" in caplog.text and "cpu-flash" in caplog.text
        _check_against_reference(q, k, v, "auto")
        monkeypatch.setenv("SF_ATTN_BACKEND", "slow-right")
        assert choose_kernel(q, None).name == "slow-right"
        monkeypatch.setenv("SF_ATTN_BACKEND", "no-such-kernel")
        with pytest.raises(ValueError, match="SF_ATTN_BACKEND='no-such-kernel'"):
            choose_kernel(q, None)
    finally:
        unregister_backend("wrong-first")
        unregister_backend("slow-right")


def test_auto_without_a_correct_fast_kernel_takes_the_correct_one(monkeypatch):
    """Catches a correctness gate that lets a wrong kernel through when it is the only other
    choice: with the CPU flash op gone, ``auto`` must take the slow correct kernel."""
    from sf_attn.backends import choose_kernel

    monkeypatch.delenv("SF_ATTN_BACKEND", raising=False)
    flash = unregister_backend("cpu-flash")
    register_backend(AttentionBackend(name="wrong", fn=_wrong, devices=frozenset({"cpu"})))
    register_backend(AttentionBackend(name="slow-right", fn=_slow, devices=frozenset({"cpu"})))
    try:
        q, _, _ = _qkv(SHAPES[1], torch.float32)
        assert choose_kernel(q, None).name == "slow-right"
    finally:
        unregister_backend("wrong")
        unregister_backend("slow-right")
        register_backend(flash, before="meta")
    assert "cpu-flash" in registered_backends()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq_q=st.integers(1, 17),
    seq_k=st.integers(1, 33),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 80),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_flash_property(batch, seq_q, seq_k, heads, head_dim, masked, seed):
    """Catches shape-dependent bugs in the CPU path (tails of its internal blocks, tiny or
    odd head_dim, seq 1) across random shapes, with and without a random key mask."""
    q, k, v = _qkv((batch, seq_q, heads, head_dim, seq_k), torch.float32, seed=seed)
    key_mask = _key_mask(batch, seq_k, "bool", seed=seed) if masked else None
    _check_against_reference(q, k, v, "cpu-flash", key_mask=key_mask)


# ---- tier 3: CUDA backends --------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 72, 36, 128])  # 36: padded to 40 for the kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_matches_float64_reference(backend, dtype, head_dim):
    """Catches a wrong LSE layout (efficient pads seq_q to a multiple of 32, cuDNN returns a
    trailing dim), head_dim padding that changes the default scale, or a predicate that
    claims support for inputs its kernel rejects."""
    q, k, v = _qkv((2, 77, 3, head_dim, 45), dtype, device="cuda")
    _skip_unless_can_run(backend, q, k, v)
    _check_against_reference(q, k, v, backend)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_key_mask(dtype, kind):
    """Catches a bias the efficient kernel misreads (alignment, broadcast strides) and
    fully masked rows giving NaN on CUDA; `auto` must pick a backend that takes masks."""
    q, k, v = _qkv((3, 33, 2, 36, 50), dtype, device="cuda")
    key_mask = _key_mask(3, 50, kind, device="cuda")
    if kind == "additive" and dtype != torch.float32:
        key_mask = key_mask.to(dtype).float()  # the kernel takes the bias in q's dtype
    out, lse = _check_against_reference(q, k, v, "auto", key_mask=key_mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert (lse[0] == -math.inf).all()
