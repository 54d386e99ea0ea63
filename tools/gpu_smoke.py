#!/usr/bin/env python3
"""GPU smoke test of the one-sided GPU transports (``torch-symm``, ``nvshmem``) on ONE GPU.

    python tools/gpu_smoke.py                                  # both transports, 2 and 4 ranks
    python tools/gpu_smoke.py --transports torch-symm --worlds 2 --budget 60
    python tools/gpu_smoke.py --env NVSHMEM_DEBUG=INFO         # extra env for the ranks

Ranks are spawned processes sharing cuda:0, with a gloo process group for set-up (NCCL
refuses two ranks on one GPU). Every rank builds every rank's inputs from fixed rules, so it
knows what it must receive; data is compared bit-exact (``torch.equal``). Each rank logs
every check as it starts and ends (JSON lines), so a crash or a hang still says where it
happened. Prints one PASS/FAIL/SKIP row per (transport, world, check) and exits 1 on any
FAIL (also on SKIP with --strict). A transport that cannot be built here (library missing,
``TransportUnavailable``) is a SKIP. ``tests/gpu/test_gpu_transports.py`` runs the same
checks under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages", "sf-comm", "src")
if importlib.util.find_spec("sf_comm") is None and os.path.isdir(_SRC):
    sys.path.insert(0, os.path.normpath(_SRC))  # a bare checkout; spawned ranks inherit sys.path

TRANSPORTS = ("torch-symm", "nvshmem")
DATA_CHECKS = (
    "all_to_all_uneven",
    "all_to_all_pieces",
    "shift",
    "all_gather",
    "pipelined",
    "non_contiguous",
    "no_host_wait",
    "barrier",
)
DEVICE = "cuda"  # where the checks put tensors (cuda:0 is current in every rank)
FAILURE_CHECKS = {2: ("mismatch", "timeout"), 4: ("peer_death",)}
WORKER_ENV = {
    # Several ranks on one GPU: torch's symmetric memory refuses that unless told otherwise.
    "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1",
    # One host, no InfiniBand needed: keep NVSHMEM from probing remote transports.
    "NVSHMEM_REMOTE_TRANSPORT": "none",
}


@dataclasses.dataclass(slots=True)
class Row:
    transport: str
    world: int
    check: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    detail: str = ""


# -- what the ranks run ------------------------------------------------------------------


def _make(tag: str, src: int, dst: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor member ``src`` sends to member ``dst`` under ``tag`` (same on every rank)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((tag, src, dst, shape)).encode()))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    else:
        t = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(dtype)
    return t.to(DEVICE)


def _expect(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(
            f"{what}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
        )
    if not torch.equal(got, want):
        bad = (got.reshape(-1) != want.reshape(-1)).nonzero()
        raise AssertionError(
            f"{what}: {bad.numel()} of {want.numel()} elements differ, first at flat index "
            f"{int(bad[0])} (byte offset {int(bad[0]) * want.element_size()})"
        )


def _check_all_to_all(
    ctx: Any,
    group: Any,
    tag: str,
    shape: Callable[[int, int], tuple[int, ...]],
    dtype: torch.dtype,
) -> None:
    """all_to_all in which member s sends member d a ``shape(s, d)`` tensor; every chunk checked."""
    from sf_comm import collectives

    me, n = group.index, group.size
    inputs = [_make(tag, me, j, shape(me, j), dtype) for j in range(n)]
    out = collectives.all_to_all(ctx, group, inputs, [shape(j, me) for j in range(n)]).wait()
    for j in range(n):
        _expect(out[j], _make(tag, j, me, shape(j, me), dtype), f"chunk from member {j}")


def check_all_to_all_uneven(ctx: Any, group: Any) -> None:
    """Uneven all_to_all, empty chunks included, each chunk within one slot."""
    _check_all_to_all(ctx, group, "a2a", lambda s, d: ((3 * s + 5 * d + 1) % 7, 33), torch.float32)


def check_all_to_all_pieces(ctx: Any, group: Any) -> None:
    """Uneven all_to_all of chunks cut into many slot-sized pieces (credits, slot reuse)."""
    _check_all_to_all(
        ctx, group, "a2a-big", lambda s, d: (40 + 17 * s + 9 * d, 129), torch.bfloat16
    )


def check_shift(ctx: Any, group: Any) -> None:
    """Ring shift and staged exchange: offsets 1, -1, 2 with per-member lengths."""
    from sf_comm import collectives

    me, n = group.index, group.size
    for offset in (1, -1, 2):
        if offset % n == 0:
            continue
        src = (me - offset) % n
        mine = _make(f"shift{offset}", me, 0, (100 + 7 * me, 64), torch.int32)
        got = collectives.shift(ctx, group, mine, offset, out_shape=(100 + 7 * src, 64)).wait()
        _expect(
            got,
            _make(f"shift{offset}", src, 0, (100 + 7 * src, 64), torch.int32),
            f"shift {offset:+d}",
        )


def check_all_gather(ctx: Any, group: Any) -> None:
    """All-gather of per-member lengths."""
    from sf_comm import collectives

    me, n = group.index, group.size
    mine = _make("gather", me, 0, (5 + me, 1000), torch.float16)
    got = collectives.all_gather(ctx, group, mine, [(5 + j, 1000) for j in range(n)]).wait()
    for j in range(n):
        _expect(got[j], _make("gather", j, 0, (5 + j, 1000), torch.float16), f"part of member {j}")


def check_pipelined(ctx: Any, group: Any) -> None:
    """Eight shifts in flight at once, waited on in reverse order."""
    from sf_comm import collectives

    me, n = group.index, group.size
    src = (me - 1) % n
    handles = []
    for r in range(8):
        mine = _make(f"pipe{r}", me, 0, (r * 613 + 7 * me,), torch.float32)
        handles.append(collectives.shift(ctx, group, mine, 1, out_shape=(r * 613 + 7 * src,)))
    for r in reversed(range(8)):
        _expect(
            handles[r].wait(),
            _make(f"pipe{r}", src, 0, (r * 613 + 7 * src,), torch.float32),
            f"round {r}",
        )


def check_non_contiguous(ctx: Any, group: Any) -> None:
    """A transposed (non-contiguous) send arrives as the same values."""
    from sf_comm import collectives

    me, n = group.index, group.size
    src = (me - 1) % n
    mine = _make("t", me, 0, (64, 48), torch.float32).t()
    got = collectives.shift(ctx, group, mine, 1, out_shape=(48, 64)).wait()
    _expect(got, _make("t", src, 0, (64, 48), torch.float32).t().contiguous(), "transposed")


def check_no_host_wait(ctx: Any, group: Any) -> None:
    """With host_wait=False, results are still correct on the waiting stream."""
    ctx.transport.host_wait = False
    try:
        check_all_to_all_pieces(ctx, group)
    finally:
        ctx.transport.host_wait = True


def check_barrier(ctx: Any, group: Any) -> None:
    """World barriers, then a barrier of members 0 and 1 only (per-peer counters)."""
    from sf_comm.transport import Group

    for _ in range(3):
        ctx.transport.barrier(group)
    if group.index < 2:
        ctx.transport.barrier(Group("pair", group.ranks[:2], group.rank, None))
    ctx.transport.barrier(group)


def check_mismatch(ctx: Any, group: Any) -> None:
    """Rank 1 expects 12 floats where rank 0 sends 10: rank 1 must raise a clear error."""
    from sf_comm.transport import CommError

    me = group.rank
    x = torch.zeros(10 if me == 0 else 7, device=DEVICE)
    want = torch.Size([12 if me == 1 else 7])
    handle = ctx.transport.exchange(
        group, [(1 - me, x)], [(1 - me, want, torch.float32)], op="mismatch_probe"
    )
    if me == 0:
        handle.wait()
        return
    try:
        handle.wait()
    except CommError as exc:
        for part in ("rank 1", "mismatch_probe", "48 bytes", "sent 40 bytes"):
            if part not in str(exc):
                raise AssertionError(f"error lacks {part!r}: {exc}") from exc
        return
    raise AssertionError("a size mismatch went unnoticed")


def check_timeout(ctx: Any, group: Any) -> None:
    """Rank 0 shifts while rank 1 (alive) never does: rank 0 must raise CommTimeout in time."""
    import torch.distributed as dist

    from sf_comm import collectives
    from sf_comm.transport import CommTimeout

    if group.rank == 0:
        ctx.transport.timeout = 2.0
        t0 = time.monotonic()
        try:
            collectives.shift(ctx, group, torch.ones(16, device=DEVICE), 1).wait()
        except CommTimeout as exc:
            took = time.monotonic() - t0
            if not ("rank 0" in str(exc) and "shift+1" in str(exc)) or not 1.5 <= took <= 10:
                raise AssertionError(f"after {took:.1f}s: {exc}") from exc
        else:
            raise AssertionError("a shift with a silent peer returned")
    dist.barrier()  # rank 1 stays alive (a hang, not a death) until rank 0 is done


def check_peer_death(ctx: Any, group: Any) -> None:
    """Rank 3 exits; rank 2, waiting on it, must raise an error naming it, well before the timeout."""
    import torch.distributed as dist

    from sf_comm.transport import CommError, CommTimeout

    dist.barrier()
    if group.rank == 3:
        time.sleep(0.5)
        raise SystemExit(3)  # the worker logs this check as ok and exits at once
    if group.rank != 2:
        return
    t0 = time.monotonic()
    x = torch.ones(16, device=DEVICE)
    try:
        ctx.transport.exchange(group, [(3, x)], [(3, x.shape, x.dtype)], op="death_probe").wait()
    except CommTimeout as exc:
        raise AssertionError(f"a dead peer was reported as a timeout: {exc}") from exc
    except CommError as exc:
        took = time.monotonic() - t0
        if not ("rank 2" in str(exc) and "[3]" in str(exc) and "died" in str(exc)) or took > 10:
            raise AssertionError(f"after {took:.1f}s: {exc}") from exc
        return
    raise AssertionError("an exchange with a dead peer returned")


CHECKS: dict[str, Callable[[Any, Any], None]] = {
    name: globals()[f"check_{name}"] for name in (*DATA_CHECKS, "mismatch", "timeout", "peer_death")
}


class _Log:
    """Per-rank JSON lines: a "start" and an "ok"/"fail"/"skip" record per check."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - lives until os._exit

    def write(self, check: str, status: str, seconds: float = 0.0, detail: str = "") -> None:
        self._f.write(
            json.dumps(
                dict(check=check, status=status, seconds=seconds, detail=detail, t=time.time())
            )
            + "\n"
        )
        self._f.flush()
        os.fsync(self._f.fileno())

    def run(self, check: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        from sf_comm.gpu import TransportUnavailable

        self.write(check, "start")
        t0 = time.monotonic()
        try:
            result = fn()
        except SystemExit:
            self.write(check, "ok", time.monotonic() - t0, "exited on purpose")
            os._exit(0)
        except TransportUnavailable as exc:
            self.write(check, "skip", time.monotonic() - t0, str(exc))
            return False, None
        except BaseException as exc:
            tb = traceback.format_exception(exc)
            self.write(
                check,
                "fail",
                time.monotonic() - t0,
                f"{type(exc).__name__}: {exc}\n{''.join(tb[-6:])}",
            )
            return False, None
        self.write(check, "ok", time.monotonic() - t0)
        return True, result


def _worker(
    rank: int,
    world: int,
    transport: str,
    tmp: str,
    timeout: float,
    slot_bytes: int,
    env: dict[str, str],
) -> None:
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(env)
    log = _Log(os.path.join(tmp, f"rank{rank}.jsonl"))
    try:
        import torch.distributed as dist

        from sf_comm import gpu
        from sf_comm.transport import Group

        torch.cuda.set_device(0)
        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        ok, tr = log.run(
            "create",
            lambda: gpu.create(
                transport,
                rank=rank,
                world_size=world,
                timeout=timeout,
                device="cuda:0",
                slot_bytes=slot_bytes,
            ),
        )
        if not ok:
            return
        if rank == 0:
            props = torch.cuda.get_device_properties(0)
            log.write(
                "env",
                "ok",
                0.0,
                f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}",
            )
        ctx = SimpleNamespace(transport=tr)
        group = Group("world", tuple(range(world)), rank, dist.group.WORLD)
        for name in (*DATA_CHECKS, *FAILURE_CHECKS.get(world, ())):
            log.run(name, functools.partial(CHECKS[name], ctx, group))
    except BaseException as exc:
        log.write("worker", "fail", 0.0, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no teardown: a failed check may leave kernels spinning or peers gone


# -- the parent: spawn, deadline, merge -----------------------------------------------------


def _merge(
    transport: str,
    world: int,
    logs: list[list[dict[str, Any]]],
    killed: list[int],
    exitcodes: list[int | None],
    budget_s: float,
) -> list[Row]:
    rows = []
    for rank, entries in enumerate(logs):
        if not entries:
            rows.append(
                Row(
                    transport,
                    world,
                    "startup",
                    "FAIL",
                    0.0,
                    f"rank {rank} logged nothing (exit code {exitcodes[rank]})",
                )
            )
    order = list(dict.fromkeys(e["check"] for entries in logs for e in entries))
    for check in order:
        per = {r: [e for e in entries if e["check"] == check] for r, entries in enumerate(logs)}
        ends = {r: es[-1] for r, es in per.items() if es and es[-1]["status"] != "start"}
        started = {r for r, es in per.items() if es}
        seconds = max((e["seconds"] for e in ends.values()), default=0.0)
        # the rank that failed first is the likeliest cause; the others mostly time out on it
        fails = sorted((e["t"], r, e["detail"]) for r, e in ends.items() if e["status"] == "fail")
        skips = [(r, e["detail"]) for r, e in ends.items() if e["status"] == "skip"]
        hung = sorted(started - set(ends))
        if fails:
            _, r, detail = fails[0]
            more = f" (and {len(fails) - 1} more ranks)" if len(fails) > 1 else ""
            rows.append(Row(transport, world, check, "FAIL", seconds, f"rank {r}{more}: {detail}"))
        elif hung:
            why = "killed at the deadline" if set(hung) & set(killed) else "exited"
            codes = {r: exitcodes[r] for r in hung}
            rows.append(
                Row(
                    transport,
                    world,
                    check,
                    "FAIL",
                    seconds,
                    f"ranks {hung} never finished it ({why} after {budget_s:.0f}s; exit codes {codes})",
                )
            )
        elif skips:
            rows.append(
                Row(transport, world, check, "SKIP", seconds, f"rank {skips[0][0]}: {skips[0][1]}")
            )
        else:
            detail = next((e["detail"] for e in ends.values() if e["detail"]), "")
            rows.append(Row(transport, world, check, "PASS", seconds, detail))
    return rows


def run_world(
    transport: str,
    world: int,
    *,
    budget_s: float = 45.0,
    timeout_s: float = 15.0,
    slot_bytes: int = 4096,
    env: dict[str, str] | None = None,
) -> list[Row]:
    """Run every check with ``world`` ranks on cuda:0; one row per check (see module doc)."""
    if transport == "nvshmem" and importlib.util.find_spec("nvshmem") is None:
        return [
            Row(
                transport,
                world,
                "create",
                "SKIP",
                0.0,
                "nvshmem4py is not installed (pip install nvshmem4py-cu12 or -cu13)",
            )
        ]
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sf-gpu-smoke-") as tmp:
        args = (world, transport, tmp, timeout_s, slot_bytes, dict(env or {}))
        procs = [spawn.Process(target=_worker, args=(r, *args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + budget_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        killed = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in killed:
            procs[r].kill()
            procs[r].join(5)
        logs = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.jsonl")
            with open(path) if os.path.exists(path) else open(os.devnull) as f:
                logs.append([json.loads(line) for line in f if line.strip()])
    return _merge(transport, world, logs, killed, [p.exitcode for p in procs], budget_s)


def format_rows(rows: list[Row]) -> str:
    head = f"{'transport':<11} {'world':>5}  {'check':<18} {'result':<6} {'time_s':>7}  detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        detail = r.detail.strip().splitlines()
        first = detail[0][:160] if detail else ""
        lines.append(
            f"{r.transport:<11} {r.world:>5}  {r.check:<18} {r.status:<6} {r.seconds:7.2f}  {first}"
        )
        if r.status == "FAIL":
            lines += [f"{'':>44}| {line[:150]}" for line in detail[1:12]]
    return "\n".join(lines)


def _versions() -> str:
    out = [
        f"python {sys.version.split()[0]}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda})",
    ]
    for name in (
        "nvshmem4py-cu12",
        "nvshmem4py-cu13",
        "cuda-core",
        "nvidia-nvshmem-cu12",
        "nvidia-nvshmem-cu13",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{name} {importlib.metadata.version(name)}")
    try:
        from torch._C._distributed_c10d import _SymmetricMemory

        api = [
            m
            for m in ("put_signal", "wait_signal", "get_buffer", "get_remote_tensor")
            if hasattr(_SymmetricMemory, m)
        ]
        out.append(f"symm-mem handle API: {api}")
    except ImportError as exc:
        out.append(f"no torch symmetric memory ({exc})")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds for everything")
    ap.add_argument("--world-budget", type=float, default=40.0, help="seconds per spawned world")
    ap.add_argument("--timeout", type=float, default=15.0, help="transport timeout in the ranks")
    ap.add_argument("--slot-bytes", type=int, default=4096, help="small, so messages span pieces")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the ranks")
    ap.add_argument("--strict", action="store_true", help="a SKIP fails the run too")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    print(f"gpu_smoke: {_versions()}", flush=True)
    if not torch.cuda.is_available():
        print("gpu_smoke: FAIL: torch sees no CUDA device", flush=True)
        return 2
    start, rows = time.monotonic(), []
    for transport in args.transports.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            left = args.budget - (time.monotonic() - start)
            if left < 10:
                rows.append(Row(transport, world, "budget", "SKIP", 0.0, "total --budget spent"))
                continue
            got = run_world(
                transport,
                world,
                budget_s=min(args.world_budget, left),
                timeout_s=args.timeout,
                slot_bytes=args.slot_bytes,
                env=env,
            )
            rows += got
            status = (
                "FAIL" if any(r.status == "FAIL" for r in got) else got[-1].status if got else "?"
            )
            print(
                f"gpu_smoke: {transport} x{world}: {status} ({time.monotonic() - start:.0f}s elapsed)",
                flush=True,
            )
    print(format_rows(rows), flush=True)
    for transport in args.transports.split(","):
        mine = [r for r in rows if r.transport == transport]
        counts = {s: sum(r.status == s for r in mine) for s in ("PASS", "FAIL", "SKIP")}
        print(
            f"summary {transport}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True
        )
    bad = {"FAIL", "SKIP"} if args.strict else {"FAIL"}
    failed = any(r.status in bad for r in rows)
    print(
        f"gpu_smoke: {'FAIL' if failed else 'PASS'} in {time.monotonic() - start:.0f}s", flush=True
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
