"""Fault tests: +inf, -inf and NaN in q or k give single-device SDPA's answer, NaN included.

Single-device SDPA on the gathered sequence is the contract: a row whose scores hold +inf
(or NaN) is NaN there, and every strategy must return NaN in exactly those rows and the same
finite numbers elsewhere. The reference is ``F.scaled_dot_product_attention`` with the math
backend in float64 (the IEEE answer); the default CPU backend agrees with it at the lengths
used here but hides a NaN query row when seq_k is shorter than one SIMD vector (see
Note [Non-finite inputs] in ``sf_attn.backends``), which is why math is the reference.

Tiers: 1 (merge rule, torch and the Triton kernel under the interpreter; local kernels against
SDPA) and 2 (every strategy on CPU ranks, both transports, with and without joint text).

Tolerances: finite values as in tests/multiproc/test_parallel_attention.py (float32: 2e-5, the
float32 kernels' and merges' rounding against float64; dropping a -inf key changes nothing).
The merge rows compared against a float64 merge: 1e-6, a handful of float32 ops on O(1) data.
NaN masks are compared exactly (``torch.equal``), since a NaN is either there or not.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sf_attn
import sf_attn.merge
import sf_comm
from sf_attn.backends import attention_with_lse
from sf_attn.merge import merge_attention, merge_attention_
from sf_comm.launch import RankPool

INF, NAN = math.inf, math.nan
HAS_TRITON = sf_attn.merge._triton_installed()
STRATEGIES = ["ulysses", "ring", "usp", "tas", "torus"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # as test_parallel_attention.TOL

# ---- tier 1: the merge rule (Note [Stable merge]) -------------------------------------------

# Every pair of lse kinds; each row of the lse grid below is one pair.
_LSE_KINDS = {"empty": -INF, "finite": 0.7, "big": 1e4, "pinf": INF, "nan": NAN}
_PAIRS = [(a, b) for a in _LSE_KINDS for b in _LSE_KINDS]


def _merge_operands(dtype: torch.dtype = torch.float32):
    """Two partials over 2 batches x len(_PAIRS) rows x 2 heads; row r holds pair _PAIRS[r] in
    head 0 (head 1 and batch 1 stay finite, so unchanged rows sit next to poisoned ones). The
    o of an empty (-inf) block holds NaN, as a never-written block may."""
    g = torch.Generator().manual_seed(0)
    seq = len(_PAIRS)
    o1, o2 = (torch.randn(2, seq, 2, 8, generator=g, dtype=dtype) for _ in range(2))
    lse1, lse2 = (torch.randn(2, 2, seq, generator=g, dtype=dtype) for _ in range(2))
    for row, (a, b) in enumerate(_PAIRS):
        lse1[0, 0, row], lse2[0, 0, row] = _LSE_KINDS[a], _LSE_KINDS[b]
        if a == "empty":
            o1[0, row, 0] = NAN
        if b == "empty":
            o2[0, row, 0] = NAN
    return o1, lse1, o2, lse2


def _expected_merge(o1, lse1, o2, lse2):
    """The rule in float64, written out per row: NaN/+inf poisons, -inf drops its block."""
    o = torch.zeros(o1.shape, dtype=torch.float64)
    lse = torch.zeros(lse1.shape, dtype=torch.float64)
    for b, h, s in torch.cartesian_prod(*(torch.arange(n) for n in lse1.shape)).tolist():
        l1, l2 = float(lse1[b, h, s]), float(lse2[b, h, s])
        if any(math.isnan(x) or x == INF for x in (l1, l2)):
            o[b, s, h], lse[b, h, s] = NAN, NAN
        elif l1 == l2 == -INF:
            o[b, s, h], lse[b, h, s] = 0.0, -INF
        else:
            top = max(l1, l2)
            w1, w2 = (math.exp(x - top) for x in (l1, l2))
            total = top + math.log(w1 + w2)
            parts = ((w1, o1[b, s, h]), (w2, o2[b, s, h]))
            o[b, s, h] = sum(w / (w1 + w2) * x.double() for w, x in parts if w > 0)
            lse[b, h, s] = total
    return o, lse


def _assert_merge(got_o, got_lse, want_o, want_lse, atol: float = 1e-6) -> None:
    assert torch.equal(got_o.isnan(), want_o.isnan()), "o: NaN in the wrong places"
    assert torch.equal(got_lse.isnan(), want_lse.isnan()), "lse: NaN in the wrong places"
    ok = ~want_o.isnan()
    torch.testing.assert_close(got_o[ok].double(), want_o[ok], rtol=atol, atol=atol)
    ok = ~want_lse.isnan()
    # lse near 1e4 is only float32-exact to ~1e-3 (spacing), as in test_merge.
    torch.testing.assert_close(got_lse[ok].double(), want_lse[ok], rtol=1e-6, atol=1e-3)


def test_merge_poisons_rows_with_nan_or_pinf_lse() -> None:
    """Catches the merge hiding a NaN: exp(inf - inf) = NaN turned into weight 0 by
    ``where(total > 0, ...)``, so a block with lse = +inf or NaN merged into an empty (-inf)
    accumulator gave o = 0 (ulysses/tas returned 0.0 where SDPA has NaN). Also catches the fix
    going too far: an empty block's NaN o leaking in, or finite rows next to poisoned ones
    changing. Both operand orders, out of place and in place."""
    o1, lse1, o2, lse2 = _merge_operands()
    for a, b in ((o1, lse1), (o2, lse2)), ((o2, lse2), (o1, lse1)):
        want = _expected_merge(*a, *b)
        _assert_merge(*merge_attention(*a, *b, impl="torch"), *want)
        acc_o, acc_lse = a[0].clone(), a[1].clone()
        merge_attention_(acc_o, acc_lse, *b, impl="torch")
        _assert_merge(acc_o, acc_lse, *want)


def test_poisoned_accumulator_stays_poisoned() -> None:
    """Catches a NaN row healing in a later merge of a loop (ring step 2 merging a finite block
    into a NaN accumulator, or an empty one), which would make the answer depend on the order
    in which a strategy visits the blocks."""
    o1, lse1, o2, lse2 = _merge_operands()
    acc_o, acc_lse = torch.zeros_like(o1), torch.full_like(lse1, -INF)
    for o, lse in ((o1, lse1), (o2, lse2), (o1, torch.full_like(lse1, -INF)), (o2, lse2 - 1)):
        merge_attention_(acc_o, acc_lse, o, lse, impl="torch")
    poisoned = ~(lse1.isfinite() | (lse1 == -INF)) | ~(lse2.isfinite() | (lse2 == -INF))
    assert torch.equal(acc_lse.isnan(), poisoned)
    assert torch.equal(acc_o.isnan(), poisoned.transpose(1, 2)[..., None].expand_as(acc_o))


# The Triton kernel under the interpreter (TRITON_INTERPRET must be set before triton is
# imported, hence a fresh process, as in tests/unit/test_merge.py). fp32 only: the
# interpreter computes bf16 wrongly.
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from sf_attn.merge import merge_attention, merge_attention_
    from tests.faults.test_nonfinite import _assert_merge, _expected_merge, _merge_operands
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy's inf - inf, log(0)
    o1, lse1, o2, lse2 = _merge_operands()
    o2 = o2.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as the ring's views are
    for a, b in ((o1, lse1), (o2, lse2)), ((o2, lse2), (o1, lse1)):
        want = _expected_merge(*a, *b)
        got = merge_attention(*a, *b, impl="triton")
        _assert_merge(*got, *want)
        torch_o, torch_lse = merge_attention(*a, *b, impl="torch")
        assert torch.equal(got[0].isnan(), torch_o.isnan()), "kernel and torch disagree"
        acc_o, acc_lse = a[0].clone(), a[1].clone()
        merge_attention_(acc_o, acc_lse, *b, impl="triton")
        _assert_merge(acc_o, acc_lse, *want)
    print("interpreter-ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_poisons_like_torch() -> None:
    """Catches the Triton merge kernel (the CUDA fast path) keeping the old rule, i.e. a GPU
    run returning 0 where the CPU path, and SDPA, return NaN."""
    root = Path(__file__).resolve().parents[2]
    src = str(Path(sf_attn.merge.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "interpreter-ok" in proc.stdout, proc.stdout + proc.stderr


# ---- tier 1: local kernels against SDPA (Note [Non-finite inputs]) ----------------------------


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    math_only: bool = True,
) -> torch.Tensor:
    """SDPA in the API layout [batch, seq, heads, head_dim]; bool key_mask [batch, seq_k]."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if not math_only:
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def _local_case(name: str, seq_k: int, dtype: torch.dtype):
    """q [1, 6, 2, 8], k/v [1, seq_k, 2, 8]; ``name`` says what is injected. Head 1 stays clean."""
    g = torch.Generator().manual_seed(seq_k)
    q = torch.randn(1, 6, 2, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(1, seq_k, 2, 8, generator=g, dtype=dtype) for _ in range(2))
    if name in ("q+inf", "q-inf", "qnan"):  # every score of query 1 is +-inf (or NaN)
        q[0, 1, 0, 3] = {"q+inf": INF, "q-inf": -INF, "qnan": NAN}[name]
    elif name in ("k+inf", "k-inf", "knan"):  # key 0: +inf score for some queries, -inf others
        k[0, 0, 0, 3] = {"k+inf": INF, "k-inf": -INF, "knan": NAN}[name]
    elif name == "all-inf-keys":  # every key of head 0: +-inf scores, per query sign
        k[0, :, 0, 3] = -INF
    elif name == "row-all-neg":  # query 1's scores are all -inf: an empty softmax, not a NaN
        q[0, 1, 0, 3] = INF
        k[0, :, 0, 3] = -k[0, :, 0, 3].abs() - 0.1
    return q, k, v


_LOCAL_CASES = ["q+inf", "q-inf", "qnan", "k+inf", "k-inf", "knan", "all-inf-keys", "row-all-neg"]


@pytest.mark.parametrize("backend", ["cpu-flash", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seq_k", [5, 40])  # below / above one SIMD vector of scores
def test_local_kernels_match_sdpa_on_nonfinite(backend: str, dtype: torch.dtype, seq_k: int):
    """Catches a local kernel hiding SDPA's NaN: the reference backend's
    ``where(denom > 0, ...)`` turning a NaN row into 0, and the CPU flash op returning out = 0
    for NaN queries on short key blocks (lse = 0) and for +inf scores in bf16 (lse = +inf).
    Also catches the opposite fault, a row whose scores are all -inf (an empty softmax: SDPA
    gives 0) reported with lse = 0 instead of -inf, which a merge would weigh as a real block.
    Finite values: 1e-5 (float32 kernels vs float64), 1e-2 for bf16 (one rounding of o)."""
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name in _LOCAL_CASES:
        q, k, v = _local_case(name, seq_k, dtype)
        want = _sdpa(q.double(), k.double(), v.double())
        out, lse = attention_with_lse(q, k, v, backend=backend)
        assert torch.equal(out.isnan(), want.isnan()), (name, out.isnan().any(-1), want)
        ok = ~want.isnan()
        torch.testing.assert_close(out[ok].double(), want[ok], rtol=tol, atol=tol)
        row_nan = want.isnan().any(-1).transpose(1, 2)  # [batch, heads, seq_q]
        assert torch.equal(~(lse < INF), row_nan), (name, lse)  # NaN or +inf: both poison
        empty = (want == 0).all(-1).transpose(1, 2) & ~row_nan
        if name in ("row-all-neg", "all-inf-keys"):
            assert empty.any(), name  # the case does make empty rows
        assert torch.equal(lse == -INF, empty), (name, lse)


@pytest.mark.parametrize("backend", ["cpu-flash", "reference"])
@pytest.mark.parametrize("seq_k", [4, 40])  # the CPU flash op: lse NaN / +inf in NaN rows
def test_fully_masked_rows_keep_sdpa_nan(backend: str, seq_k: int) -> None:
    """Catches the fully-masked-row fix-up (Note [Fully masked rows]) overwriting a NaN that
    SDPA has: a masked key with k = +inf still makes its score -inf + inf = NaN in SDPA, so
    only rows that are empty because of the mask, and hold no NaN, become out = 0, lse = -inf."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 2, 8, generator=g)
    k, v = (torch.randn(2, seq_k, 2, 8, generator=g) for _ in range(2))
    q[0, :, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    k[0, 1, 0, 0] = INF  # masked key; scores +inf for queries 0 and 2
    key_mask = torch.ones(2, seq_k, dtype=torch.bool)
    key_mask[0] = False
    key_mask[1, 1] = False
    want = _sdpa(q.double(), k.double(), v.double(), key_mask=key_mask)
    assert want.isnan().any() and not want.isnan().all()
    out, lse = attention_with_lse(q, k, v, key_mask=key_mask, backend=backend)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(~(lse < INF), want.isnan().any(-1).transpose(1, 2))
    dead = ~want.isnan().any(-1).transpose(1, 2) & ~key_mask.any(-1)[:, None, None]
    assert torch.equal(lse == -INF, dead) and dead.any()
    ok = ~want.isnan()
    torch.testing.assert_close(out[ok].double(), want[ok], rtol=1e-5, atol=1e-5)


# ---- tier 2: every strategy on CPU ranks ------------------------------------------------------

_BATCH, _SEQ, _HEADS, _DIM, _TEXT = 2, 37, 4, 16, 5  # 37: shards of 10/9 on 4 ranks


def _injections(text: int) -> list[tuple[str, str, float]]:
    """(kind, target, value): "points" sets 3 seeded elements of target; "chunk" sets dim 3 of
    head 1 for every key of the first half of the image sequence (whole ring blocks, so a
    block's scores are all +-inf for a query: the empty-softmax case); "row" gives one query
    row all -inf scores (an empty softmax in SDPA: 0, not NaN)."""
    targets = ["q", "k"] + (["tq", "tk"] if text else [])
    cases = [("points", t, x) for t in targets for x in (INF, -INF, NAN)]
    return cases + [("chunk", "k", -INF), ("chunk", "k", INF), ("row", "q", INF)]


def _inject(tensors: dict[str, torch.Tensor], kind: str, target: str, value: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = tensors[target]
    if kind == "points":
        for _ in range(3):
            idx = [int(torch.randint(n, (1,), generator=g)) for n in x.shape]
            x[tuple(idx)] = value
    elif kind == "chunk":
        x[:, : _SEQ // 2, 1, 3] = value
    else:  # "row": query (1, 4) of head 2 meets +inf, every key (text too) a negative factor
        x[1, 4, 2, 3] = value
        for keys in ("k", "tk"):
            if keys in tensors:
                kk = tensors[keys]
                kk[1, :, 2, 3] = -kk[1, :, 2, 3].abs() - 0.1


def _nonfinite_cases(
    ctx: sf_comm.Context, strategies: list[str], dtype: torch.dtype, backends: list[str]
) -> tuple[list[str], int]:
    """Runs every (strategy, text, injection) case on this rank; returns the failures (as text,
    so one bad case does not stop the ranks' shared sequence of collectives) and how many
    cases had NaN in the reference."""
    failures, with_nan = [], 0
    seed = 0
    for text in (0, _TEXT):
        for kind, target, value in _injections(text):
            seed += 1
            g = torch.Generator().manual_seed(1000 + seed)
            shape = {"q": _SEQ, "k": _SEQ, "v": _SEQ, "tq": text, "tk": text, "tv": text}
            full = {
                n: torch.randn(_BATCH, s, _HEADS, _DIM, generator=g, dtype=torch.float64)
                for n, s in shape.items()
            }
            _inject(full, kind, target, value, seed)
            cat = [torch.cat([full["t" + n], full[n]], 1) for n in ("q", "k", "v")]
            ref = _sdpa(*cat)  # float64 math SDPA on the gathered sequence
            default = _sdpa(*cat, math_only=False)
            if not torch.equal(ref.isnan(), default.isnan()):
                failures.append(f"{kind} {target}={value} text={text}: SDPA backends disagree")
            with_nan += bool(ref.isnan().any())
            ins = {n: t.to(dtype) for n, t in full.items()}
            shards = [sf_attn.shard(ins[n], ctx) for n in ("q", "k", "v")]
            joint = (ins["tq"], ins["tk"], ins["tv"]) if text else None
            want_img = sf_attn.shard(ref[:, text:], ctx)
            for strategy in strategies:
                for backend in backends:
                    res = sf_attn.parallel_attention(
                        *shards, ctx=ctx, strategy=strategy, joint=joint, backend=backend
                    )
                    if isinstance(res, tuple):
                        got = [("img", res[0], want_img), ("txt", res[1], ref[:, :text])]
                    else:
                        got = [("img", res, want_img)]
                    for part, out, want in got:
                        why = _compare(out, want, TOL[dtype])
                        if why:
                            failures.append(
                                f"{strategy}/{backend} {kind} {target}={value} text={text} "
                                f"{part}: {why}"
                            )
    return failures, with_nan


def _compare(out: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    nan_out, nan_want = out.isnan(), want.isnan()
    if not torch.equal(nan_out, nan_want):
        return (
            f"NaN mask differs: {int((nan_want & ~nan_out).sum())} NaN in SDPA not in result, "
            f"{int((nan_out & ~nan_want).sum())} the other way"
        )
    ok = ~nan_want
    try:
        torch.testing.assert_close(out[ok].double(), want[ok], atol=tol, rtol=tol)
    except AssertionError as exc:
        return " ".join(str(exc).splitlines()[:3])
    return None


def _run_pool(
    pool: RankPool,
    topo: str,
    transport: str,
    strategies: list[str],
    dtype: torch.dtype,
    backends: list[str],
) -> None:
    results = pool.run(
        _nonfinite_cases, strategies, dtype, backends, topology=topo, transport=transport
    )
    failures: dict[str, str] = {}  # case -> what went wrong on the first rank that saw it
    for fails, _ in results:
        for fail in fails:
            case, why = fail.split(": ", 1)
            failures.setdefault(case, why)
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(
        f"{case}: {why}" for case, why in sorted(failures.items())
    )
    assert all(n >= 10 for _, n in results)  # the injections do make SDPA return NaN


@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize(("world", "topo"), [(4, "2x2"), (2, "1x2")])
def test_every_strategy_returns_sdpa_nan(ranks, world: int, topo: str, transport: str) -> None:
    """Catches a strategy whose answer depends on how it splits the keys when q or k (image or
    text) holds +inf, -inf or NaN: ulysses/tas/usp returned 0.0 where SDPA returns NaN (a block
    with lse = +inf merged into an empty accumulator weighed 0), ring/torus returned 0.0 for a
    NaN query (the CPU flash op's out = 0, lse = 0 on blocks under 16 keys), and ring/torus
    moved finite values when a whole block scored -inf for a query (lse 0 instead of -inf)."""
    _run_pool(ranks(world), topo, transport, STRATEGIES, torch.float32, ["auto"])


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize(("world", "topo"), [(4, "1x4"), (4, "4x1"), (2, "2x1"), (1, "1x1")])
def test_nonfinite_sweep(ranks, world: int, topo: str, transport: str) -> None:
    """Catches the same faults on the remaining topologies, with the reference backend, and in
    bf16 (whose kernels and casts must keep NaN rows NaN too)."""
    pool = ranks(world)
    _run_pool(pool, topo, transport, STRATEGIES, torch.float32, ["auto", "reference"])
    _run_pool(pool, topo, transport, STRATEGIES, torch.bfloat16, ["auto"])
