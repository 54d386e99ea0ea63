"""Several machines on one host: network namespaces joined by rate-limited links.

``SF_TOPOLOGY=2x2`` alone only *labels* ranks as machines; every pair still talks at the same
speed. An :class:`Emulation` gives each emulated machine a network namespace of its own, with
one NIC (``eth0``) cabled to a switch, and shapes that NIC with ``tc``, so bytes between
machines cross a link of the asked rate and latency while bytes inside a machine go over the
namespace's loopback::

    with Emulation("2x2", inter_gbps=0.4, inter_latency_us=200) as emu:
        code = emu.run([sys.executable, "prog.py"])     # one process per rank, output prefixed

    # or start ranks yourself (a benchmark, a pool):
    with Emulation("2x2", inter_gbps=10) as emu:
        procs = [emu.popen(rank, argv) for rank in range(emu.world_size)]

Each rank's environment (:meth:`Emulation.env`) is torchrun's (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK) plus ``SF_TOPOLOGY``,
``GLOO_SOCKET_IFNAME=eth0`` (gloo then uses the shaped NIC; ranks of one machine reach their
own address over loopback) and ``SF_EMULATED_MACHINE``. The command line is ``streamfusion
emulate``; docs/emulate.md describes the link model and the cleanup guarantees.

Note [Emulated link model]
    Namespace ``<base>-sw`` holds a bridge ``br0`` (the switch). Machine i's namespace
    ``<base>-m<i>`` holds ``lo`` and ``eth0`` (address 10.77.0.<i+1>/24), the machine end of a
    veth pair whose other end ``p<i>`` is a port of the bridge. Both ends are created inside
    their namespaces (``ip link add ... netns``), so the root namespace's networking is never
    touched, and interface names only need to be unique inside one namespace. Each direction
    of a machine's NIC is shaped where it leaves a device: machine -> switch on ``eth0``,
    switch -> machine on ``p<i>``. Each of the two has an HTB root whose one class runs at the
    asked rate (all of the machine's ranks share it, as they share a real NIC), with a netem
    leaf that adds half the asked one-way latency; a packet between two machines crosses one
    of each, so its latency is the asked one and each machine's uplink and downlink run at
    the asked rate. The HTB burst is 1 ms of traffic (at least 128 KiB: a segmentation-offload
    packet of 64 KiB must fit, or the class stalls on it), and netem's queue holds 100,000
    packets, far above any TCP window on this host, so large transfers queue instead of being
    dropped. ``--intra-gbps`` adds the same HTB (no delay) on each machine's ``lo``.

Note [First failure]
    The exit status of a run is that of the rank that failed first, which is usually the
    cause; the ranks that fail after it mostly report the loss of that peer. Peers notice a
    death within milliseconds (a dead rank is a zombie from the moment it exits, and
    sf_comm's transports look for that), sooner than the kernel lets the emulator reap it (a
    process is reaped once all its threads are gone). So the emulator, too, takes a rank's
    end from its zombie state, polled every 20 ms, and orders failures by that.

Note [Emulation cleanup]
    Every run's names carry the emulator's pid and a random tag (``sfemu-<pid>-<tag>-...``),
    so two emulations never collide. :meth:`Emulation.close` runs on every way out of the
    ``with`` block: success, errors, Ctrl-C, and SIGTERM or SIGHUP (turned into SystemExit
    while an emulation is open in the main thread). It stops the ranks (SIGTERM to each
    rank's process group, SIGKILL after a grace), kills whatever else still runs inside the
    namespaces, and deletes them; deleting a namespace destroys its interfaces, and with them
    their qdiscs and the veth peers. Signals are blocked while it runs, so a second Ctrl-C
    cannot cut it short. Ranks get SIGKILL if the emulator dies (PR_SET_PDEATHSIG); for a
    SIGKILLed emulator, whose namespaces nobody removed, the next emulation removes every set
    whose pid is not running (and says so on stderr) before it creates its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from ._liveness import pid_alive
from .topology import Topology

PREFIX = "sfemu"  # every namespace of an emulation starts with it
SUBNET = "10.77.0"  # machine i is SUBNET.(i+1)
MASTER_PORT = 29500  # free by construction: machine 0's namespace is new
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(sw|m\d+)$")
_MAX_MACHINES = 250
_QUEUE_LIMIT = 100_000  # packets; Note [Emulated link model]
_MIN_BURST = 128 * 1024  # bytes; Note [Emulated link model]
_ETC_NETNS = "/etc/netns"  # per-namespace /etc files of `ip netns exec`
_KILL_AFTER_S = 5.0  # SIGTERM -> SIGKILL
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class EmulationError(RuntimeError):
    """Building or tearing down the emulated network failed."""


class EmulationUnavailable(EmulationError):
    """This host or user cannot emulate (not root, no ``ip``/``tc``, no network namespaces)."""


def exit_code(returncode: int) -> int:
    """A process's status as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Emulation:
    """``topology`` machines as network namespaces on this host; see the module docstring.

    Args:
        topology: a :class:`~sf_comm.Topology` or ``"MACHINESxGPUS"``: machines x ranks each.
        inter_gbps: each machine's NIC rate, Gbit/s per direction, shared by its ranks.
        inter_latency_us: one-way latency between two machines, microseconds.
        intra_gbps: loopback rate inside a machine (None: unshaped).
        grace_s: after a rank fails, how long :meth:`run` lets the others end on their own
            before it stops them.
        notice: where one-line notices go (stale sets removed, a rank failed); default stderr.

    Raises:
        ValueError: a bad topology or rate, naming the field and the value.
    """

    def __init__(
        self,
        topology: Topology | str,
        *,
        inter_gbps: float,
        inter_latency_us: float = 0.0,
        intra_gbps: float | None = None,
        grace_s: float = 5.0,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.topology = Topology.parse(topology) if isinstance(topology, str) else topology
        if self.topology.machines > _MAX_MACHINES:
            raise ValueError(
                f"Emulation topology {self.topology}: at most {_MAX_MACHINES} machines"
            )
        for field, value in (("inter_gbps", inter_gbps), ("intra_gbps", intra_gbps)):
            if value is not None and not (isinstance(value, int | float) and 0 < value < 1e5):
                raise ValueError(f"Emulation.{field} must be a rate in Gbit/s > 0, got {value!r}")
        if not (isinstance(inter_latency_us, int | float) and 0 <= inter_latency_us < 1e7):
            raise ValueError(
                f"Emulation.inter_latency_us must be >= 0 microseconds, got {inter_latency_us!r}"
            )
        if not grace_s >= 0:
            raise ValueError(f"Emulation.grace_s must be >= 0, got {grace_s!r}")
        self.inter_gbps = float(inter_gbps)
        self.inter_latency_us = float(inter_latency_us)
        self.intra_gbps = None if intra_gbps is None else float(intra_gbps)
        self.grace_s = float(grace_s)
        self._notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
        self.base = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self._made: list[str] = []  # namespaces created, in creation order
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started = False
        self._previous: dict[signal.Signals, Any] = {}  # handlers replaced while open
        # whether links delay packets: None until a link asks for a delay; False where the
        # kernel lacks netem (the rate is still shaped)
        self.latency_emulated: bool | None = None

    # -- names and environment ------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def switch(self) -> str:
        """The switch's namespace."""
        return f"{self.base}-sw"

    def namespace(self, machine: int) -> str:
        """Machine ``machine``'s namespace."""
        return f"{self.base}-m{machine}"

    def namespaces(self) -> list[str]:
        return [self.switch] + [self.namespace(m) for m in range(self.topology.machines)]

    @staticmethod
    def address(machine: int) -> str:
        """Machine ``machine``'s address on the emulated network."""
        return f"{SUBNET}.{machine + 1}"

    def env(self, rank: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Rank ``rank``'s environment: ``base`` (default this process's) plus torchrun's
        variables, ``SF_TOPOLOGY``, ``GLOO_SOCKET_IFNAME`` and ``SF_EMULATED_MACHINE``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in 0..{self.world_size - 1}")
        gpus = self.topology.gpus_per_machine
        machine = rank // gpus
        env = dict(os.environ if base is None else base)
        env.update(
            MASTER_ADDR=self.address(0),
            MASTER_PORT=str(MASTER_PORT),
            RANK=str(rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(rank % gpus),
            LOCAL_WORLD_SIZE=str(gpus),
            GROUP_RANK=str(machine),
            NODE_RANK=str(machine),
            SF_TOPOLOGY=f"{self.topology.machines}x{gpus}",
            GLOO_SOCKET_IFNAME="eth0",
            SF_EMULATED_MACHINE=str(machine),
        )
        return env

    # -- set-up ---------------------------------------------------------------------------

    def __enter__(self) -> Emulation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Emulation:
        """Build the namespaces, links and qdiscs (Note [Emulated link model]).

        Raises:
            EmulationUnavailable: not root, no ``ip``/``tc``, or no network namespaces.
            EmulationError: a link or qdisc could not be made (the message has ``tc``'s).
        """
        if self._started:
            return self
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise EmulationUnavailable(
                    f"emulation needs the {tool!r} command (iproute2), which is not on PATH"
                )
        self._started = True
        self._catch_signals()
        try:
            remove_stale(self._notice)
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch
        try:
            _ip("netns", "add", sw)
        except EmulationError as exc:
            if os.geteuid() != 0 or "ermission" in str(exc) or "not permitted" in str(exc):
                raise EmulationUnavailable(
                    "emulation needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network "
                    f"namespaces: {exc}"
                ) from None
            raise EmulationUnavailable(f"cannot create a network namespace: {exc}") from None
        self._made.append(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for m in range(self.topology.machines):
            ns = self.namespace(m)
            _ip("netns", "add", ns)
            self._made.append(ns)
            self._write_hosts(ns)
            port = f"p{m}"
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(m)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            delay = self.inter_latency_us / 2
            self._shape(ns, "eth0", self.inter_gbps, delay)
            self._shape(sw, port, self.inter_gbps, delay)
            if self.intra_gbps is not None:
                self._shape(ns, "lo", self.intra_gbps, 0.0)

    def _write_hosts(self, ns: str) -> None:
        """Names for the machines' addresses, in the /etc/hosts that ``ip netns exec`` shows
        the namespace's processes (``/etc/netns/<ns>/hosts``): torch.distributed looks the
        addresses of its connections up and warns on every rank when they have no name."""
        try:
            with open("/etc/hosts") as f:
                hosts = f.read()
        except OSError:
            hosts = "127.0.0.1 localhost\n"
        names = "".join(
            f"{a} {PREFIX}-m{m}\n"
            for m in range(self.topology.machines)
            for a in (self.address(m), f"::ffff:{self.address(m)}")  # as IPv6 sockets see it
        )
        with contextlib.suppress(OSError):
            os.makedirs(os.path.join(_ETC_NETNS, ns), exist_ok=True)
            with open(os.path.join(_ETC_NETNS, ns, "hosts"), "w") as f:
                f.write(hosts.rstrip("\n") + "\n" + names)

    def _shape(self, ns: str, dev: str, gbps: float, delay_us: float) -> None:
        """HTB at ``gbps`` on ``dev``'s egress, netem ``delay_us`` below it (Note [Emulated
        link model]; a plain FIFO where the kernel has no netem)."""
        rate = f"{gbps * 1e9:.0f}bit"
        burst = str(max(_MIN_BURST, int(gbps * 1e9 / 8 * 1e-3)))
        _tc("-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        _tc(
            "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
            "rate", rate, "ceil", rate, "burst", burst, "cburst", burst,
        )  # fmt: skip
        leaf = ["-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:"]
        if delay_us > 0 and self.latency_emulated is not False:
            try:
                _tc(*leaf, "netem", "delay", f"{delay_us:.1f}us", "limit", str(_QUEUE_LIMIT))
                self.latency_emulated = True
                return
            except EmulationError as exc:
                if "unknown" not in str(exc).lower():
                    raise
                self.latency_emulated = False
                self._notice(
                    "emulate: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): links get "
                    f"the rate but not the asked latency ({self.inter_latency_us:g} us)"
                )
        _tc(*leaf, "pfifo", "limit", str(_QUEUE_LIMIT))

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP unwind like Ctrl-C while the emulation is open (SystemExit with
        status 128 + signal), so ``with`` blocks close it (Note [Emulation cleanup]); only
        in the main thread, and only for signals nobody else handles."""
        if threading.current_thread() is not threading.main_thread():
            return

        def unwind(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._previous[sig] = signal.signal(sig, unwind)

    # -- ranks ----------------------------------------------------------------------------

    def popen(self, rank: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` as rank ``rank`` inside its machine's namespace.

        Equivalent to ``subprocess.Popen(["ip", "netns", "exec", ns, *argv],
        env=self.env(rank, env), start_new_session=True, **kwargs)`` plus SIGKILL when this
        process dies (so call it from a thread that lives as long as the rank: the main one).
        The process is stopped by :meth:`close` if it still runs then.

        Args:
            rank: the rank to start.
            argv: the command.
            kwargs: passed to ``subprocess.Popen``; ``env`` is the base environment.
        """
        if not self._made:
            raise EmulationError("Emulation.popen before start() (use it as a with block)")
        if not argv:
            raise ValueError("Emulation.popen needs a command")
        env = self.env(rank, kwargs.pop("env", None))
        ns = self.namespace(rank // self.topology.gpus_per_machine)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
    ) -> int:
        """Run ``argv`` once per rank, each line of its output prefixed ``[rank N] ``.

        ``env`` is the ranks' base environment (default this process's; :meth:`env` adds to
        it); their output goes to ``stdout`` and ``stderr`` (default this process's).

        Once a rank fails, the others get ``grace_s`` to end on their own, then are stopped
        (SIGTERM, SIGKILL 5 s later), as torchrun does; ``timeout`` bounds the whole run.

        Returns:
            0 if every rank exited 0; else the first failing rank's exit status (a death by
            signal N as 128 + N); 124 if the run timed out first.
        """
        out, err = stdout or sys.stdout, stderr or sys.stderr
        lock = threading.Lock()
        pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs = [self.popen(r, argv, env=env, **pipes) for r in range(self.world_size)]
        pumps = []
        for rank, proc in enumerate(procs):
            for pipe, sink in ((proc.stdout, out), (proc.stderr, err)):
                t = threading.Thread(
                    target=_pump, args=(pipe, sink, f"[rank {rank}] ", lock), daemon=True
                )
                t.start()
                pumps.append(t)
        code = self._supervise(procs, timeout)
        for t in pumps:
            t.join(5)
        return code

    def _supervise(self, procs: list[subprocess.Popen[bytes]], timeout: float | None) -> int:
        """Wait for ``procs``; the exit status :meth:`run` returns (Note [First failure])."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ended: list[int] = []  # ranks in the order their ends were seen
        first: tuple[int, int] | None = None  # (rank, exit status) of the first failure
        stop_at: float | None = None
        timed_out = False
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            for rank, proc in enumerate(procs):
                if rank not in ended and (proc.poll() is not None or not pid_alive(proc.pid)):
                    ended.append(rank)
            if first is None and (failed := _first_failure(procs, ended)) is not None:
                first = failed
                running = [r for r, p in enumerate(procs) if p.poll() is None]
                if running:
                    self._notice(
                        f"emulate: rank {first[0]} exited with status {first[1]}; stopping "
                        f"ranks {', '.join(map(str, running))} in {self.grace_s:g} s unless "
                        "they end"
                    )
                stop_at = now + self.grace_s
            if deadline is not None and now > deadline:
                timed_out = first is None  # a failure before the timeout keeps its status
                self._notice(f"emulate: timed out after {timeout:g} s; stopping every rank")
                stop_at = now
            if stop_at is not None and now >= stop_at:
                _stop(procs)
                break
            time.sleep(0.02)
        if first is None:  # every rank ended before a poll saw it
            first = _first_failure(procs, ended + [r for r in range(len(procs)) if r not in ended])
        if timed_out:
            return 124
        return 0 if first is None else first[1]

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the ranks and delete the namespaces (Note [Emulation cleanup]); idempotent."""
        if not self._started:
            return
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            _stop(self._procs)
            self._procs = []
            for ns in reversed(self._made):
                _delete_namespace(ns)
            self._made = []
            self._started = False
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


# -- helpers ------------------------------------------------------------------------------


def _run(tool: str, args: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationError(f"{tool} {' '.join(args)}: {exc}") from None
    if done.returncode:
        why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise EmulationError(f"{tool} {' '.join(args)}: {why}")
    return done.stdout


def _ip(*args: str) -> str:
    return _run("ip", args)


def _tc(*args: str) -> str:
    return _run("tc", args)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL once the emulator dies (PR_SET_PDEATHSIG)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _pump(pipe: IO[bytes] | None, sink: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Copy ``pipe`` to ``sink`` line by line, each line prefixed."""
    if pipe is None:
        return
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace")
            if not line.endswith("\n"):
                line += "\n"
            with lock, contextlib.suppress(Exception):
                sink.write(prefix + line)
                sink.flush()


def _first_failure(
    procs: Sequence[subprocess.Popen[bytes]], ended: Sequence[int]
) -> tuple[int, int] | None:
    """(rank, exit status) of the first rank in ``ended`` that failed, once the status of it
    and of every rank that ended before it is known (Note [First failure]); else None."""
    for rank in ended:
        rc = procs[rank].poll()
        if rc is None:  # a zombie whose last threads are still exiting: not decided yet
            return None
        if rc:
            return rank, exit_code(rc)
    return None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each rank's process group, SIGKILL after :data:`_KILL_AFTER_S`; reap.

    Only groups whose leader is not reaped yet are signalled: a reaped leader's pid (the
    group's id) may already belong to an unrelated process. What a rank started and left
    behind still runs in its namespace, where :func:`_delete_namespace` kills it.
    """
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_AFTER_S
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in running:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


def _namespace_pids(ns: str) -> list[int]:
    try:
        return [int(x) for x in _ip("netns", "pids", ns).split()]
    except EmulationError:
        return []


def _delete_namespace(ns: str) -> None:
    """Kill whatever runs in ``ns``, then delete it (its interfaces and qdiscs go with it)."""
    for _ in range(3):
        pids = [p for p in _namespace_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(EmulationError):
        _ip("netns", "del", ns)
    shutil.rmtree(os.path.join(_ETC_NETNS, ns), ignore_errors=True)


def emulation_namespaces() -> dict[int, list[str]]:
    """Namespaces of emulations on this host, by the pid of the emulator that made them."""
    try:
        text = _ip("netns", "list")
    except EmulationError:
        return {}
    found: dict[int, list[str]] = {}
    for line in text.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME_RE.match(name)
        if match:
            found.setdefault(int(match[1]), []).append(name)
    return found


def remove_stale(notice: Callable[[str], None] | None = None) -> list[str]:
    """Delete the namespaces of emulations whose emulator no longer runs (Note [Emulation
    cleanup]); returns their names. ``notice`` gets one line per removed set."""
    removed = []
    for pid, names in emulation_namespaces().items():
        if pid == os.getpid() or pid_alive(pid):
            continue
        for ns in sorted(names, key=lambda n: n.endswith("-sw")):  # machines, then the switch
            _delete_namespace(ns)
            removed.append(ns)
        if notice is not None:
            notice(
                f"emulate: removed a stale emulation of pid {pid} (not running): "
                f"namespaces {', '.join(sorted(names))}"
            )
    return removed
