"""Recording what a rank does: communication and compute spans, real or simulated.

A *tracer* is installed for a block of code with :func:`tracing`; while it is active the
collectives (:mod:`sf_comm.collectives`) report every operation they start and finish, and
compute code (``sf_attn``'s local attention and merges) reports its spans. Two tracers:

- :class:`WallTracer` stamps real wall-clock times (a real run's trace, for Chrome/Perfetto
  and for the tests that prove overlap).
- A virtual tracer (``sf_attn.sim.layer``) advances a modelled clock instead: the same strategy
  code runs on meta tensors and the tracer costs each span, so what the simulator predicts is
  what the executor runs.

Events are per rank; tracks are ``compute``, ``intra`` and ``inter`` (the links a
communication uses: peers on the same machine go over ``intra``, the others over ``inter``).
With no tracer installed the hooks cost one global lookup.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any


@dataclasses.dataclass(slots=True)
class Event:
    """One span on one track: ``start``/``end`` in seconds from the tracer's origin."""

    track: str  # "compute", "intra" or "inter"
    name: str
    start: float
    end: float
    nbytes: int = 0
    flops: float = 0.0
    step: int = 0  # sequence number of the span among its kind (for tests)


class Tracer(abc.ABC):
    """Base tracer: receives span reports; subclasses decide what time is."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._counter = 0

    # -- hooks (called by collectives and compute code) --------------------------------

    @abc.abstractmethod
    def comm_start(
        self,
        op: str,
        links: dict[str, int],
        messages: int,
        *,
        nic_sharers: int = 1,
        peers: dict[str, int] | None = None,
    ) -> Any:
        """A collective was issued; ``links`` maps "intra"/"inter" to bytes this rank sends;
        ``nic_sharers``: the ranks behind this rank's NIC that cross machines in it (Note
        [NIC sharers] in sf_comm.collectives); ``peers``: this rank's peers on each link."""

    @abc.abstractmethod
    def comm_end(self, token: Any) -> None:
        """The collective's handle was waited on."""

    @abc.abstractmethod
    def compute_start(
        self, name: str, flops: float, nbytes: int, shape: tuple[int, ...] = ()
    ) -> Any:
        """A compute span begins (``shape``: see :func:`compute_span`); returns a token for
        :meth:`compute_end`."""

    @abc.abstractmethod
    def compute_end(self, token: Any) -> None:
        """The compute span of ``token`` ended."""

    # -- results ---------------------------------------------------------------------

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def busy(self) -> dict[str, float]:
        """Seconds each track was busy."""
        out: dict[str, float] = {}
        for e in self.events:
            out[e.track] = out.get(e.track, 0.0) + (e.end - e.start)
        return out

    def span(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def counters(self) -> Counters:
        """What the traced code cost this rank: kernels, merges, bytes and busy time per
        link, and the communication time no compute overlapped (see :class:`Counters`)."""
        links = [e for e in self.events if e.track != "compute"]
        compute = [(e.start, e.end) for e in self.events if e.track == "compute"]
        names = [e.name for e in self.events if e.track == "compute"]
        tracks = sorted({e.track for e in links})
        return Counters(
            kernels=names.count("attn"),
            merges=names.count("merge"),
            bytes={t: sum(e.nbytes for e in links if e.track == t) for t in tracks},
            busy_s={
                t: _length(_union([(e.start, e.end) for e in links if e.track == t]))
                for t in tracks
            },
            exposed_comm_s=_length(
                _minus(_union([(e.start, e.end) for e in links]), _union(compute))
            ),
            span_s=self.span(),
        )

    def to_chrome(self, rank: int = 0) -> list[dict[str, Any]]:
        """Chrome/Perfetto trace events (``chrome://tracing``, ui.perfetto.dev)."""
        tids = {"compute": 0, "intra": 1, "inter": 2}
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": track}}
            for track, tid in tids.items()
        ]
        out.append(
            {"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}}
        )
        for e in self.events:
            out.append(
                {
                    "ph": "X",
                    "name": e.name,
                    "pid": rank,
                    "tid": tids.get(e.track, 3),
                    "ts": e.start * 1e6,
                    "dur": max(e.end - e.start, 0.0) * 1e6,
                    "args": {"bytes": e.nbytes, "flops": e.flops},
                }
            )
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Counters:
    """A rank's cost of the traced code (:meth:`Tracer.counters`).

    Attributes:
        kernels: attention kernel calls; merges: online-softmax merges.
        bytes: bytes over each link ("intra", "inter"), the larger direction.
        busy_s: seconds each link had a transfer in flight.
        exposed_comm_s: seconds a transfer was in flight while no compute ran: the
            communication the schedule did not hide (with wall-clock traces, waiting time).
        span_s: first event to last.
    """

    kernels: int
    merges: int
    bytes: dict[str, int]
    busy_s: dict[str, float]
    exposed_comm_s: float
    span_s: float


def format_counters(per_rank: Sequence[Counters]) -> str:
    """One line per rank: kernels, merges, MB and busy ms per link, exposed communication."""
    head = (
        f"{'rank':>4} {'kernels':>7} {'merges':>6} {'intra MB':>9} {'inter MB':>9} "
        f"{'intra busy ms':>13} {'inter busy ms':>13} {'exposed comm ms':>15} {'span ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for rank, c in enumerate(per_rank):
        lines.append(
            f"{rank:>4} {c.kernels:>7} {c.merges:>6} {c.bytes.get('intra', 0) / 1e6:9.2f} "
            f"{c.bytes.get('inter', 0) / 1e6:9.2f} {c.busy_s.get('intra', 0) * 1e3:13.2f} "
            f"{c.busy_s.get('inter', 0) * 1e3:13.2f} {c.exposed_comm_s * 1e3:15.2f} "
            f"{c.span_s * 1e3:8.2f}"
        )
    return "\n".join(lines)


Interval = tuple[float, float]


def _union(spans: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _minus(spans: Sequence[Interval], cut: Sequence[Interval]) -> list[Interval]:
    """``spans`` (disjoint, sorted) without the parts covered by ``cut`` (same)."""
    out = []
    for start, end in spans:
        pos = start
        for c0, c1 in cut:
            if c1 <= pos or c0 >= end:
                continue
            if c0 > pos:
                out.append((pos, c0))
            pos = max(pos, c1)
        if pos < end:
            out.append((pos, end))
    return out


def _length(spans: Sequence[Interval]) -> float:
    return sum(end - start for start, end in spans)


class WallTracer(Tracer):
    """Real time: spans from ``time.perf_counter`` relative to the tracer's creation.

    A communication span runs from the issue of the collective to the return of its wait:
    the transfer happened somewhere inside it (one-sided puts usually right at the issue).
    """

    def __init__(self) -> None:
        super().__init__()
        self.origin = time.perf_counter()

    def _now(self) -> float:
        return time.perf_counter() - self.origin

    def comm_start(
        self,
        op: str,
        links: dict[str, int],
        messages: int,
        *,
        nic_sharers: int = 1,
        peers: dict[str, int] | None = None,
    ) -> Any:
        return (op, links, self._now(), self._next())

    def comm_end(self, token: Any) -> None:
        op, links, start, step = token
        end = self._now()
        for track, nbytes in links.items():
            self.events.append(Event(track, op, start, end, nbytes=nbytes, step=step))

    def compute_start(
        self, name: str, flops: float, nbytes: int, shape: tuple[int, ...] = ()
    ) -> Any:
        return (name, flops, nbytes, self._now(), self._next())

    def compute_end(self, token: Any) -> None:
        name, flops, nbytes, start, step = token
        self.events.append(Event("compute", name, start, self._now(), nbytes, flops, step))


_ACTIVE: Tracer | None = None


def active() -> Tracer | None:
    return _ACTIVE


@contextlib.contextmanager
def tracing(tracer: Tracer) -> Iterator[Tracer]:
    """Install ``tracer`` for the block (not re-entrant across threads)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, tracer
    try:
        yield tracer
    finally:
        _ACTIVE = previous


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Hide the block from the active tracer: one-time set-up (a kernel choice agreed across
    ranks) is not part of the schedule a trace shows or the counters count."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, None
    try:
        yield
    finally:
        _ACTIVE = previous


@contextlib.contextmanager
def compute_span(
    name: str, flops: float = 0.0, nbytes: int = 0, shape: tuple[int, ...] = ()
) -> Iterator[None]:
    """Report a compute span to the active tracer (no-op without one).

    ``shape`` describes the work for tracers that cost it (attention blocks pass
    ``(seq_q, seq_k, batch * heads)``: the simulator's wave and tile efficiency need it).
    """
    tracer = _ACTIVE
    if tracer is None:
        yield
        return
    token = tracer.compute_start(name, flops, nbytes, shape)
    try:
        yield
    finally:
        tracer.compute_end(token)


def write_chrome(path: str, traces: Sequence[list[dict[str, Any]]]) -> None:
    """Write per-rank Chrome trace events (from :meth:`Tracer.to_chrome`) as one JSON file."""
    events = [e for per_rank in traces for e in per_rank]
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def timeline_png(path: str, traces: Sequence[list[dict[str, Any]]], title: str = "") -> None:
    """Draw per-rank compute/intra/inter tracks as a timeline PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {0: "#4c72b0", 1: "#55a868", 2: "#c44e52"}
    names = {0: "compute", 1: "intra", 2: "inter"}
    ranks = len(traces)
    fig, ax = plt.subplots(figsize=(12, 0.9 * 3 * ranks + 1))
    yticks, ylabels = [], []
    for r, per_rank in enumerate(traces):
        for e in per_rank:
            if e.get("ph") != "X":
                continue
            tid = e["tid"]
            y = (ranks - 1 - r) * 3.5 + (2 - tid)
            ax.broken_barh(
                [(e["ts"] / 1e3, max(e["dur"] / 1e3, 1e-4))],
                (y, 0.8),
                facecolors=colors.get(tid, "grey"),
                edgecolors="black",
                linewidth=0.3,
            )
        for tid in range(3):
            yticks.append((ranks - 1 - r) * 3.5 + (2 - tid) + 0.4)
            ylabels.append(f"rank {r} {names[tid]}")
    ax.set_yticks(yticks, ylabels)
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
