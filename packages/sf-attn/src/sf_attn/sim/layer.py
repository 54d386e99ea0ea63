"""The simulator: the strategies' own code, run on meta tensors against a modelled clock.

``simulate(strategy, topology, ...)`` builds a :class:`SimContext` for one representative
rank (rank 0, which holds the largest shard), runs the strategy's ``execute`` with meta
tensors (shapes only, no data) and a :class:`VirtualTracer` installed. Every collective the strategy
issues and every attention block / merge it computes is costed as it happens, so the
simulated schedule is exactly the executed one (same stages, same order, same overlap).

Cost model (Note [Cost model]):

- compute: an attention block takes ``attn_overhead + flops / (rate * eff)`` (``rate``:
  the kernel's at the layer's head_dim, Note [Kernel rates]) with
  ``eff = wave_eff * kv_eff``: the kernel runs ``ceil(w)`` whole waves, ``w = ceil(seq_q /
  q_tile) * batch * heads / device_sms`` (the last wave of query tiles runs partly empty, so
  ``wave_eff = w / ceil(w)``) and ``kv_eff = seq_k / (seq_k + block_half)`` (per-tile loop
  overhead); a merge takes
  ``merge_overhead + bytes / mem_bw``. Measured on an H200 (results/GPU-2026-11-27.md): one
  rank's share of a Flux 4096px layer as one sdpa-flash call ran at 354, 357, 264 TFLOP/s
  for 8256, 4128, 2064 queries x 24 heads: 11.8, 6.0 and 3.1 waves of 128-row tiles on 132
  SMs, i.e. wave_eff 0.98, 1.0, 0.77 — the drop the formula gives.
- links: a transfer of ``m`` bytes takes ``latency + m / bw(m)`` on each link it uses, with
  ``bw(m) = peak * e_max * m / (m + m_half)`` (:meth:`sf_comm.Topology.bandwidth`: ``peak``
  is ``intra_bw`` for peers on the same machine, ``inter_bw / n`` for other machines, with
  ``n`` the GPUs behind the NIC that cross machines in the same call: all ``gpus_per_nic``
  of them in a head scatter or a ring across machines, one at each end of a flat ring
  (Note [NIC sharers] in sf_comm.collectives);
  ``e_max`` and ``m_half`` per transport and pattern from public measurements,
  docs/simulator.md). ``m`` is this rank's bytes on that link in the call; a ring shift
  (``shift±k``) is the send/recv pattern, every other collective the all-to-all one.
  Transfers on one link queue behind each other (contention); different links run
  concurrently.
- two-sided transports pay a rendezvous per message and peer (``handshake`` seconds inside a
  machine, ``inter_handshake`` between machines, where the fitted per-call cost already
  holds it: Note [Link handshakes]); one-sided puts do not. Whether one-sided costs
  less then depends on the curves: on the p5 preset NVSHMEM puts reach less of the EFA line
  rate than NCCL's all-to-all, so large one-sided transfers cost more there.
- overlap: a collective starts when the program issues it (after the compute before it) and
  the compute stream stalls at ``wait()`` until the transfer is done.
- interference: while a two-sided transfer is in flight, compute runs ``interference`` slower
  (a stated fraction, default 0: Note [Interference]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from sf_comm import Group, Handle, Topology
from sf_comm.trace import Event, Tracer, tracing
from sf_comm.transport import Recv, Send, Transport


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CostModel:
    """Constants of Note [Cost model] that do not belong to a topology."""

    attn_overhead: float = 8e-6  # kernel launch + tail, s
    merge_overhead: float = 4e-6
    mem_bw: float = 2.0e12  # device memory bytes/s achievable by an elementwise kernel
    block_half: int = 96  # keys at which the kv loop runs at half efficiency
    q_tile: int = 128  # query rows per thread block of the attention kernel; 0: no waves
    handshake: float = 20e-6  # two-sided rendezvous per message, s (fitted: docs/simulator.md)
    # between machines the link curves' per-call cost was fitted to timings of two-sided
    # calls (nccl-tests), so no rendezvous is added there (Note [Link handshakes])
    inter_handshake: float = 0.0
    interference: float = 0.0  # compute speed lost while two-sided bytes move (Note [Interference])
    comm_interference: float = 0.0  # two-sided transfer speed lost while compute runs (same Note)
    kernel: str = "cudnn"  # the attention kernel whose head_dim curve is used (Note [Kernel rates])

    def __post_init__(self) -> None:
        if self.kernel not in (*KERNEL_TFLOPS, MEASURED):
            raise ValueError(
                f"CostModel.kernel must be one of {[*sorted(KERNEL_TFLOPS), MEASURED]}, got "
                f"{self.kernel!r}"
            )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                continue
            if not value >= 0:
                raise ValueError(f"CostModel.{field.name} must be >= 0, got {value!r}")
        for name, what in (("interference", "compute"), ("comm_interference", "transfer")):
            if not getattr(self, name) < 1:
                raise ValueError(
                    f"CostModel.{name} is a fraction of the {what} speed, in [0, 1); got "
                    f"{getattr(self, name)!r}"
                )


# Note [Link handshakes]
# A two-sided transfer pays a rendezvous per message: the receiver posts and matches before
# data moves. Inside a machine the link curves have no per-call cost (NVLink's e_max comes
# from 1 GB all-reduces), so ``handshake`` (20 us, fitted to xDiT's one-machine figures) is
# that cost. Between machines the two-sided curves' per-call cost, 0.235 ms + 4.6 us per
# remote peer, was fitted to nccl-tests all-to-all timings, which already contain NCCL's
# rendezvous: adding ``handshake`` there too would count it twice, so ``inter_handshake`` is
# 0 unless a measured curve leaves it out. Each link is charged once per peer on it.


# Note [Kernel rates]
# ``Topology.device_flops`` is the rate of the attention kernel StreamFusion runs (cuDNN
# SDPA: results/GPU-2026-11-27.md, 667 TFLOP/s on an H200) at head_dim 128. Other head_dims
# and kernels run at other rates; the ratios come from the FlashAttention-3 paper's forward
# benchmark (Shah et al. 2024, arXiv 2407.08608, H100 80GB SXM5, bf16, no causal mask,
# 16k tokens; TFLOP/s below). A block is costed at ``device_flops * KERNEL_TFLOPS[kernel]
# [head_dim] / KERNEL_TFLOPS["cudnn"][128]`` (linear between the measured head_dims,
# clamped outside them). Measured on H100; the same ratios are assumed for A100 and H200.
# "fa2" is what codebases without a Hopper kernel run (e.g. the official HunyuanVideo
# repository, the held-out check of docs/simulator.md). "measured": ``device_flops`` was
# measured at the layer's own head_dim (e.g. on CPU ranks), so no curve applies.
MEASURED = "measured"
KERNEL_TFLOPS: dict[str, dict[int, float]] = {
    "cudnn": {64: 413.0, 128: 595.0, 256: 581.0},
    "fa2": {64: 324.0, 128: 370.0, 256: 326.0},
    "fa3": {64: 497.0, 128: 648.0, 256: 756.0},
}


def kernel_rate(topology: Topology, head_dim: int, kernel: str = "cudnn") -> float:
    """FLOP/s of one attention block's kernel at ``head_dim`` (Note [Kernel rates])."""
    if kernel == MEASURED:
        return topology.device_flops
    table = KERNEL_TFLOPS[kernel]
    dims = sorted(table)
    d = min(max(head_dim, dims[0]), dims[-1])  # clamped to the measured head_dims
    lo, hi = max(x for x in dims if x <= d), min(x for x in dims if x >= d)
    rate = table[lo] if lo == hi else table[lo] + (d - lo) * (table[hi] - table[lo]) / (hi - lo)
    return topology.device_flops * rate / KERNEL_TFLOPS["cudnn"][128]


# Note [Interference]
# A two-sided transfer is not free for the compute it overlaps: NCCL's kernels hold SMs (one
# thread block per channel) for as long as they move data, and on CPU ranks the TCP stack,
# gloo's threads and the transports' progress take cores from the attention. The model
# charges this as a fraction f of the compute speed: a compute span that overlaps two-sided
# transfers (on any link) for o seconds takes o * f / (1 - f) longer (the span it would take
# at full speed, stretched over the overlapped part). f is a stated input, not fitted: the
# default 0 keeps the calibration of docs/simulator.md as it was (an H100 NCCL job whose
# overlap the fitted constants already absorb); tools/emulated_prediction.py sets the value
# measured on CPU ranks. One-sided puts are taken not to interfere.
# The other direction, ``comm_interference`` g: on CPU ranks a transfer's TCP and gloo work
# needs the same cores as the attention, so a two-sided transfer in flight while the rank
# computes for o seconds ends o * g / (1 - g) later (checked when each compute span ends),
# and the transfers queued behind it on the same link move with it. On GPUs the
# NIC moves the bytes by DMA: the default 0. tools/emulated_prediction.py measures it.


class VirtualTracer(Tracer):
    """A tracer whose clock is the cost model's (see module docstring)."""

    def __init__(
        self,
        topology: Topology,
        *,
        one_sided: bool = True,
        cost: CostModel | None = None,
        attn_flops: float | None = None,
    ) -> None:
        super().__init__()
        self.topology = topology
        self.one_sided = one_sided
        self.cost = cost or CostModel()
        # the attention kernel's rate at the layer's head_dim (Note [Kernel rates])
        self.attn_flops = attn_flops or topology.device_flops
        self.now = 0.0  # where the compute stream (the program) is
        self.link_free = {"intra": 0.0, "inter": 0.0}
        # fixed costs (kernel launches, per-message latency, handshakes, the protocol's
        # per-call cost m_half / (peak * e_max)) on each track: what --explain calls overheads
        self.overhead = {"compute": 0.0, "intra": 0.0, "inter": 0.0}
        self.two_sided_spans: list[tuple[float, float]] = []  # Note [Interference]
        self._in_flight: list[tuple[str, int, int]] = []  # comm_start's flights, until waited

    def _latency(self, link: str) -> float:
        return self.topology.intra_latency if link == "intra" else self.topology.inter_latency

    def comm_start(
        self,
        op: str,
        links: dict[str, int],
        messages: int,
        *,
        nic_sharers: int = 1,
        peers: dict[str, int] | None = None,
    ) -> Any:
        end = self.now
        step = self._next()
        flights: list[tuple[str, int, int]] = []  # (link, two-sided span, event) in flight
        per_link_msgs = max(1, messages // max(1, len(links)))  # without ``peers``
        pattern = "send_recv" if op.startswith("shift") else "all_to_all"
        topo = self.topology
        for link, nbytes in links.items():
            start = max(self.now, self.link_free[link])
            fixed = self._latency(link)
            took = fixed
            if nbytes > 0:
                curve = topo.links.curve(link, one_sided=self.one_sided, pattern=pattern)
                n_peers = (peers or {}).get(link, 1)
                took += nbytes / topo.bandwidth(
                    link,
                    nbytes,
                    one_sided=self.one_sided,
                    pattern=pattern,
                    nic_sharers=nic_sharers,
                    peers=n_peers,
                )
                # m / (peak e m / (m + h)) = m / (peak e) + h / (peak e)
                fixed += curve.half(n_peers) / (topo.peak(link) * curve.e_max)
            flight = None
            if not self.one_sided:  # Note [Link handshakes]
                handshake = self.cost.handshake if link == "intra" else self.cost.inter_handshake
                rendezvous = handshake * (peers or {}).get(link, per_link_msgs)
                took += rendezvous
                fixed += rendezvous
                flight = len(self.two_sided_spans)
                self.two_sided_spans.append((start, start + took))
            self.overhead[link] += fixed
            self.link_free[link] = start + took
            end = max(end, start + took)
            if flight is not None:
                flights.append((link, flight, len(self.events)))
            self.events.append(Event(link, op, start, start + took, nbytes=nbytes, step=step))
        self._in_flight.extend(flights)
        return end, flights

    def comm_end(self, token: Any) -> None:
        end, flights = token
        for flight in flights:  # a transfer may have ended later than issued (comm_interference)
            self._in_flight.remove(flight)
            end = max(end, self.events[flight[2]].end)
        self.now = max(self.now, end)

    def _slow_transfers(self, start: float, end: float) -> None:
        """Note [Interference], the other direction: two-sided transfers in flight during the
        compute span [start, end] end later, and the transfers queued behind them on their
        link start that much later."""
        g = self.cost.comm_interference
        for link, span, _ in self._in_flight:
            a, b = self.two_sided_spans[span]
            overlap = min(b, end) - max(a, start)
            if overlap <= 0:
                continue
            later = overlap * g / (1 - g)
            for other_link, other, event in self._in_flight:
                c, d = self.two_sided_spans[other]
                if other_link != link or c < a:
                    continue
                moved = (c if other == span else c + later, d + later)
                self.two_sided_spans[other] = moved
                self.events[event] = dataclasses.replace(
                    self.events[event], start=moved[0], end=moved[1]
                )
                self.link_free[link] = max(self.link_free[link], moved[1])

    def compute_start(
        self, name: str, flops: float, nbytes: int, shape: tuple[int, ...] = ()
    ) -> Any:
        return (name, flops, nbytes, shape)

    def compute_end(self, token: Any) -> None:
        name, flops, nbytes, shape = token
        c = self.cost
        if name == "attn" and len(shape) == 3:
            sq, sk, rows = shape
            kv_eff = sk / (sk + c.block_half) if sk else 1.0
            work = flops
            if c.q_tile and flops:
                # whole waves of (q_tile rows x all keys) tiles: monotone in every dimension
                waves = math.ceil(-(-sq // c.q_tile) * rows / self.topology.device_sms)
                work = waves * self.topology.device_sms * c.q_tile * flops / (sq * rows)
            took = c.attn_overhead + work / (self.attn_flops * kv_eff)
            self.overhead["compute"] += c.attn_overhead
        elif name == "attn":
            took = c.attn_overhead + flops / self.attn_flops
            self.overhead["compute"] += c.attn_overhead
        else:
            took = c.merge_overhead + nbytes / c.mem_bw
            self.overhead["compute"] += c.merge_overhead
        if c.interference:  # Note [Interference]
            overlap = _covered(self.two_sided_spans, self.now, self.now + took)
            took += overlap * c.interference / (1 - c.interference)
        if c.comm_interference and self._in_flight:
            self._slow_transfers(self.now, self.now + took)
        self.events.append(
            Event("compute", name, self.now, self.now + took, nbytes, flops, self._next())
        )
        self.now += took


def _covered(spans: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] inside at least one of ``spans``."""
    cuts = sorted((max(a, start), min(b, end)) for a, b in spans if b > start and a < end)
    total, reach = 0.0, start
    for a, b in cuts:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


class SimTransport(Transport):
    """Returns meta tensors of the right shapes; moves nothing (the tracer costs it)."""

    name = "sim"
    one_sided = True

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self.record(op, sends)
        return Handle.completed(
            [torch.empty(shape, dtype=dtype, device="meta") for _, shape, dtype in recvs]
        )

    def barrier(self, group: Group) -> None:
        pass


class SimContext:
    """One rank of a modelled topology, with no processes (an :class:`sf_comm.CommContext`)."""

    def __init__(self, topology: Topology, rank: int = 0) -> None:
        self.topology = topology
        self.rank = rank
        self.world_size = topology.world_size
        self.device = torch.device("meta")
        self.transport = SimTransport(rank=rank, world_size=self.world_size, timeout=0.0)
        machines, gpus = topology.shape
        m, g = divmod(rank, gpus)
        self._groups = {
            "world": Group("world", tuple(range(self.world_size)), rank),
            "intra": Group("intra", tuple(m * gpus + i for i in range(gpus)), rank),
            "inter": Group("inter", tuple(i * gpus + g for i in range(machines)), rank),
        }

    def group(self, axis: str = "world") -> Group:
        return self._groups[axis]

    def subgroup(self, partition: Sequence[Sequence[int]], name: str) -> Group:
        mine = next(tuple(members) for members in partition if self.rank in members)
        return Group(name, mine, self.rank)

    def barrier(self, axis: str = "world") -> None:
        pass

    def call(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.transport.call(name)

    def close(self) -> None:
        """Nothing to release: no processes, no memory."""

    def __enter__(self) -> SimContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True, slots=True)
class SimResult:
    """Simulated latency of one attention layer on one rank.

    Attributes:
        strategy: the strategy simulated; ``degrees``: (Ulysses, Ring).
        latency_s: time until the last compute or transfer ends.
        breakdown: busy seconds per resource ("compute", "intra", "inter").
        events: the costed schedule (for traces and plots).
        overheads: of each resource's busy seconds, the fixed part (kernel launches and
            merges' fixed cost; per-message latency, handshakes and the per-call protocol
            cost ``m_half / (peak * e_max)`` of the links).
        one_sided: the transport costed.
    """

    strategy: str
    degrees: tuple[int, int]
    latency_s: float
    breakdown: dict[str, float]
    events: tuple[Event, ...]
    overheads: dict[str, float] = dataclasses.field(default_factory=dict)
    one_sided: bool = True


def simulate(
    strategy: str,
    topology: Topology,
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    text_len: int = 0,
    one_sided: bool = True,
    ulysses_degree: int | None = None,
    cost: CostModel | None = None,
) -> SimResult:
    """Per-layer attention latency of ``strategy`` on ``topology`` (no devices needed).

    Args:
        strategy: a strategy name (not "auto": rank them with :func:`sf_attn.plan`).
        topology: machines, links and device rate (e.g. ``Topology.preset("p4de", 4)``).
        seq_len, heads, head_dim, dtype, batch: the attention layer.
        text_len: replicated joint text tokens (MMDiT).
        one_sided: cost transfers as one-sided puts (True) or two-sided send/recv.
        ulysses_degree: override the strategy's default degree.
        cost: cost-model constants.

    Raises:
        ValueError: as :func:`sf_attn.parallel_attention` for impossible degrees/heads.
    """
    from ..sharding import chunk_sizes
    from ..strategies import get_strategy

    if strategy == "auto":
        raise ValueError("simulate needs a concrete strategy; use sf_attn.plan to rank them")
    chosen = get_strategy(strategy)
    layout = chosen.layout(topology, heads, ulysses_degree)
    ctx = SimContext(topology)
    seq_lens = chunk_sizes(seq_len, topology.world_size)
    q, k, v = (
        torch.empty(batch, seq_lens[0], heads, head_dim, dtype=dtype, device="meta")
        for _ in range(3)
    )
    joint = None
    if text_len:
        joint = tuple(
            torch.empty(batch, text_len, heads, head_dim, dtype=dtype, device="meta")
            for _ in range(3)
        )
    cost = cost or CostModel()
    tracer = VirtualTracer(
        topology,
        one_sided=one_sided,
        cost=cost,
        attn_flops=kernel_rate(topology, head_dim, cost.kernel),
    )
    with tracing(tracer):
        chosen.execute(
            q,
            k,
            v,
            ctx=ctx,
            layout=layout,
            seq_lens=seq_lens,
            scale=head_dim**-0.5,
            joint=joint,
        )
    return SimResult(
        strategy=strategy,
        degrees=(layout.p_u, layout.p_r),
        latency_s=max(tracer.now, *tracer.link_free.values()),
        breakdown=tracer.busy(),
        events=tuple(tracer.events),
        overheads=dict(tracer.overhead),
        one_sided=one_sided,
    )
