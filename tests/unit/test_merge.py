"""Tier 1 (and 3 for CUDA): the online-softmax merge, sf_attn.merge.

The ground truth is attention over all keys at once (float64 reference); merging partial
attentions over a split of the keys must reproduce it. Tolerances:
- float64 partials merge in float64: 1e-12, pure rounding of a few exp/log/mul.
- float32 partials (a real kernel): 1e-5 rel/abs, the kernel's own float32 error (~1e-6)
  plus the merge's handful of float32 ops per element.
- large lse (1e4): float32 spacing at 1e4 is ~1e-3, so lse is checked to 1e-3 absolute,
  while o, which depends only on lse differences (exact), is checked to 1e-6.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sf_attn.merge
from sf_attn.backends import attention_with_lse, reference_attention
from sf_attn.merge import merge_attention, merge_attention_

HAS_TRITON = sf_attn.merge._triton_installed()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
INF = math.inf


def _qkv(batch, seq_q, heads, head_dim, seq_k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g, dtype=dtype)
    k = torch.randn(batch, seq_k, heads, head_dim, generator=g, dtype=dtype)
    v = torch.randn(batch, seq_k, heads, head_dim, generator=g, dtype=dtype)
    return q, k, v


def _chunks(seq_k, cuts):
    bounds = [0, *sorted(cuts), seq_k]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq_q=st.integers(1, 9),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 17),
    seq_k=st.integers(1, 24),
    data=st.data(),
)
def test_merge_of_split_keys_equals_full_attention(batch, seq_q, heads, head_dim, seq_k, data):
    """Catches wrong merge weights (missing max-subtraction, exp(lse) instead of
    exp(lse - lse_total), weights on the wrong axis of [b, s, h] vs [b, h, s]) and NaN
    from empty chunks (cut points may repeat or sit at 0 / seq_k) or fully masked chunks."""
    cuts = data.draw(st.lists(st.integers(0, seq_k), min_size=1, max_size=3))
    masked = data.draw(st.booleans())
    q, k, v = _qkv(batch, seq_q, heads, head_dim, seq_k, seed=data.draw(st.integers(0, 999)))
    key_mask = None
    if masked:
        key_mask = torch.rand(batch, seq_k, generator=torch.Generator().manual_seed(seq_k)) > 0.5
        key_mask[:, -1] = True  # every row keeps a key, so the full result is finite
    full_o, full_lse = reference_attention(q, k, v, key_mask=key_mask)

    acc_o, acc_lse = torch.zeros_like(full_o), torch.full_like(full_lse, -INF)
    for part in _chunks(seq_k, cuts):
        part_mask = None if key_mask is None else key_mask[:, part]
        o, lse = reference_attention(q, k[:, part], v[:, part], key_mask=part_mask)
        merged = merge_attention(acc_o, acc_lse, o, lse)
        swapped = merge_attention(o, lse, acc_o, acc_lse)
        torch.testing.assert_close(merged, swapped, rtol=1e-12, atol=1e-12)
        acc_o, acc_lse = merged
    torch.testing.assert_close(acc_o, full_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc_lse, full_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_loop_with_kernel_partials(dtype):
    """Catches the in-place form mis-updating its accumulators (e.g. writing lse before the
    weights are computed) and the fp32 accumulation losing accuracy over many chunks, using
    partials from the real CPU kernel in float32 and bf16."""
    q, k, v = _qkv(2, 21, 3, 72, 97, dtype=torch.float32, seed=3)
    full_o, full_lse = reference_attention(q, k, v)
    acc_o = torch.zeros(2, 21, 3, 72)
    acc_lse = torch.full((2, 3, 21), -INF)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    for part in _chunks(97, [10, 11, 40, 77]):
        result = merge_attention_(acc_o, acc_lse, *attention_with_lse(qd, kd[:, part], vd[:, part]))
        assert result[0] is acc_o and result[1] is acc_lse
    # bf16 inputs: reference on the rounded inputs; 1e-2 as for a bf16 kernel output.
    if dtype == torch.bfloat16:
        full_o, full_lse = reference_attention(qd, kd, vd)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(acc_o.double(), full_o, rtol=tol, atol=tol)
    torch.testing.assert_close(acc_lse.double(), full_lse, rtol=1e-4, atol=1e-4)


def test_both_empty_and_garbage_in_empty_block():
    """Catches NaN from -inf - -inf when both blocks are empty, and a -inf block whose o holds
    NaN/inf (never written) leaking into the result through 0 * NaN."""
    o1 = torch.randn(1, 2, 2, 4)
    o2 = torch.full((1, 2, 2, 4), math.nan)
    o2[0, 0, 1] = INF
    lse1 = torch.tensor([[[-INF, 0.5], [-INF, -INF]]])
    lse2 = torch.full((1, 2, 2), -INF)
    for o, lse in (merge_attention(o1, lse1, o2, lse2), merge_attention(o2, lse2, o1, lse1)):
        assert not o.isnan().any() and not lse.isnan().any()
        assert torch.equal(lse, lse1)
        expected = torch.where(torch.isinf(lse1).transpose(1, 2)[..., None], 0.0, o1)
        assert torch.equal(o, expected)
    acc_o, acc_lse = o2.clone(), lse2.clone()
    merge_attention_(acc_o, acc_lse, o1, lse1)
    assert torch.equal(acc_o, expected) and torch.equal(acc_lse, lse1)


def test_large_lse_does_not_overflow():
    """Catches a merge that forms exp(lse) directly (inf at lse = 1e4, NaN after division)
    instead of subtracting the max first."""
    o1, o2 = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    lse1 = torch.full((2, 2, 3), 1e4)
    lse2 = lse1 + math.log(3.0)  # weights ~1/4 and ~3/4
    # lse2 is rounded to float32 spacing at 1e4 (~1e-3), but lse2 - lse1 is exact, so the
    # exact weights follow from it; the merge must reproduce them to float32 precision.
    diff = (lse2 - lse1).double().transpose(1, 2)[..., None]
    w2 = torch.sigmoid(diff)
    o, lse = merge_attention(o1, lse1, o2, lse2)
    torch.testing.assert_close(o.double(), (1 - w2) * o1 + w2 * o2, rtol=1e-6, atol=1e-6)
    expected_lse = lse1.double() + torch.nn.functional.softplus(diff[..., 0].transpose(1, 2))
    torch.testing.assert_close(lse.double(), expected_lse, rtol=0, atol=1e-3)
    o, lse = merge_attention(o1, -lse1, o2, lse1)  # exp(-2e4) underflows to exactly 0
    assert torch.equal(o, o2) and torch.equal(lse, lse1)


def test_output_dtypes():
    """Catches the merge returning float32 o for bf16 inputs (callers expect o1's dtype),
    accumulating in bf16, or rounding float64 inputs through float32."""
    o1, o2 = torch.randn(1, 3, 2, 8).bfloat16(), torch.randn(1, 3, 2, 8).bfloat16()
    lse1, lse2 = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    o, lse = merge_attention(o1, lse1, o2, lse2)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    c1 = torch.sigmoid(lse1 - lse2).transpose(1, 2)[..., None]  # exact two-block weight
    expected = (c1 * o1.float() + (1 - c1) * o2.float()).bfloat16()
    torch.testing.assert_close(o, expected, rtol=0, atol=1e-2)  # one bf16 rounding
    o, lse = merge_attention(o1.double(), lse1.double(), o2.double(), lse2.double())
    assert o.dtype == lse.dtype == torch.float64


def test_bad_inputs_are_named():
    """Catches shape mistakes (lse in [b, s, h] instead of [b, h, s]) being broadcast
    silently, and impl/accumulator misuse giving obscure errors."""
    o = torch.zeros(2, 3, 4, 5)
    lse = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"lse2 must have shape \[batch, heads, seq\]"):
        merge_attention(o, lse, o, lse.transpose(1, 2))
    with pytest.raises(ValueError, match=r"o2 must have the shape of o1"):
        merge_attention(o, lse, o[:, :2], lse)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        merge_attention(o, lse, o, lse, impl="cuda")
    with pytest.raises(TypeError, match=r"acc_o and acc_lse must be.*bfloat16"):
        merge_attention_(o.bfloat16(), lse, o, lse)
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
            merge_attention(o, lse, o, lse, impl="triton")


# The Triton kernel under the interpreter. TRITON_INTERPRET must be set before triton is
# imported, so this runs in a fresh interpreter process; it compares against impl="torch".
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import math, warnings
    import torch
    from sf_attn.merge import merge_attention, merge_attention_
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy log(0) in masked-off rows
    g = torch.Generator().manual_seed(0)
    INF = math.inf
    for batch, seq, heads, head_dim in [(2, 5, 3, 72), (1, 3, 2, 200), (1, 1, 1, 1), (3, 7, 1, 16)]:
        shape = (batch, seq, heads, head_dim)
        o1 = torch.randn(shape, generator=g)
        o2 = torch.randn(batch, heads, seq, head_dim, generator=g).transpose(1, 2)  # strided
        lse1 = torch.randn(batch, heads, seq, generator=g) * 3
        lse2 = torch.randn(batch, seq, heads, generator=g).transpose(1, 2) + 1e4 * (batch == 3)
        lse1[0, 0, 0] = -INF
        lse2[0, 0, :1] = -INF  # row (0, 0, 0) has both blocks empty
        o2[0, 0, 0] = math.nan
        want = merge_attention(o1, lse1, o2, lse2, impl="torch")
        got = merge_attention(o1, lse1, o2, lse2, impl="triton")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got[1][0, 0, 0] == -INF and torch.equal(got[0][0, 0, 0], torch.zeros(head_dim))
        acc_o, acc_lse = o1.clone(), lse1.clone()
        merge_attention_(acc_o, acc_lse, o2, lse2, impl="triton")
        torch.testing.assert_close((acc_o, acc_lse), want, rtol=1e-6, atol=1e-6)
    print("interpreter-ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_under_interpreter():
    """Catches kernel bugs without a GPU: wrong stride use (non-contiguous o2, lse2), head_dim
    tails (72, 1) and a second head_dim block (200 > 128), the -inf/NaN handling, large lse,
    and the in-place form's aliasing of outputs and first inputs. fp32 only: the interpreter
    mishandles bf16."""
    src = str(Path(sf_attn.merge.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "interpreter-ok" in proc.stdout, proc.stdout + proc.stderr


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_on_cuda(dtype):
    """Catches the compiled kernel differing from the torch merge on a GPU (the interpreter
    does not compile, so codegen, bf16/fp16 loads/stores and int64 offsets are only checked
    here), and `auto` not choosing the kernel on CUDA."""
    g = torch.Generator().manual_seed(0)
    o1 = torch.randn(2, 333, 5, 72, generator=g).to("cuda", dtype)
    o2 = torch.randn(2, 5, 333, 72, generator=g).to("cuda", dtype).transpose(1, 2)
    lse1 = (torch.randn(2, 5, 333, generator=g) * 5).cuda()
    lse2 = (torch.randn(2, 5, 333, generator=g) * 5).cuda()
    lse1[0, :, :7] = -INF
    lse2[0, :, 3:9] = -INF
    want = merge_attention(o1, lse1, o2, lse2, impl="torch")
    got = merge_attention(o1, lse1, o2, lse2)
    assert "sf_attn._triton_merge" in sys.modules
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # one rounding of o to the half dtype
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    acc_o, acc_lse = o1.to(torch.float32, copy=True), lse1.clone()
    merge_attention_(acc_o, acc_lse, o2, lse2)
    want32 = merge_attention(o1.float(), lse1, o2, lse2, impl="torch")
    torch.testing.assert_close((acc_o, acc_lse), want32, rtol=1e-6, atol=1e-6)
