"""A pool of CPU ranks on this host that stays alive across many calls.

Spawning a torch process costs about a second, so tests, benchmarks and the command line
start ``world_size`` ranks once (gloo process group over a FileStore) and then run many
functions on them::

    with RankPool(4, env={"SF_TOPOLOGY": "2x2"}) as pool:
        outs = pool.run(my_fn, x, topology="2x2", transport="shm")   # my_fn(ctx, x) per rank

With ``emulation=`` (a started :class:`sf_comm.Emulation`), each rank joins its emulated
machine's network namespace before it connects (Note [Pool under emulation]).

``my_fn`` must be importable by name (a module-level function). Every rank's result comes
back in rank order. If any rank raises, dies or runs past ``timeout``, :class:`RankError`
carries every rank's traceback or fate, and the pool restarts itself on its next use, so one
failure never hangs or poisons later calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .emulate import Emulation

_CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace


def cached_context(topology: str | None, transport: str, **options: Any) -> Any:
    """Deprecated name of :func:`sf_comm.default_context` (kept while callers move to it)."""
    import sf_comm

    return sf_comm.default_context(topology, transport, **options)


def close_contexts() -> None:
    """Close and forget this process's default contexts (call it on every rank: the next
    :func:`sf_comm.default_context` builds new ones, collectively)."""
    import sf_comm

    sf_comm.close_default_contexts()


def _die_with_parent(parent: int) -> None:
    """End this rank soon after ``parent`` (the process that started the pool) dies, even by
    SIGKILL: a rank busy in a long job would otherwise run it to the end as an orphan (the
    pipe's EOF is only read between jobs). Linux sends SIGTERM on the parent's death
    (PR_SET_PDEATHSIG); a daemon thread watching the parent's pid covers other systems. The
    parent's pid comes from the parent: a rank still importing when it died would otherwise
    take its new parent (init) for it. Either ends the rank without cleanup, which the
    segments do not need past set-up (Note [shm cleanup])."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # died before the request took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="sf-parent-watch", daemon=True).start()


def _enter_namespace(path: str) -> None:
    """Move this process into the network namespace at ``path`` (``/run/netns/<name>``)."""
    import ctypes

    with open(path) as ns:
        if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")


# Note [Pool under emulation]
# A pool's ranks are spawned processes, not commands, so they cannot be started through
# ``ip netns exec``. Each one instead joins its machine's namespace itself (setns, as root)
# before torch opens any socket, and takes the rank's emulation environment (notably
# GLOO_SOCKET_IFNAME=eth0 and SF_EMULATED_MACHINE). The FileStore rendezvous lives on the
# shared filesystem, which namespaces do not separate; gloo then connects the ranks over
# their machines' addresses, so bytes between machines cross the emulated links.


def _worker(
    rank: int,
    world: int,
    store: str,
    conn: Any,
    env: dict[str, str],
    threads: int,
    parent: int,
    namespace: str | None = None,
) -> None:
    _die_with_parent(parent)
    if namespace is not None:  # Note [Pool under emulation]
        _enter_namespace(namespace)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    import sf_comm

    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=float(env.get("SF_TIMEOUT", 60)))
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timeout
    )
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg is None:
                break
            fn, args, kwargs, ctx_spec = msg
            try:
                if ctx_spec is not None:
                    topology, transport, options = ctx_spec
                    args = (sf_comm.default_context(topology, transport, **options), *args)
                conn.send(("ok", fn(*args, **kwargs)))
            except BaseException as exc:
                close_contexts()  # a failed collective may leave transports mid-protocol
                conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        close_contexts()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@dataclasses.dataclass
class RankFailure:
    rank: int
    kind: str  # "error", "died", "timeout"
    detail: str


class RankError(RuntimeError):
    """One or more ranks failed; ``failures`` has each rank's traceback or fate and
    ``results`` what the other ranks returned (None for failed ranks)."""

    def __init__(self, fn_name: str, failures: list[RankFailure], results: list[Any]) -> None:
        self.failures = failures
        self.results = results
        lines = [f"{fn_name} failed on {len(failures)} rank(s):"]
        for f in failures:
            lines.append(f"--- rank {f.rank}: {f.kind}\n{f.detail.rstrip()}")
        super().__init__("\n".join(lines))


class RankPool:
    """``world_size`` spawned CPU ranks with a gloo process group; see the module docstring.

    Args:
        world_size: number of ranks.
        env: environment for the ranks (e.g. ``SF_TOPOLOGY``, ``SF_TIMEOUT``).
        threads: torch intra-op threads per rank (1: ranks share few cores).
        start_timeout: seconds to wait for the ranks to come up.
        emulation: a started :class:`sf_comm.Emulation` of ``world_size`` ranks: each rank
            runs in its machine's network namespace with its environment added (Note [Pool
            under emulation]).
    """

    def __init__(
        self,
        world_size: int,
        *,
        env: dict[str, str] | None = None,
        threads: int = 1,
        start_timeout: float = 120.0,
        emulation: Emulation | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"RankPool world_size must be >= 1, got {world_size}")
        if emulation is not None and emulation.world_size != world_size:
            raise ValueError(
                f"RankPool of {world_size} ranks on an emulation of {emulation.world_size}"
            )
        self.emulation = emulation
        self.world_size = world_size
        self.env = dict(env or {})
        self.threads = threads
        self.start_timeout = start_timeout
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._tmp: str | None = None
        self._warm = False  # first run also waits for the ranks to start

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> RankPool:
        if self._procs:
            return self
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="sf-pool-")
        store = os.path.join(self._tmp, "store")
        emu = self.emulation
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            env, namespace = self.env, None
            if emu is not None:
                env = emu.env(rank, base=self.env)
                namespace = f"/run/netns/{emu.namespace(rank // emu.topology.gpus_per_machine)}"
            proc = ctx.Process(
                target=_worker,
                args=(
                    rank,
                    self.world_size,
                    store,
                    child,
                    env,
                    self.threads,
                    os.getpid(),
                    namespace,
                ),
                daemon=True,
                name=f"sf-rank-{rank}",
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        return self

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._warm = False
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> RankPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # -- running ------------------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        topology: str | None = None,
        transport: str | None = None,
        timeout: float = 120.0,
        ctx_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn`` on every rank and return the results in rank order.

        With ``transport`` given, ``fn`` receives the rank's
        :func:`sf_comm.default_context` for (``topology``, ``transport``, ``ctx_options``)
        as its first argument.

        Raises:
            RankError: a rank raised, died, or did not finish within ``timeout`` seconds
                (the pool is then restarted on next use).
        """
        self.start()
        spec = None if transport is None else (topology, transport, dict(ctx_options or {}))
        for conn in self._conns:
            conn.send((fn, args, kwargs, spec))
        results: list[Any] = [None] * self.world_size
        failures: dict[int, RankFailure] = {}
        waiting = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout + (0 if self._warm else self.start_timeout)
        grace: float | None = None
        while waiting:
            now = time.monotonic()
            limit = deadline if grace is None else min(deadline, grace)
            ready = mpc.wait(list(waiting.values()), timeout=max(0.0, limit - now))
            if not ready:
                for rank in waiting:
                    kind = "timeout"
                    detail = f"no result after {timeout:.0f}s"
                    if grace is not None:
                        detail = "still running after another rank failed"
                    failures[rank] = RankFailure(rank, kind, detail)
                break
            for rank, conn in list(waiting.items()):
                if conn not in ready:
                    continue
                del waiting[rank]
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    proc = self._procs[rank]
                    proc.join(1)
                    failures[rank] = RankFailure(rank, "died", f"exit code {proc.exitcode}")
                    continue
                if status == "ok":
                    results[rank] = value
                else:
                    failures[rank] = RankFailure(rank, "error", value)
            if failures and grace is None:
                # Survivors should fail fast (peer death / abort detection); give them a
                # bounded time to report before the pool is torn down.
                grace = time.monotonic() + float(self.env.get("SF_POOL_GRACE", 30))
        self._warm = True
        if failures:
            self.close()  # restart on next use: a failed collective may leave state behind
            raise RankError(
                getattr(fn, "__name__", str(fn)),
                sorted(failures.values(), key=lambda f: f.rank),
                results,
            )
        return results
