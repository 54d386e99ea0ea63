"""Triton kernel for the online-softmax merge (see ``sf_attn.merge``, Note [Stable merge]).

Imported only by ``sf_attn.merge`` when the Triton path is chosen, so importing sf_attn never
needs triton. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Aliasing contract: the outputs may be the first input pair (``out is o1``, ``lse_out is
lse1``), which is how the in-place merge uses it. This is safe because each program owns a
block of (batch, seq, heads) rows and all of their head_dim: it reads a row's lse values and
each o element before writing that element, and writes the lse last.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

# Elements of one [BLOCK_R, BLOCK_D] tile; BLOCK_D covers head_dim up to 128 in one step.
# 2048, 4096 and 8192 timed the same on an H200 ([1, 4096, 24, 128]: ~85 us bf16 out of
# place, ~65 us fp32 in place, vs ~450 us for the torch ops).
_TILE = 4096
_MAX_BLOCK_D = 128


@triton.jit
def _merge_kernel(
    o1_ptr,
    l1_ptr,
    o2_ptr,
    l2_ptr,
    out_ptr,
    lse_out_ptr,
    rows,
    seq,
    heads,
    s_o1_b, s_o1_s, s_o1_h, s_o1_d,
    s_o2_b, s_o2_s, s_o2_h, s_o2_d,
    s_out_b, s_out_s, s_out_h, s_out_d,
    s_l1_b, s_l1_h, s_l1_s,
    s_l2_b, s_l2_h, s_l2_s,
    s_lo_b, s_lo_h, s_lo_s,
    HEAD_DIM: tl.constexpr,  # constexpr: Triton 3.6's interpreter cannot loop to a runtime int
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Rows are (batch, seq, heads) flattened in that order; offsets in int64 for big tensors.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = r < rows
    h = r % heads
    s = (r // heads) % seq
    b = r // (heads * seq)

    l1 = tl.load(l1_ptr + b * s_l1_b + h * s_l1_h + s * s_l1_s, mask=row_ok, other=-float("inf"))
    l2 = tl.load(l2_ptr + b * s_l2_b + h * s_l2_h + s * s_l2_s, mask=row_ok, other=-float("inf"))
    l1 = l1.to(tl.float32)
    l2 = l2.to(tl.float32)
    m = tl.maximum(l1, l2)
    m = tl.where(m == -float("inf"), 0.0, m)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    # in [1, 2], 0 (both empty) or NaN (poisoned: NaN or +inf lse; a NaN that tl.maximum
    # drops still comes back through exp(NaN - m))
    total = w1 + w2
    inv = tl.where(total == 0.0, 0.0, 1.0 / tl.where(total == 0.0, 1.0, total))  # NaN stays
    c1 = (w1 * inv)[:, None]
    c2 = (w2 * inv)[:, None]

    base1 = (b * s_o1_b + s * s_o1_s + h * s_o1_h)[:, None]
    base2 = (b * s_o2_b + s * s_o2_s + h * s_o2_h)[:, None]
    base_out = (b * s_out_b + s * s_out_s + h * s_out_h)[:, None]
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)[None, :]
        ok = row_ok[:, None] & (d < HEAD_DIM)
        x1 = tl.load(o1_ptr + base1 + d * s_o1_d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(o2_ptr + base2 + d * s_o2_d, mask=ok, other=0.0).to(tl.float32)
        # A zero weight drops its block even if the block holds NaN/inf; a NaN one poisons.
        y = tl.where(c1 != 0.0, x1 * c1, 0.0) + tl.where(c2 != 0.0, x2 * c2, 0.0)
        tl.store(out_ptr + base_out + d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=ok)

    lse = m + tl.log(total)  # log(0) = -inf when both blocks are empty
    tl.store(lse_out_ptr + b * s_lo_b + h * s_lo_h + s * s_lo_s, lse, mask=row_ok)


def merge_into(
    o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, out: Tensor, lse_out: Tensor
) -> None:
    """Writes the merge of ``(o1, lse1)`` and ``(o2, lse2)`` into ``(out, lse_out)``.

    Equivalent to ``out[...], lse_out[...] = sf_attn.merge.merge_attention(o1, lse1, o2, lse2,
    impl="torch")``. Shapes/devices are assumed checked by the caller; ``out``/``lse_out`` may
    alias ``o1``/``lse1`` (see the module docstring). ``lse_out`` must be float32.

    Args:
        o1: [batch, seq, heads, head_dim], any float dtype, any strides.
        lse1: [batch, heads, seq].
        o2: Like ``o1``.
        lse2: Like ``lse1``.
        out: Like ``o1``; written in its own dtype.
        lse_out: [batch, heads, seq] float32.
    """
    batch, seq, heads, head_dim = o1.shape
    rows = batch * seq * heads
    if rows == 0:
        return
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(head_dim))
    block_r = max(1, _TILE // block_d)
    grid = (triton.cdiv(rows, block_r),)
    _merge_kernel[grid](
        o1,
        lse1,
        o2,
        lse2,
        out,
        lse_out,
        rows,
        seq,
        heads,
        *o1.stride(),
        *o2.stride(),
        *out.stride(),
        *lse1.stride(),
        *lse2.stride(),
        *lse_out.stride(),
        HEAD_DIM=head_dim,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
