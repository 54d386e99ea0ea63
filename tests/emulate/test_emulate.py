"""``streamfusion emulate`` and :mod:`sf_comm.emulate`: machines as network namespaces.

The emulations need root (network namespaces, tc); without them the tests that build one
skip, saying why. Every test that runs an emulation also checks that nothing is left behind:
no namespace of that emulator, no /etc/netns entry, no rank process, no new shared-memory
segment, no new interface in the root namespace.

The default run starts one emulation (the throughput check, plus a few cheap error lines);
the rest (failures, signals, stale sets, two at once, every strategy) with ``--run-slow``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sf_comm.emulate import PREFIX, Emulation, emulation_namespaces
from sf_comm.launch import RankPool

HERE = Path(__file__).parent
STREAMFUSION = [sys.executable, "-m", "sf_models.cli"]
PY = sys.executable
# The ranks' own waits end well within this; a hung emulator is a failure, not a stall.
RUN_TIMEOUT_S = 240


def _netns_problem() -> str | None:
    """Why this host cannot build an emulation, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (iproute2)"
    name = f"sfprobe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.fixture(scope="module")
def netns() -> None:
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines() if ":" in line}


def _shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sf-")}


class Leftovers:
    """What exists before an emulation, to compare with what exists after it."""

    def __init__(self) -> None:
        self.links = _root_links()
        self.shm = _shm_segments()

    def check(self, emulator_pid: int, rank_pids: list[int]) -> None:
        deadline = time.monotonic() + 10  # reaping a SIGKILLed process takes a moment
        while time.monotonic() < deadline and any(_alive(p) for p in rank_pids):
            time.sleep(0.1)
        assert not [p for p in rank_pids if _alive(p)], "rank processes still running"
        assert emulator_pid not in emulation_namespaces(), "namespaces left behind"
        etc = [n for n in os.listdir("/etc/netns")] if os.path.isdir("/etc/netns") else []
        assert not [n for n in etc if n.startswith(f"{PREFIX}-{emulator_pid}-")]
        assert _root_links() <= self.links, "interfaces left in the root namespace"
        assert _shm_segments() <= self.shm, "shared-memory segments left behind"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _emulate(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*STREAMFUSION, "emulate", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"emulate did not end within {RUN_TIMEOUT_S}s:\n{out}\n{err}")
    return proc.returncode, out, err


def _pids(out: str) -> dict[int, int]:
    """{rank: pid} from the ``[rank N] PID <pid>`` lines."""
    return {int(r): int(p) for r, p in re.findall(r"^\[rank (\d+)\] PID (\d+)", out, re.M)}


def _results(out: str) -> list[dict]:
    return [
        json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line
    ]


# -- default --------------------------------------------------------------------------------


def test_throughput_2x2(netns: None) -> None:
    """A 2x2 emulation at 0.4 Gbit/s: 8 MB between machines arrives at the asked rate (within
    30%), also when both ranks of a machine send at once (they share its NIC), 8 MB inside a
    machine clearly faster, every output line carries its rank, and nothing is left
    afterwards. Catches unshaped links (inter runs at loopback speed), a rate per rank
    instead of per machine, links
    shaped so tightly that large transfers stall (burst or queue too small: far below the
    rate), shaping that also slows loopback, ranks that share one namespace, and leaks."""
    before = Leftovers()
    proc = _emulate(
        "--topology", "2x2", "--inter-gbps", "0.4", "--inter-latency-us", "200",
        "--timeout", "180", "--", PY, str(HERE / "prog_throughput.py"),
    )  # fmt: skip
    code, out, err = _finish(proc)
    assert code == 0, out + err
    pids = _pids(out)
    assert sorted(pids) == [0, 1, 2, 3], out
    for line in out.splitlines():
        assert re.match(r"^\[rank [0-3]\] ", line), f"unprefixed output line {line!r}"
    results = _results(out)
    got = {r["pair"]: r for r in results}
    inter, intra = got["inter"]["gbps"], got["intra"]["gbps"]
    assert abs(inter - 0.4) / 0.4 < 0.3, f"inter-machine {inter:.3f} Gbit/s, asked 0.4"
    # two ranks of a machine sending at once share its NIC: together, not each, at the rate
    both = [r["seconds"] for r in results if r["pair"] == "shared"]
    shared = len(both) * 8 * 2**20 * 8 / max(both) / 1e9  # bytes of both over the slower one
    assert abs(shared - 0.4) / 0.4 < 0.3, f"two ranks together {shared:.3f} Gbit/s, asked 0.4"
    # loopback moves GB/s even on a busy 2-core box; 3x is "clearly faster" with room to spare
    assert intra > 3 * inter, f"intra-machine {intra:.3f} Gbit/s vs inter {inter:.3f}"
    assert got["inter"]["machine"] == "1" and got["intra"]["machine"] == "0"
    assert got["inter"]["netns"] != got["intra"]["netns"], "machines share a namespace"
    before.check(proc.pid, list(pids.values()))


def test_env_of_a_rank() -> None:
    """The environment a rank gets (no privileges needed): torchrun's variables in machine
    order, the master on machine 0, gloo on the emulated NIC. Catches ranks numbered
    across machines the wrong way round and a master unreachable from other namespaces."""
    emu = Emulation("2x3", inter_gbps=1)
    env = emu.env(4, base={"KEEP": "1"})
    assert env["KEEP"] == "1"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "4", "6", "1", "3",
    )  # fmt: skip
    assert env["GROUP_RANK"] == env["NODE_RANK"] == env["SF_EMULATED_MACHINE"] == "1"
    assert env["MASTER_ADDR"] == Emulation.address(0) and env["SF_TOPOLOGY"] == "2x3"
    assert env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert emu.namespace(1).startswith(f"{PREFIX}-{os.getpid()}-")
    with pytest.raises(ValueError, match="inter_gbps"):
        Emulation("2x2", inter_gbps=0)
    with pytest.raises(ValueError, match="rank 6"):
        emu.env(6)


def test_shm_errors_name_job_ranks() -> None:
    """The shm half of shm+gloo numbers ranks within the machine; its errors are raised with
    the job's numbers. Catches an error on machine 1 that blames "rank 0" (the job's rank 0,
    on another machine, innocent) for its machine-mate rank 2."""
    from sf_comm.shm_gloo import ShmGlooTransport, _keep_numbers

    t = ShmGlooTransport.__new__(ShmGlooTransport)  # only the rank map is needed
    t._mine = (2, 3)
    text = "rank 1: shift+1 (call #3 x): rank 0 (pid 77) died; waiting for ranks [0, 1]: ranks 0, 1"
    assert t.global_ranks(text) == (
        "rank 3: shift+1 (call #3 x): rank 2 (pid 77) died; waiting for ranks [2, 3]: ranks 2, 3"
    )
    # a reason the gloo half passed to the machine-mates keeps the job's numbers
    passed_on = _keep_numbers("rank 0: all_gather: rank 1 (pid 5) died")
    assert t.global_ranks(f"rank 1: x: rank 0 gave up ({passed_on})") == (
        "rank 3: x: rank 2 gave up (rank 0: all_gather: rank 1 (pid 5) died)"
    )


def _one_host(ctx: Any, transport_name: str) -> dict[str, Any]:
    """On a rank of a one-host pool: which transport a context got, and the shm+gloo routes
    of an all_gather of a 1 MB tensor (bit-exact)."""
    import torch

    import sf_comm

    if transport_name == "auto":
        return {"name": ctx.transport.name}
    got = sf_comm.all_gather(ctx, ctx.group("world"), torch.full((2**18,), float(ctx.rank)))
    exact = all(torch.equal(t, torch.full((2**18,), float(r))) for r, t in enumerate(got.wait()))
    routes = {f"{route} {peer}": n for (route, peer), n in ctx.transport.routes.items()}
    return {"name": ctx.transport.name, "exact": exact, "routes": routes}


def test_one_host_keeps_shm(ranks: Callable[[int], RankPool]) -> None:
    """On one host (no emulation, no privileges) ``auto`` still picks shm, and shm+gloo asked
    for by name sends everything through shm. Catches an auto that switches every CPU job
    to the mixed transport, or machine detection that splits one host's ranks."""
    pool = ranks(2)
    auto = pool.run(_one_host, "auto", topology="2x1", transport="auto")
    assert [r["name"] for r in auto] == ["shm", "shm"]
    for r in pool.run(_one_host, "shm+gloo", topology="2x1", transport="shm+gloo"):
        assert r["name"] == "shm+gloo" and r["exact"], r
        assert r["routes"] and all(k.startswith("shm ") for k in r["routes"]), r


GOOD = ["--topology", "2x2", "--inter-gbps", "1"]
BAD = [  # (arguments, words the error line must contain)
    (["--topology", "2x2", "--inter-gbps", "0", "--", "true"], ("--inter-gbps", "'0'")),
    (["--topology", "2y2", "--inter-gbps", "1", "--", "true"], ("--topology", "2y2")),
    (["--topology", "2x2", "--inter-gbps", "-1", "--", "true"], ("--inter-gbps", "-1")),
    ([*GOOD, "--intra-gbps", "0", "--", "true"], ("--intra-gbps",)),
    ([*GOOD, "--inter-latency-us", "-5", "--", "true"], ("latency",)),
    (GOOD, ("CMD", "--")),
    ([*GOOD, "--"], ("CMD",)),
    (["--inter-gbps", "1", "--", "true"], ("--topology",)),
]


@pytest.mark.parametrize(
    "argv,says",
    [pytest.param(*BAD[0], id="rate-0")]
    + [pytest.param(*b, id=f"bad-{i}", marks=pytest.mark.slow) for i, b in enumerate(BAD[1:])],
)
def test_user_error_is_one_line(argv: list[str], says: tuple[str, ...]) -> None:
    """A bad command line ends with status 2 and one stderr line naming the option, before any
    namespace exists. Catches tracebacks, argparse usage blocks, and a zero rate reaching tc."""
    done = subprocess.run(
        [*STREAMFUSION, "emulate", *argv], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in says:
        assert word in lines[0], lines[0]


def test_without_privileges_one_line(tmp_path: Path) -> None:
    """As an unprivileged user: status 2 and one line saying root is needed; no traceback.
    Catches the ``ip`` error escaping as a traceback, or an emulation half built."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *STREAMFUSION,
         "emulate", "--topology", "2x1", "--inter-gbps", "1", "--", "true"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "root" in lines[0] and "Traceback" not in done.stderr


# -- slow: failures, signals, stale sets, concurrency ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode,want", [("fail", 3), ("kill", 128 + signal.SIGKILL)])
def test_failing_rank_stops_the_others(netns: None, mode: str, want: int) -> None:
    """Rank 1 exits 3 (or is SIGKILLed) while the others sleep for minutes: the emulator
    returns that status within the grace period and stops the rest. Catches an emulator
    that waits for every rank (hangs), returns 0 or the status of a rank it stopped itself,
    or leaves the sleepers running."""
    before = Leftovers()
    start = time.monotonic()
    argv = [mode, "1", "3"] if mode == "fail" else [mode, "1"]
    proc = _emulate(
        "--topology", "2x2", "--inter-gbps", "1", "--grace", "1", "--",
        PY, str(HERE / "prog_ranks.py"), *argv,
    )  # fmt: skip
    code, out, err = _finish(proc)
    assert code == want, out + err
    assert time.monotonic() - start < 60
    assert "rank 1 exited with status" in err
    pids = _pids(out)
    assert len(pids) == 4
    before.check(proc.pid, list(pids.values()))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_emulator_cleans_up(netns: None, sig: int) -> None:
    """SIGTERM (a scheduler, ``kill``), SIGINT (Ctrl-C) or SIGHUP (a closed terminal) to the
    emulator while every rank
    runs: it stops the ranks, removes the namespaces and exits 128 + signal. Catches an
    emulator that dies at once and leaves namespaces and ranks behind."""
    before = Leftovers()
    proc = _emulate(
        "--topology", "2x2", "--inter-gbps", "1", "--", PY, str(HERE / "prog_ranks.py"), "sleep"
    )
    assert proc.stdout is not None
    seen = ""
    while len(_pids(seen)) < 4:
        line = proc.stdout.readline()
        assert line, "emulator ended before its ranks started"
        seen += line
    proc.send_signal(sig)
    code, _, err = _finish(proc)
    assert code == 128 + sig, err
    assert "Traceback" not in err, err
    before.check(proc.pid, list(_pids(seen).values()))


@pytest.mark.slow
def test_timeout_stops_everything(netns: None) -> None:
    """``--timeout`` bounds the run: sleeping ranks are stopped and the status is 124."""
    before = Leftovers()
    proc = _emulate(
        "--topology", "1x2", "--inter-gbps", "1", "--timeout", "3", "--",
        PY, str(HERE / "prog_ranks.py"), "sleep",
    )  # fmt: skip
    code, out, err = _finish(proc)
    assert code == 124 and "timed out" in err, err
    before.check(proc.pid, list(_pids(out).values()))


@pytest.mark.slow
def test_stale_set_is_removed(netns: None) -> None:
    """A SIGKILLed emulator cannot clean up: its ranks die with it (PDEATHSIG), and the next
    emulation removes its namespaces and says so. Catches ranks that outlive the emulator
    and stale sets that pile up."""
    before = Leftovers()
    proc = _emulate(
        "--topology", "2x1", "--inter-gbps", "1", "--", PY, str(HERE / "prog_ranks.py"), "sleep"
    )
    assert proc.stdout is not None
    seen = ""
    while len(_pids(seen)) < 2:
        line = proc.stdout.readline()
        assert line, "emulator ended before its ranks started"
        seen += line
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.pid in emulation_namespaces(), "a SIGKILLed emulator cannot have cleaned up"
    notes: list[str] = []
    with Emulation("1x1", inter_gbps=1, notice=notes.append) as emu:
        code = emu.run(["true"], stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0
    assert any(f"stale emulation of pid {proc.pid}" in n for n in notes), notes
    before.check(proc.pid, list(_pids(seen).values()))


@pytest.mark.slow
def test_two_emulations_at_once(netns: None) -> None:
    """Two emulations side by side, each with its own network (same addresses, separate
    namespaces): both all_reduce correctly. Catches names that collide between runs."""
    before = Leftovers()
    prog = [PY, str(HERE / "prog_ranks.py"), "allreduce"]
    procs = [_emulate("--topology", "2x1", "--inter-gbps", "1", "--", *prog) for _ in range(2)]
    outs = [_finish(p) for p in procs]
    netns_ids = []
    for code, out, err in outs:
        assert code == 0, out + err
        assert out.count("SUM 3") == 2, out
        netns_ids += re.findall(r"NETNS (\d+)", out)
    assert len(set(netns_ids)) == 4, "two emulations shared a namespace"
    for p, (_, out, _) in zip(procs, outs):
        before.check(p.pid, list(_pids(out).values()))


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["2x2", "4x1"])
def test_every_strategy_exact_over_shm_gloo(netns: None, topology: str) -> None:
    """Every sf_attn strategy under an emulation with ``transport="auto"``: auto picks
    shm+gloo (the ranks are on several machines), results equal one-process attention, and
    every byte to another machine went through gloo, every byte inside a machine through shm
    (4x1: no machine-mates, no shm half at all). Catches auto keeping plain shm
    (inter-machine bytes skipping the emulated NIC), routing by topology labels instead of
    detected machines, and wrong results of the mixed transport (messages merged in the
    wrong order)."""
    before = Leftovers()
    machines, gpus = (int(x) for x in topology.split("x"))
    out, err = io.StringIO(), io.StringIO()
    with Emulation(topology, inter_gbps=1) as emu:
        code = emu.run([PY, str(HERE / "prog_attention.py")], timeout=180, stdout=out, stderr=err)
    assert code == 0, out.getvalue() + err.getvalue()
    results = _results(out.getvalue())
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    expected = [list(range(m * gpus, (m + 1) * gpus)) for m in range(machines)]
    for r in results:
        assert r["transport"] == "shm+gloo" and r["machines"] == expected, r
        assert r["wrong_route"] == [] and r["bytes"]["gloo"] > 0, r
        # the shm half maps only this machine's heaps
        assert r["shm_world"] == (gpus if gpus > 1 else None), r
        assert (r["bytes"]["shm"] > 0) == (gpus > 1), r
    before.check(os.getpid(), [r["pid"] for r in results])


@pytest.mark.slow
def test_dead_rank_fails_the_others_fast_over_shm_gloo(netns: None) -> None:
    """Rank 2 dies between two attention calls on shm+gloo: its machine-mate (shm) and the
    other machine's ranks (gloo) each raise a CommError within seconds, not at their 60 s
    timeout, and at least one names rank 2; the emulator ends long before its 60 s grace.
    Catches a failure in one half that the other half's peers never hear of (they would
    wait for their whole timeout)."""
    before = Leftovers()
    out, err = io.StringIO(), io.StringIO()
    with Emulation("2x2", inter_gbps=1, grace_s=60) as emu:
        start = time.monotonic()
        code = emu.run([PY, str(HERE / "prog_attention.py"), "die", "2"], stdout=out, stderr=err)
        took = time.monotonic() - start
    text = out.getvalue()
    # 7 from rank 2 unless a peer's exit (1) was seen first: they fail within milliseconds
    # of the death (Note [First failure] in sf_comm.emulate)
    assert code in (7, 1), text + err.getvalue()
    failed = re.findall(r"^\[rank (\d)\] FAILED ([\d.]+) (.*)$", text, re.M)
    assert sorted(int(r) for r, _, _ in failed) == [0, 1, 3], text + err.getvalue()
    assert all(float(s) < 20 for _, s, _ in failed), failed
    assert any("rank 2" in message for _, _, message in failed), failed
    assert took < 55, f"the survivors waited for the grace period ({took:.0f}s)"
    before.check(os.getpid(), list(_pids(text).values()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "shm_env",
    [{}, {"SF_SHM_CMA_MIN_KB": "0", "SF_SHM_SLOT_MB": "0.0625"}],
    ids=["default", "eager-64k-slots"],
)
def test_collectives_bit_exact_over_shm_gloo(netns: None, shm_env: dict[str, str]) -> None:
    """sf_comm's collectives under a 2x2 emulation on shm+gloo, 4 KB to 12 MB, four at once
    and waited in reverse order: every byte arrives, bit for bit, by the right route. The
    eager variant cuts each 12 MB shm message into 192 pieces through two 64 KiB slots, so a
    sender must keep being polled while it waits on its gloo half. Catches a wait that
    drives one half only (a deadlock, ending at the 60 s timeout) and results of the two
    halves merged in the wrong order."""
    before = Leftovers()
    out, err = io.StringIO(), io.StringIO()
    with Emulation("2x2", inter_gbps=2) as emu:
        code = emu.run(
            [PY, str(HERE / "prog_collectives.py")],
            timeout=180,
            env={**os.environ, **shm_env},
            stdout=out,
            stderr=err,
        )
    assert code == 0, out.getvalue() + err.getvalue()
    results = _results(out.getvalue())
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    for r in results:
        assert r["transport"] == "shm+gloo" and r["bad"] == [] and r["wrong_route"] == [], r
        if shm_env:  # the settings reached the shm half
            assert r["shm_slot_bytes"] == 64 * 1024 and not r["shm_rendezvous"], r
    before.check(os.getpid(), [])


def _where(ctx: Any) -> tuple[str, str]:
    return ctx.transport.name, os.readlink("/proc/self/ns/net")


def test_rank_pool_and_bench_under_emulation(netns: None) -> None:
    """A rank pool on an emulation (what ``bench attention --emulate`` and ``run --emulate``
    use): each rank joins its machine's namespace (machine-mates share one, machines differ),
    ``auto`` picks shm+gloo there, and every strategy of the attention bench equals
    one-process attention over the mixed transport. Catches pool ranks left in the host's
    namespace (their bytes would skip the emulated links) and a bench that times wrong
    results."""
    from sf_attn import strategy_bench

    before = Leftovers()
    with Emulation("2x2", inter_gbps=2) as emu, RankPool(4, emulation=emu) as pool:
        where = pool.run(_where, topology="2x2", transport="auto")
        rows = strategy_bench.run(
            4, "2x2", (1, 256, 4, 16), iters=1, rounds=1, pool=pool, transports=("shm+gloo",)
        )
        pids = [p.pid for p in pool._procs]
    assert [w[0] for w in where] == ["shm+gloo"] * 4, where
    namespaces = [w[1] for w in where]
    assert namespaces[0] == namespaces[1] != namespaces[2] == namespaces[3], namespaces
    assert namespaces[0] != os.readlink("/proc/self/ns/net")
    measured = [r for r in rows if r["strategy"] != "sdpa"]
    assert len(measured) == len(strategy_bench.STRATEGIES)
    assert all(r["max_abs_err"] < 1e-5 for r in measured), rows
    before.check(os.getpid(), [p for p in pids if p is not None])
