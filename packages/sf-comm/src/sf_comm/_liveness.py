"""Which ranks are alive: every transport's dead-peer detection (ranks on this host)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist


def pid_alive(pid: int) -> bool:
    """False once ``pid`` has exited (a killed child nobody reaped yet, a zombie, counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return True


def rank_processes(pg: Any = None) -> list[tuple[str, int]]:
    """(hostname, pid) of every rank of ``pg`` (collective)."""
    out: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, (socket.gethostname(), os.getpid()), group=pg)
    return [tuple(x) for x in out]


def dead_ranks(
    procs: Sequence[tuple[str, int]], peers: Sequence[int], patience: float = 0.0
) -> list[int]:
    """The ``peers`` on this host whose process is gone (ranks on other hosts are not known).

    Waits up to ``patience`` seconds for one to die: after a connection reset the killed
    process may still be being torn down.
    """
    host = socket.gethostname()
    local = [p for p in sorted(set(peers)) if procs[p][0] == host]
    deadline = time.monotonic() + patience
    while True:
        dead = [p for p in local if not pid_alive(procs[p][1])]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)
