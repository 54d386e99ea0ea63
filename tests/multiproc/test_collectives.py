"""Tier 2: sf_comm collectives on real CPU ranks, both transports, bit-exact.

Every rank builds every rank's inputs from a shared seed, so it can compute locally what it
must receive; results are compared with ``torch.equal`` (data movement is bit-exact).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sf_comm
from sf_comm.launch import RankError, RankPool

TRANSPORTS = ["shm", "gloo"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOPOLOGIES = {1: ["1x1"], 2: ["1x2", "2x1"], 4: ["2x2", "1x4", "4x1"], 8: ["2x4"]}
HYP = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def _make(seed: int, src: int, dst: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor member ``src`` sends to member ``dst`` (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + src * 1009 + dst)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _rows(seed: int, src: int, dst: int, max_rows: int) -> int:
    """Uneven split sizes, including zero rows."""
    return (seed + 7 * src + 3 * dst) % (max_rows + 1)


def _check_all_to_all(
    ctx: sf_comm.Context, axis: str, seed: int, max_rows: int, cols: int, dtype: torch.dtype
) -> int:
    group = ctx.group(axis)
    me = group.index
    inputs = [
        _make(seed, me, j, _rows(seed, me, j, max_rows), cols, dtype) for j in range(group.size)
    ]
    shapes = [(_rows(seed, j, me, max_rows), cols) for j in range(group.size)]
    with sf_comm.all_to_all(ctx, group, inputs, shapes) as h:
        pass
    out = h.wait()
    for j in range(group.size):
        expected = _make(seed, j, me, _rows(seed, j, me, max_rows), cols, dtype)
        assert torch.equal(out[j], expected), f"rank {ctx.rank}: chunk from member {j} differs"
    return len(out)


def _check_shift_and_gather(
    ctx: sf_comm.Context, axis: str, seed: int, rows: int, cols: int, dtype: torch.dtype
) -> None:
    group = ctx.group(axis)
    me, n = group.index, group.size
    mine = _make(seed, me, 0, rows + me, cols, dtype)  # different length per member
    for offset in range(-1, n + 1):
        src = (me - offset) % n
        got = sf_comm.shift(ctx, group, mine, offset, out_shape=(rows + src, cols)).wait()
        assert torch.equal(got, _make(seed, src, 0, rows + src, cols, dtype)), f"shift {offset}"
    shapes = [(rows + j, cols) for j in range(n)]
    gathered = sf_comm.all_gather(ctx, group, mine, shapes).wait()
    for j in range(n):
        assert torch.equal(gathered[j], _make(seed, j, 0, rows + j, cols, dtype)), f"gather {j}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_collectives_property(ranks, world: int, transport: str) -> None:
    """Catches wrong routing, wrong uneven-split bookkeeping or byte corruption in any collective.

    Property-based over shapes (including empty chunks), dtypes, axes and topologies.
    """
    pool = ranks(world)

    @HYP
    @given(
        seed=st.integers(0, 10_000),
        max_rows=st.integers(0, 9),
        cols=st.sampled_from([1, 3, 64, 257]),
        dtype=st.sampled_from(DTYPES),
        topo=st.sampled_from(TOPOLOGIES[world]),
        axis=st.sampled_from(["world", "inter", "intra"]),
    )
    def check(
        seed: int, max_rows: int, cols: int, dtype: torch.dtype, topo: str, axis: str
    ) -> None:
        pool.run(
            _check_all_to_all, axis, seed, max_rows, cols, dtype, topology=topo, transport=transport
        )
        pool.run(
            _check_shift_and_gather,
            axis,
            seed,
            max_rows,
            cols,
            dtype,
            topology=topo,
            transport=transport,
        )

    check()


def _large_and_pipelined(ctx: sf_comm.Context, numel: int) -> None:
    group = ctx.group("world")
    me, n = group.index, group.size
    x = torch.arange(numel, dtype=torch.float32) + 1e6 * me
    # Several exchanges in flight before any wait: FIFO order per pair must hold.
    handles = [sf_comm.shift(ctx, group, x + k, offset=1 + k % (n - 1)) for k in range(5)]
    for k, h in enumerate(handles):
        src = (me - (1 + k % (n - 1))) % n
        assert torch.equal(h.wait(), torch.arange(numel, dtype=torch.float32) + 1e6 * src + k)
    chunks = list(x.tensor_split(n))
    out = sf_comm.all_to_all(ctx, group, chunks, [chunks[me].shape] * n).wait()
    for j in range(n):
        expect = (torch.arange(numel, dtype=torch.float32) + 1e6 * j).tensor_split(n)[me]
        assert torch.equal(out[j], expect)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_messages_larger_than_a_slot(ranks, transport: str) -> None:
    """Catches a broken piece/credit protocol: messages spanning many 4 KiB slots, several in flight."""
    ranks(4).run(
        _large_and_pipelined,
        40_000,
        topology="2x2",
        transport=transport,
        ctx_options={"slot_bytes": 4096} if transport == "shm" else None,
    )


def _uses_rendezvous(ctx: sf_comm.Context) -> int:
    return ctx.transport._cma_min


@pytest.mark.parametrize("cma_min", [0, 1024])
def test_shm_rendezvous_and_eager_paths(ranks, cma_min: int) -> None:
    """Catches a broken cross-memory-attach path (wrong address, buffer freed before the read,
    FIFO order lost between rendezvous and eager messages) and a broken eager fallback."""
    pool = ranks(4)
    options = {"cma_min": cma_min}
    assert (
        pool.run(_uses_rendezvous, topology="2x2", transport="shm", ctx_options=options)[0]
        == cma_min
    )
    pool.run(_large_and_pipelined, 100_000, topology="2x2", transport="shm", ctx_options=options)


def _count(ctx: sf_comm.Context) -> tuple[dict[str, int], dict[str, int]]:
    group = ctx.group("intra")
    before = ctx.transport.stats.snapshot()
    x = torch.ones(10, 4)
    sf_comm.ring_shift(ctx, group, x).wait()
    sf_comm.all_to_all(ctx, group, list(torch.ones(group.size * 2, 4).chunk(group.size))).wait()
    delta = ctx.transport.stats - before
    return dict(delta.calls), dict(delta.bytes_sent)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stats_count_calls_and_bytes(ranks, transport: str) -> None:
    """Catches communication accounting that lies (strategy tests rely on these counts)."""
    calls, sent = ranks(4).run(_count, topology="1x4", transport=transport)[0]
    assert calls == {"shift+1": 1, "all_to_all": 1}
    assert sent == {"shift+1": 10 * 4 * 4, "all_to_all": 3 * 2 * 4 * 4}


def _mismatch(ctx: sf_comm.Context) -> str:
    group = ctx.group("world")
    rows = 3 if ctx.rank == 1 else 2  # rank 1 sends a different shape than the others expect
    try:
        sf_comm.ring_shift(ctx, group, torch.zeros(rows, 2), out_shape=(2, 2)).wait()
    except sf_comm.CommError as exc:
        return str(exc)
    return ""


def test_shm_detects_mismatched_shapes() -> None:
    """Catches a shape disagreement across ranks being read as garbage instead of an error."""
    with RankPool(2, env={"SF_TIMEOUT": "10"}) as pool:
        msgs = pool.run(_mismatch, topology="1x2", transport="shm")
    assert "expected 16 bytes from rank 1, but rank 1 sent 24 bytes" in msgs[0]


def _victim(ctx: sf_comm.Context, victim: int) -> tuple[float, str]:
    group = ctx.group("world")
    x = torch.randn(1 << 20)
    sf_comm.ring_shift(ctx, group, x).wait()  # one good round first
    # every rank has its round's data before the victim dies (else a peer still receiving
    # from it rightly fails in the shift, not in the all-to-all this test is about)
    ctx.barrier()
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        for _ in range(3):
            sf_comm.all_to_all(ctx, group, list(x.chunk(group.size))).wait()
    except sf_comm.CommError as exc:
        return time.monotonic() - start, str(exc)
    return -1.0, "no error"


def _shm_segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("sf-")}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_rank_fails_survivors_fast_and_leaks_nothing(transport: str) -> None:
    """Catches survivors hanging on a dead peer, errors that do not name it, and leaked segments."""
    before = _shm_segments()
    env = {"SF_TIMEOUT": "20", "SF_POOL_GRACE": "25"}
    with RankPool(4, env=env) as pool, pytest.raises(RankError) as err:
        pool.run(_victim, 2, topology="2x2", transport=transport, timeout=60)
    failures = {f.rank: f for f in err.value.failures}
    assert set(failures) == {2} and failures[2].kind == "died", err.value
    for rank in (0, 1, 3):
        took, msg = err.value.results[rank]
        assert 0 <= took < 20, (rank, took, msg)  # well inside SF_TIMEOUT: detected, not timed out
        assert "rank 2 (pid" in msg and "died" in msg and "all_to_all" in msg, msg
    assert _shm_segments() == before


def _timeout(ctx: sf_comm.Context) -> tuple[float, str]:
    if ctx.rank == 1:
        return 0.0, "skipped"  # rank 1 never joins the collective
    start = time.monotonic()
    try:
        sf_comm.ring_shift(ctx, ctx.group("world"), torch.ones(4)).wait()
    except sf_comm.CommTimeout as exc:
        return time.monotonic() - start, str(exc)
    return -1.0, "no timeout"


def test_wait_times_out_with_a_clear_message() -> None:
    """Catches a wait that spins forever when a peer never arrives."""
    with RankPool(2) as pool:
        (took, msg), _ = pool.run(
            _timeout, topology="1x2", transport="shm", ctx_options={"timeout": 2.0}
        )
    assert 1.5 < took < 10, took
    assert "rank 0" in msg and "shift+1 timed out after 2s" in msg and "[1]" in msg


def _bad_args(ctx: sf_comm.Context) -> list[str]:
    group = ctx.group("world")
    msgs = []
    for call in (
        lambda: sf_comm.all_to_all(ctx, group, [torch.ones(2)]),
        lambda: sf_comm.all_to_all(ctx, group, [torch.ones(2), torch.ones(2, dtype=torch.float16)]),
        lambda: sf_comm.all_to_all(ctx, group, [torch.ones(2), torch.ones(3)]),
        lambda: ctx.group("diagonal"),
    ):
        try:
            call()
            msgs.append("no error")
        except (ValueError, TypeError) as exc:
            msgs.append(str(exc))
    return msgs


def test_bad_arguments_raise_clear_errors(ranks) -> None:
    """Catches malformed collective calls reaching the wire (where they would hang or corrupt)."""
    msgs = ranks(2).run(_bad_args, topology="1x2", transport="shm")[0]
    assert "needs one input per member (2), got 1" in msgs[0]
    assert "share one dtype" in msgs[1]
    assert "needs out_shapes" in msgs[2]
    assert "unknown mesh axis 'diagonal'" in msgs[3]


def _init_errors(ctx: sf_comm.Context) -> list[str]:
    msgs = []
    for kwargs in ({"topology": "2x4"}, {"transport": "carrier-pigeon"}):
        try:
            sf_comm.init(**kwargs)  # type: ignore[arg-type]
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_init_rejects_bad_topology_and_transport(ranks) -> None:
    """Catches a topology that does not fit the world, or a typo'd transport, being accepted."""
    msgs = ranks(2).run(_init_errors, topology="1x2", transport="gloo")[0]
    assert "2x4 = 8 ranks, but the job has world size 2" in msgs[0]
    assert "unknown transport 'carrier-pigeon'" in msgs[1] and "shm" in msgs[1]
