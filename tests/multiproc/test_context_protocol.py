"""Tier 2: real contexts satisfy ``sf_comm.CommContext``; ``sf_comm.default_context`` caches
one context per process and replaces a broken one."""

from __future__ import annotations

import pytest
import torch

import sf_comm


def _members(ctx: sf_comm.Context) -> list[str]:
    """Which of (job context, part, part of a part) fail the protocol or its member types."""
    sub, _ = ctx.split(2)
    inner, _ = sub.split(1)
    problems = []
    for label, c in (("context", ctx), ("part", sub), ("part of a part", inner)):
        if not isinstance(c, sf_comm.CommContext):
            problems.append(f"{label}: not a CommContext")
        types = (
            (c.topology, sf_comm.Topology),
            (c.rank, int),
            (c.world_size, int),
            (c.device, torch.device),
            (c.transport, sf_comm.Transport),
            (c.group(), sf_comm.Group),
        )
        problems += [
            f"{label}: {v!r} is not a {t.__name__}" for v, t in types if not isinstance(v, t)
        ]
    for label, part in (("part", sub), ("part of a part", inner)):  # ctx: the pool's, kept open
        with part as entered:
            if entered is not part:
                problems.append(f"{label}: with-block yields {entered!r}")
    if ctx.transport.closed:
        problems.append("closing a part closed the job's transport")
    return problems


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_contexts_implement_the_protocol(ranks, transport: str) -> None:
    """Catches a context class (the job's, a CFG part, a part split again) that lacks a member
    strategies use, returns the wrong kind of object, or cannot be used as a ``with`` block."""
    assert ranks(2).run(_members, topology="1x2", transport=transport) == [[], []]


def _defaults() -> list[int]:
    first = sf_comm.default_context("1x2", "shm", timeout=20.0)
    assert sf_comm.default_context("1x2", "shm", timeout=20.0) is first, "not cached"
    other = sf_comm.default_context("1x2", "gloo")
    assert other is not first and other.transport.name == "gloo", "arguments not in the key"
    first.transport.abort(f"rank {first.rank}: broken on purpose")
    fresh = sf_comm.default_context("1x2", "shm", timeout=20.0)
    assert fresh is not first and fresh.transport.broken is None, "broken context kept"
    assert first.transport.closed, "the broken context was not released"
    got = sf_comm.all_gather(fresh, fresh.group(), torch.tensor([10 + fresh.rank])).wait()
    fresh.close()  # closed by its user: replaced as well
    again = sf_comm.default_context("1x2", "shm", timeout=20.0)
    assert again is not fresh and not again.transport.closed, "closed context handed back"
    sf_comm.close_default_contexts()  # also: the next tests start from fresh contexts
    assert again.transport.closed and other.transport.closed, "cached contexts left open"
    return [int(t) for t in got]


def test_default_context_is_cached_and_replaced_when_broken(ranks) -> None:
    """Catches default_context building a new context (collectively) on every call, sharing
    one across different arguments, or handing back a context that broke or was closed."""
    assert ranks(2).run(_defaults) == [[10, 11], [10, 11]]
