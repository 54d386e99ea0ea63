"""Fault tier: what a careless or hostile user does to the transports, and what must happen.

Each test reproduces one defect of the second fault campaign (interrupted calls, ranks that
disagree, a small /dev/shm, leaked descriptors and segments, size mismatches on gloo, errors
that blame the wrong rank) and checks the guarantee of docs/faults.md instead: a clear
error on every rank within the timeout, naming the rank that caused it; never a wrong
answer, a hang, a crash of the process or a leak.

Rank functions end with ``close_contexts()`` where they may break their context, so the
next test starts from fresh contexts (contexts are cached per rank pool).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import torch

import sf_attn
import sf_comm
from sf_attn.backends import reference_attention
from sf_comm.launch import RankError, RankPool, close_contexts

FAST = {"SF_TIMEOUT": "20", "SF_POOL_GRACE": "20"}


def _inputs(seed: int, seq: int = 24, heads: int = 4, dim: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, heads, dim, generator=g) for _ in range(3)]


def _attention(ctx: sf_comm.Context, strategy: str, seed: int) -> float:
    """Max error of one ``parallel_attention`` against float64 attention on the full inputs."""
    q, k, v = _inputs(seed)
    out = sf_attn.parallel_attention(
        *(sf_attn.shard(t, ctx) for t in (q, k, v)), ctx=ctx, strategy=strategy, seq_len=q.shape[1]
    )
    ref = sf_attn.shard(reference_attention(q.double(), k.double(), v.double())[0], ctx)
    return float((out.double() - ref).abs().max())


# -- 1. an interrupted call must not feed its messages to the next one ----------------------


def _interrupted(ctx: sf_comm.Context, strategy: str) -> tuple[str, str]:
    """Rank 1 is interrupted inside its first attention block (its first messages are out);
    then every rank calls again with new inputs. Returns (what the first call did, what the second call did)."""
    import sf_attn.hybrid as hybrid
    import sf_attn.torus as torus

    original = hybrid.attention_with_lse
    blocks = [0]

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        blocks[0] += 1
        if ctx.rank == 1 and blocks[0] == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    hybrid.attention_with_lse = torus.attention_with_lse = flaky  # type: ignore[assignment]
    try:
        try:
            _attention(ctx, strategy, seed=1)
            first = "ok"
        except KeyboardInterrupt:
            first = "interrupted"
        except sf_comm.CommError as exc:
            first = f"error: {exc}"
    finally:
        hybrid.attention_with_lse = torus.attention_with_lse = original  # type: ignore[assignment]
    try:
        err = _attention(ctx, strategy, seed=2)
        second = f"ok {err:.3g}"
    except sf_comm.CommError as exc:
        second = f"error: {exc}"
    close_contexts()
    return first, second


@pytest.mark.parametrize(
    ("strategy", "topology", "transport"),
    [
        ("ring", "1x4", "shm"),
        ("ring", "1x4", "gloo"),
        ("torus", "2x2", "shm"),
        pytest.param("usp", "2x2", "shm", marks=pytest.mark.slow),
        pytest.param("ulysses", "1x4", "gloo", marks=pytest.mark.slow),
    ],
)
def test_interrupted_call_never_feeds_the_next_call(
    ranks, strategy: str, topology: str, transport: str
) -> None:
    """Catches the silent wrong answer after an interrupted call: the other ranks consumed the
    interrupted rank's next-call messages as the old call's (same op, same size) and returned
    results off by ~0.3, without any error."""
    pool = ranks(4)
    pool.run(_noop)  # ranks up before the clock starts
    start = time.monotonic()
    results = pool.run(_interrupted, strategy, topology=topology, transport=transport)
    assert time.monotonic() - start < 15, "a rank waited for its timeout instead of failing fast"
    assert results[1][0] == "interrupted"
    for rank, (first, second) in enumerate(results):
        # the second call either is exact or fails naming the cause; never a wrong answer
        if second.startswith("ok"):
            assert float(second.split()[1]) < 1e-5, (rank, second)
        else:
            assert "rank 1" in second and "KeyboardInterrupt" in second, (rank, second)
        if rank != 1 and first != "ok":
            assert "rank 1" in first and "KeyboardInterrupt" in first, (rank, first)


# -- 2. ranks that disagree on settings fail at once, on every rank ------------------------


def _init_with(env_by_rank: list[dict[str, str]]) -> tuple[float, str]:
    import torch.distributed as dist

    import sf_attn  # noqa: F401 - registers the settings of its own that ranks must share

    env = env_by_rank[dist.get_rank()]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start = time.monotonic()
    try:
        ctx = sf_comm.init(transport="shm")
        ctx.close()
        return time.monotonic() - start, "no error"
    except ValueError as exc:
        return time.monotonic() - start, str(exc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            [{"SF_TOPOLOGY": "1x4"}] + [{"SF_TOPOLOGY": "2x2"}] * 3,
            "ranks disagree on the topology: rank 0: 1x4; ranks 1-3: 2x2",
        ),
        (
            [{"SF_SHM_SLOT_MB": "8"}] * 3 + [{"SF_SHM_SLOT_MB": "1"}],
            "ranks disagree on the SF_SHM_SLOT_MB: ranks 0-2: 8; rank 3: 1",
        ),
        (
            [{"SF_TOPOLOGY": "2x2", "SF_SHM_CMA_MIN_KB": "64"}]
            + [{"SF_TOPOLOGY": "2x2", "SF_SHM_CMA_MIN_KB": "256"}] * 3,
            "ranks disagree on the SF_SHM_CMA_MIN_KB: rank 0: 64; ranks 1-3: 256",
        ),
        (
            [{"SF_TOPOLOGY": "2x2", "SF_GATHER_KV": "auto"}] + [{"SF_TOPOLOGY": "2x2"}] * 3,
            "ranks disagree on the SF_GATHER_KV: rank 0: auto; ranks 1-3: unset",
        ),
        (
            [{"SF_TOPOLOGY": "1x3"}] + [{"SF_TOPOLOGY": "2x2"}] * 3,
            "1x3 = 3 ranks, but the job has world size 4",
        ),
    ],
)
def test_ranks_that_disagree_on_settings_fail_fast_everywhere(
    ranks, env: list[dict[str, str]], expected: str
) -> None:
    """Catches init hanging in the library's group creation (100 s past SF_TIMEOUT, raw gloo
    errors that never mention the topology) when ranks see different SF_TOPOLOGY or SF_SHM_*."""
    results = ranks(4).run(_init_with, env)
    for rank, (took, msg) in enumerate(results):
        assert expected in msg, (rank, msg)
        assert took < 10, (rank, took)


# -- 4. a small /dev/shm is an error at init (or smaller slots), never a SIGBUS -------------


@contextlib.contextmanager
def _small_tmpfs(size: str):  # type: ignore[no-untyped-def]
    where = tempfile.mkdtemp(prefix="sf-tmpfs-")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", where],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", where], check=False)
    finally:
        os.rmdir(where)


def _big_all_to_all(directory: str, cma_kb: str) -> tuple[int, str]:
    os.environ["SF_SHM_DIR"] = directory
    os.environ["SF_SHM_CMA_MIN_KB"] = cma_kb
    try:
        ctx = sf_comm.init(topology="1x4", transport="shm")
    except sf_comm.CommError as exc:
        return 0, str(exc)
    try:
        group = ctx.group()
        g = torch.Generator().manual_seed(ctx.rank)
        mine = [torch.randn(1 << 20, generator=g) for _ in range(4)]  # 4 MiB to each member
        got = sf_comm.all_to_all(ctx, group, mine).wait()
        for j in range(4):  # member j's inputs, rebuilt from its seed: bit-exact movement
            g = torch.Generator().manual_seed(j)
            sent = [torch.randn(1 << 20, generator=g) for _ in range(4)]
            assert torch.equal(got[j], sent[ctx.rank]), f"chunk from {j}"
        return ctx.transport.slot_bytes, "ok"  # type: ignore[attr-defined]
    finally:
        ctx.close()


@pytest.mark.parametrize(
    ("size", "cma_kb", "outcome"),
    [
        ("24m", "256", "ok"),  # rendezvous on: slots capped at 256 KiB, heaps fit
        ("24m", "0", "ok"),  # rendezvous off: 8 MiB slots shrink until the heaps fit
        ("1m", "256", "needs"),  # nothing fits: a clear error on every rank
    ],
)
def test_small_shm_directory_errors_or_shrinks_never_sigbus(
    size: str, cma_kb: str, outcome: str
) -> None:
    """Catches ranks killed by SIGBUS with no message when /dev/shm is small (sparse heaps
    fail only when written), as on Docker's default 64 MB."""
    with _small_tmpfs(size) as where, RankPool(4, env=FAST) as pool:
        results = pool.run(_big_all_to_all, where, cma_kb)
        assert os.listdir(where) == []
    for rank, (slot, msg) in enumerate(results):
        if outcome == "ok":
            assert msg == "ok" and slot > 0, (rank, msg)
        else:
            assert "needs" in msg and "MiB" in msg and where in msg, (rank, msg)
            assert "SF_SHM_DIR" in msg, msg


# -- 5. init/close cycles leave descriptors and mappings flat ------------------------------


def _counts() -> tuple[int, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return len(os.listdir("/proc/self/fd")), maps


def _cycles(transport: str, windows: int, per_window: int) -> list[tuple[int, int]]:
    """(descriptors, mappings) after a warm-up and after each window of init/close cycles."""

    def cycle() -> None:
        ctx = sf_comm.init(topology="2x2", transport=transport)
        sf_comm.all_gather(ctx, ctx.group("intra"), torch.ones(4)).wait()
        sf_attn.parallel_attention(*_inputs(3, seq=4), ctx=ctx, strategy="usp", seq_len=16)
        ctx.close()

    for _ in range(3):  # warm-up: lazily created library state
        cycle()
    counts = [_counts()]
    for _ in range(windows):
        for _ in range(per_window):
            cycle()
        counts.append(_counts())
    return counts


def _steady_growth(samples: list[int]) -> int:
    """The smallest growth between consecutive samples: a leak grows in every window, while
    the allocator and library caches move the counts once in a while (so the total alone is
    a noisy judge in a long test session)."""
    return min(b - a for a, b in itertools.pairwise(samples))


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_init_close_cycles_leak_nothing(ranks, transport: str) -> None:
    """Catches Context.close() leaking ~10 descriptors and ~12 mappings per cycle (the mesh's
    and subgroups' process groups were never destroyed): init failed with "Too many open
    files" around cycle 95. 25 cycles in 5 windows; a leak of even one descriptor or mapping
    per cycle grows every window by 5."""
    results = ranks(4).run(_cycles, transport, 5, 5, timeout=240)
    for rank, counts in enumerate(results):
        fds, maps = [c[0] for c in counts], [c[1] for c in counts]
        assert _steady_growth(fds) <= 0, f"rank {rank}: descriptors {fds}"
        assert _steady_growth(maps) <= 0, f"rank {rank}: mappings {maps}"
        assert fds[-1] - fds[0] < 5 and maps[-1] - maps[0] < 5, (rank, fds, maps)


def _rss_over_calls(windows: int, calls: int) -> list[int]:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    ctx = sf_comm.init(topology="2x2", transport="shm")
    q = _inputs(5, seq=8)
    try:
        for _ in range(100):  # warm-up: allocator pools, lazily built groups
            sf_attn.parallel_attention(*q, ctx=ctx, strategy="torus", seq_len=32)
        samples = [rss()]
        for _ in range(windows):
            for _ in range(calls):
                sf_attn.parallel_attention(*q, ctx=ctx, strategy="torus", seq_len=32)
            samples.append(rss())
        return samples
    finally:
        ctx.close()


def test_many_calls_keep_memory_flat(ranks) -> None:
    """Catches per-call growth (pending operations, status strings, call tags or process
    groups kept per call) over 1,000 calls of a strategy that uses every collective kind:
    4 windows of 250 calls; 512 bytes kept per call would grow every window by 125 KiB."""
    for rank, samples in enumerate(ranks(4).run(_rss_over_calls, 4, 250, timeout=240)):
        assert _steady_growth(samples) < 100 * 1024, f"rank {rank}: resident bytes {samples}"
        assert samples[-1] - samples[0] < 4 << 20, f"rank {rank}: resident bytes {samples}"


# -- 6. a signal during set-up leaves no segment behind ------------------------------------


def _setup_then_stall(directory: str) -> str:
    """Rank 1 stalls while mapping rank 0's heap (both segments exist, rank 0 waits)."""
    import torch.distributed as dist

    import sf_comm._shm_setup as shm_setup  # where the heaps are mapped

    os.environ["SF_SHM_DIR"] = directory
    if dist.get_rank() == 1:
        real = shm_setup.mmap
        calls = [0]

        class Slow:
            @staticmethod
            def mmap(*args, **kwargs):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] == 2:  # the first peer's heap
                    time.sleep(60)
                return real.mmap(*args, **kwargs)

        shm_setup.mmap = Slow  # type: ignore[assignment]
    ctx = sf_comm.init(topology="1x2", transport="shm")
    ctx.close()
    return "set up"


def _signal_during_setup(sig: signal.Signals, directory: str) -> RankError | None:
    env = {**FAST, "SF_TIMEOUT": "30"}
    with RankPool(2, env=env) as pool:
        pool.run(_noop)  # ranks up before the clock starts
        failure: list[RankError | None] = [None]

        def job() -> None:
            try:
                pool.run(_setup_then_stall, directory, timeout=60)
            except RankError as exc:
                failure[0] = exc

        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.monotonic() + 30
        while len(os.listdir(directory)) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(os.listdir(directory)) == 2, "set-up never reached its window"
        for pid in pool.pids:
            os.kill(pid, sig)
        thread.join(90)
        assert not thread.is_alive()
        return failure[0]


def _noop() -> None:
    return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_during_setup_leaves_no_segment(sig: signal.Signals) -> None:
    """Catches segments left in /dev/shm when every rank gets SIGTERM (what torchrun and Slurm
    send; atexit does not run) or SIGINT inside the set-up window; after SIGKILL (no handler
    can run) the next set-up in the directory removes them."""
    directory = tempfile.mkdtemp(prefix="sf-shm-", dir="/dev/shm")
    try:
        failure = _signal_during_setup(sig, directory)
        assert failure is not None, "set-up finished although every rank was signalled"
        if sig == signal.SIGTERM:  # the handler chains to the default action: death by SIGTERM
            assert {f.kind for f in failure.failures} == {"died"}, failure
        if sig == signal.SIGKILL:
            time.sleep(1.5)  # older than the next job's timeout (1 s): stale for sure
            with RankPool(2, env={**FAST, "SF_TIMEOUT": "1"}) as pool:
                pool.run(_init_in, directory)
        assert os.listdir(directory) == []
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _init_in(directory: str) -> None:
    os.environ["SF_SHM_DIR"] = directory
    sf_comm.init(topology="1x2", transport="shm").close()


# -- 7. gloo: ranks that pass inconsistent sizes get an error, not an aborted process --------


def _inconsistent_seq_len(ctx: sf_comm.Context, strategy: str) -> str:
    seq_len = 9 if ctx.rank == 0 else 11  # rank 0: shards [5, 4]; rank 1: shards [6, 5]
    q = torch.randn(1, 5, 2, 8)
    try:
        sf_attn.parallel_attention(q, q, q, ctx=ctx, strategy=strategy, seq_len=seq_len)
        return "no error"
    except sf_comm.CommError as exc:
        return str(exc)
    finally:
        close_contexts()


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_gloo_size_mismatch_is_an_error_not_an_abort(ranks, strategy: str) -> None:
    """Catches gloo aborting the process (C++ size check, exit -6) when ranks pass seq_len
    values that disagree: no rank got a Python error."""
    msgs = ranks(2).run(_inconsistent_seq_len, strategy, topology="1x2", transport="gloo")
    assert any("expected" in m and "bytes from rank" in m for m in msgs), msgs
    for rank, msg in enumerate(msgs):
        assert msg != "no error" and f"rank {rank}" in msg, (rank, msg)


# -- 8. errors name the rank that caused them -----------------------------------------------


def _hang(ctx: sf_comm.Context, victim: int, seconds: float) -> str:
    import sf_attn.hybrid as hybrid

    original = hybrid.attention_with_lse

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        if ctx.rank == victim:
            time.sleep(seconds)
        return original(*args, **kwargs)

    hybrid.attention_with_lse = slow  # type: ignore[assignment]
    try:
        _attention(ctx, "ring", seed=4)
        return "no error"
    except sf_comm.CommError as exc:
        return str(exc)
    finally:
        hybrid.attention_with_lse = original  # type: ignore[assignment]
        close_contexts()


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_hung_rank_is_named_by_its_peers(ranks, transport: str) -> None:
    """Catches a hung rank 3 being reported by its peers as "rank 0 aborted" (the rank that
    timed out waiting for it), which sends the user to the wrong process."""
    msgs = ranks(4).run(
        _hang, 3, 6.0, topology="1x4", transport=transport, ctx_options={"timeout": 2.0}
    )
    # rank 0 needs rank 3's forwards; ranks 1 and 2 may finish from rank 3's first send
    assert msgs[0] != "no error", msgs
    for rank in (0, 1, 2):
        msg = msgs[rank]
        if msg != "no error":  # "rank 3 is busy ..." or "busy ...: ranks 1, 3"
            assert re.search(r"rank 3\b|ranks [\d, ]*\b3\b", msg), (rank, msg)
            assert "busy outside communication" in msg, (rank, msg)


def _kill_in_ring(ctx: sf_comm.Context, victim: int) -> str:
    group = ctx.group()
    x = torch.randn(1 << 16)
    sf_comm.ring_shift(ctx, group, x).wait()
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for _ in range(3):
            sf_comm.ring_shift(ctx, group, x).wait()
        return "no error"
    except sf_comm.CommError as exc:
        return str(exc)


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_killed_rank_is_named_even_by_ranks_not_waiting_on_it(transport: str) -> None:
    """Catches survivors of a SIGKILLed rank 2 naming rank 3 (the live peer they were waiting
    on) or nobody: in a ring, rank 0 waits on rank 3, which waits on the dead rank 2."""
    with RankPool(4, env=FAST) as pool, pytest.raises(RankError) as err:
        pool.run(_kill_in_ring, 2, topology="1x4", transport=transport, timeout=60)
    for rank in (0, 1, 3):
        msg = err.value.results[rank]
        assert msg is not None and "rank 2 (pid" in msg and "died" in msg, (rank, msg)


def _mismatched_strategy(ctx: sf_comm.Context, pass_len: bool) -> tuple[float, str]:
    strategy = "ulysses" if ctx.rank == 0 else "ring"
    q = torch.randn(1, 4, 2, 8)
    start = time.monotonic()
    try:
        sf_attn.parallel_attention(
            q, q, q, ctx=ctx, strategy=strategy, seq_len=8 if pass_len else None
        )
        return time.monotonic() - start, "no error"
    except (sf_comm.CommError, ValueError) as exc:
        return time.monotonic() - start, str(exc)
    finally:
        close_contexts()


@pytest.mark.parametrize("pass_len", [False, True])
def test_strategy_mismatch_names_each_side(ranks, pass_len: bool) -> None:
    """Catches a strategy mismatch across ranks on gloo ending as "Operation timed out!"
    after 22 s with no word of what each rank was doing."""
    results = ranks(2).run(
        _mismatched_strategy,
        pass_len,
        topology="1x2",
        transport="gloo",
        ctx_options={"timeout": 2.0},
    )
    for rank, (took, msg) in enumerate(results):
        if not pass_len:  # the shape agreement compares the strategies: at once
            assert "ranks disagree on strategy: ['ulysses', 'ring']" in msg, msg
            assert took < 2, took
        else:  # no agreement collective: detected at the timeout, both operations named
            assert "all_to_all" in msg and "shift+1" in msg, (rank, msg)
            assert took < 6, took
