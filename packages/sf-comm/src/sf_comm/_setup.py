"""Set-up collectives that cannot hang unnoticed: short strings from every rank, by polling.

Used while a context is being built (settings agreement, shared-memory set-up), before any
transport exists. Waits poll the library's work object instead of blocking inside it, so a
wait ends at its timeout and signal handlers (SIGTERM, Ctrl-C) run meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .transport import Backoff, CommTimeout


def pack(text: str, words: int) -> np.ndarray:
    """``text`` as utf-8 in ``words`` int64 words (truncated, NUL padded)."""
    raw = text.encode()[: words * 8].ljust(words * 8, b"\0")
    return np.frombuffer(raw, dtype=np.int64)


def unpack(words: np.ndarray) -> str:
    return words.tobytes().rstrip(b"\0").decode(errors="replace")


def settle(work: dist.Work | None, what: str, rank: int, timeout: float) -> None:
    """Wait for an async set-up collective by polling (see the module docstring)."""
    assert work is not None
    deadline = time.monotonic() + timeout
    backoff = Backoff()
    while not work.is_completed():
        backoff()
        if time.monotonic() > deadline:
            raise CommTimeout(
                f"rank {rank}: {what} timed out after {timeout:.0f}s (a rank did not arrive)"
            )
    work.wait()


def gather_strings(
    text: str,
    *,
    rank: int,
    world: int,
    timeout: float,
    what: str,
    pg: dist.ProcessGroup | None = None,
    words: int = 64,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Every rank's ``text`` (at most ``8 * words`` bytes of utf-8), in rank order."""
    table = torch.zeros(world, words, dtype=torch.int64)  # [world, words] of utf-8
    table[rank] = torch.from_numpy(pack(text, words).copy())
    table = table.to(device)
    settle(dist.all_reduce(table, group=pg, async_op=True), what, rank, timeout)
    return [unpack(row.numpy()) for row in table.cpu()]


def _group_timeout(pg: Any) -> float:
    """The library timeout of ``pg``'s operations, in seconds (600 when it cannot be read)."""
    try:
        return float(pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except Exception:
        return 600.0


def destroy_groups(groups: Sequence[Any], *, pending: bool) -> None:
    """Destroy process groups (the caller drops its references).

    With ``pending`` operations (a failed exchange left some), freeing a gloo group joins its
    threads, which wait for those operations until the group's timeout, holding up the
    thread that frees it. So the groups are unregistered now, and a daemon thread keeps the
    last references until the operations have timed out and frees them then: a close never
    waits for a dead exchange.
    """
    for pg in groups:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(pg)
    if pending and groups:
        linger = max(_group_timeout(pg) for pg in groups) + 1.0
        held = list(groups)

        def release() -> None:
            time.sleep(linger)
            held.clear()

        threading.Thread(target=release, name="sf-release-groups", daemon=True).start()
