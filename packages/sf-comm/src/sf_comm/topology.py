"""Machines x GPUs per machine, the links between them, and presets for planned hardware.

A rank's place in a topology is ``rank = machine * gpus_per_machine + local``: ranks of a
machine are contiguous, as torchrun lays them out. The ``inter`` mesh axis joins the ranks
with the same ``local`` index across machines; the ``intra`` axis joins the ranks of one
machine.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

_GB = 1e9
_MB = 1e6

# The message patterns a link model tells apart: a collective with many peers at once
# (all-to-all, all-gather) and a transfer to one peer (a ring shift, a staged pull).
PATTERNS = ("all_to_all", "send_recv")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinkCurve:
    """Effective bandwidth of one transport and pattern on one link, by message size.

    ``bw(m) = peak * e_max * m / (m + h)`` for a message of ``m`` bytes (one rank's bytes on
    that link in one call), ``h = m_half + m_half_per_peer * peers`` with ``peers`` the
    rank's peers on that link in the call: the link reaches ``e_max`` of its line rate for
    large messages and half of that at ``h`` bytes. Equivalently a message costs
    ``m / (peak * e_max)`` plus a fixed ``h / (peak * e_max)`` seconds (the protocol's
    per-call cost, which grows with the peers: Note [Per-peer call cost]). ``LinkCurve()`` is
    line rate at every size.
    """

    e_max: float = 1.0
    m_half: float = 0.0  # bytes
    m_half_per_peer: float = 0.0  # bytes per peer on the link

    def __post_init__(self) -> None:
        if not 0 < self.e_max <= 1:
            raise ValueError(f"LinkCurve.e_max must be in (0, 1], got {self.e_max!r}")
        for field in ("m_half", "m_half_per_peer"):
            if not getattr(self, field) >= 0:
                raise ValueError(
                    f"LinkCurve.{field} must be >= 0 bytes, got {getattr(self, field)!r}"
                )

    def half(self, peers: int = 1) -> float:
        """Bytes at half efficiency for a call with ``peers`` peers on the link."""
        return self.m_half + self.m_half_per_peer * peers

    def efficiency(self, nbytes: float, peers: int = 1) -> float:
        """Fraction of line rate a message of ``nbytes`` gets: ``e_max * m / (m + h)``."""
        half = self.half(peers)
        if nbytes <= 0:
            return self.e_max if half == 0 else 0.0
        return self.e_max * nbytes / (nbytes + half)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinkModel:
    """Per link, transport and pattern, the :class:`LinkCurve` a transfer gets.

    Inside a machine both patterns share one curve per transport (NVLink/NVSwitch moves a
    collective's peers' messages at once); between machines two-sided all-to-all and
    send/recv have their own (NCCL runs them as different kernels and channel counts).
    The default is line rate everywhere (custom topologies, measured rates).
    """

    intra_two_sided: LinkCurve = LinkCurve()
    intra_one_sided: LinkCurve = LinkCurve()
    inter_all_to_all: LinkCurve = LinkCurve()  # two-sided (NCCL all-to-all)
    inter_send_recv: LinkCurve = LinkCurve()  # two-sided (NCCL send/recv)
    inter_one_sided: LinkCurve = LinkCurve()  # puts (NVSHMEM)

    def curve(self, link: str, *, one_sided: bool, pattern: str = "all_to_all") -> LinkCurve:
        """The curve of ``link`` ("intra" or "inter") for a transport and a pattern.

        Raises:
            ValueError: unknown link or pattern.
        """
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")
        if link == "intra":
            return self.intra_one_sided if one_sided else self.intra_two_sided
        if link == "inter":
            if one_sided:
                return self.inter_one_sided
            return self.inter_all_to_all if pattern == "all_to_all" else self.inter_send_recv
        raise ValueError(f"unknown link {link!r}; known: 'intra', 'inter'")

    def with_inter_efficiency(self, e_max: float) -> LinkModel:
        """Every inter-machine curve with its large-message efficiency set to ``e_max`` (the
        size at half efficiency kept): the ``--sweep inter-efficiency`` knob."""
        return dataclasses.replace(
            self,
            inter_all_to_all=dataclasses.replace(self.inter_all_to_all, e_max=e_max),
            inter_send_recv=dataclasses.replace(self.inter_send_recv, e_max=e_max),
            inter_one_sided=dataclasses.replace(self.inter_one_sided, e_max=e_max),
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    """A homogeneous cluster: ``machines`` x ``gpus_per_machine`` ranks and its links.

    Bandwidths are line rates in bytes/s per direction, latencies in seconds. ``inter_bw``
    is the bandwidth of one NIC; ``gpus_per_nic`` GPUs share it, so a machine's total
    inter-machine bandwidth is ``inter_bw * gpus_per_machine / gpus_per_nic``. ``links``
    says what fraction of line rate each transport and pattern reaches by message size
    (:meth:`bandwidth`; the presets' values and their sources are in docs/simulator.md).
    """

    machines: int
    gpus_per_machine: int
    intra_bw: float = 25 * _GB
    intra_latency: float = 5e-6
    inter_bw: float = 12.5 * _GB
    inter_latency: float = 10e-6
    gpus_per_nic: int = 1
    # Dense bf16 matmul rate a kernel achieves on one device, FLOP/s (for the simulator).
    device_flops: float = 1e11
    # Streaming multiprocessors per device: attention kernels run in waves over them.
    device_sms: int = 132
    links: LinkModel = LinkModel()
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("machines", "gpus_per_machine", "gpus_per_nic", "device_sms"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology.{field} must be a positive int, got {value!r}")
        for field in ("intra_bw", "inter_bw", "device_flops"):
            value = getattr(self, field)
            if not value > 0:
                raise ValueError(f"Topology.{field} must be > 0, got {value!r}")
        for field in ("intra_latency", "inter_latency"):
            value = getattr(self, field)
            if not value >= 0:
                raise ValueError(f"Topology.{field} must be >= 0, got {value!r}")
        if self.gpus_per_machine % self.gpus_per_nic:
            raise ValueError(
                f"Topology.gpus_per_nic={self.gpus_per_nic} must divide "
                f"gpus_per_machine={self.gpus_per_machine}"
            )

    def bandwidth(
        self,
        link: str,
        nbytes: float,
        *,
        one_sided: bool,
        pattern: str = "all_to_all",
        nic_sharers: int | None = None,
        peers: int = 1,
    ) -> float:
        """Effective bytes/s one GPU gets for a message of ``nbytes`` on ``link``.

        ``nic_sharers``: how many GPUs behind the NIC cross machines at once (default all
        ``gpus_per_nic`` of them; Note [NIC sharers] in sf_comm.collectives). Fewer sharers
        give each a larger share of the line rate, but the protocol's per-call cost
        ``h / (peak_all * e_max)`` is a time and stays. ``peers``: this rank's peers on the
        link in the call (:meth:`LinkCurve.half`). Equivalent plain code::

            peak = intra_bw if link == "intra" else inter_bw / nic_sharers
            peak_all = intra_bw if link == "intra" else inter_bw / gpus_per_nic
            seconds = nbytes / (peak * e_max) + curve.half(peers) / (peak_all * e_max)
            return nbytes / seconds    # = peak * curve.efficiency(nbytes, peers) when all share

        Raises:
            ValueError: unknown link or pattern.
        """
        curve = self.links.curve(link, one_sided=one_sided, pattern=pattern)
        peak, peak_all = self.peak(link, nic_sharers), self.peak(link)
        if nbytes <= 0 or peak == peak_all:
            return peak * curve.efficiency(nbytes, peers)
        call_s = curve.half(peers) / (peak_all * curve.e_max)
        return nbytes / (nbytes / (peak * curve.e_max) + call_s)

    def peak(self, link: str, nic_sharers: int | None = None) -> float:
        """Line rate one GPU gets on ``link``: ``intra_bw``, or its share of the NIC among
        ``nic_sharers`` GPUs (clamped to 1..gpus_per_nic; default all of them)."""
        if link == "intra":
            return self.intra_bw
        sharers = self.gpus_per_nic if nic_sharers is None else nic_sharers
        return self.inter_bw / min(max(1, sharers), self.gpus_per_nic)

    @property
    def world_size(self) -> int:
        return self.machines * self.gpus_per_machine

    @property
    def shape(self) -> tuple[int, int]:
        """Mesh shape ``(inter, intra)``."""
        return (self.machines, self.gpus_per_machine)

    def machine_of(self, rank: int) -> int:
        return rank // self.gpus_per_machine

    def local_of(self, rank: int) -> int:
        return rank % self.gpus_per_machine

    def same_machine(self, a: int, b: int) -> bool:
        return self.machine_of(a) == self.machine_of(b)

    def axis_partitions(self) -> dict[str, list[tuple[int, ...]]]:
        """The rank groups of each axis: "world", "intra" (one machine's ranks) and "inter"
        (the ranks with the same local index on every machine)."""
        machines, gpus = self.shape
        return {
            "world": [tuple(range(self.world_size))],
            "intra": [tuple(m * gpus + g for g in range(gpus)) for m in range(machines)],
            "inter": [tuple(m * gpus + g for m in range(machines)) for g in range(gpus)],
        }

    def replace(self, **changes: Any) -> Topology:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return f"{self.machines}x{self.gpus_per_machine}"

    # -- construction -------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, **links: Any) -> Topology:
        """``"2x4"`` -> 2 machines x 4 GPUs each."""
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
        if not match:
            raise ValueError(f"topology spec {spec!r} is not of the form MACHINESxGPUS, e.g. '2x4'")
        return cls(machines=int(match[1]), gpus_per_machine=int(match[2]), **links)

    @classmethod
    def detect(cls, world_size: int | None = None) -> Topology:
        """The topology of this job.

        ``SF_TOPOLOGY=NxM`` wins (it lets one host emulate N machines of M ranks); otherwise
        torchrun's ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` give machines x local ranks;
        otherwise every rank is taken to be on one machine.

        Args:
            world_size: the actual world size, when known; a topology that does not match it
                is an error.

        Raises:
            ValueError: when the detected topology does not match ``world_size``.
        """
        spec = os.environ.get("SF_TOPOLOGY")
        if spec:
            topo = cls.parse(spec, name="emulated")
            source = f"SF_TOPOLOGY={spec}"
        else:
            world = int(os.environ.get("WORLD_SIZE", world_size or 1))
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if local < 1 or world % local:
                raise ValueError(
                    f"LOCAL_WORLD_SIZE={local} does not divide WORLD_SIZE={world}; "
                    "set SF_TOPOLOGY=MACHINESxGPUS explicitly"
                )
            topo = cls(machines=world // local, gpus_per_machine=local, name="detected")
            source = f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local}"
        if world_size is not None:
            topo.check_world(world_size, source=source)
        return topo

    def check_world(self, world_size: int, *, source: str = "topology") -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"{source} describes {self.machines}x{self.gpus_per_machine} = "
                f"{self.world_size} ranks, but the job has world size {world_size}; "
                f"use a MACHINESxGPUS split whose product is {world_size}"
            )

    @classmethod
    def preset(cls, name: str, machines: int = 1) -> Topology:
        """A planned-for cluster of ``machines`` identical machines.

        Presets (per machine):
          - ``p4de``: 8x A100 80GB, NVSwitch (300 GB/s line per GPU), 4x 100 Gbps EFA
            (one NIC per 2 GPUs, 12.5 GB/s each, 400 Gbps per machine), ~250 TFLOP/s bf16
            achievable per GPU out of 312 peak.
          - ``h100-ib``: 8x H100 SXM, NVLink 4 (450 GB/s line), 8x 400 Gbps IB
            (one NIC per GPU, 50 GB/s), ~650 TFLOP/s bf16 achievable.
          - ``h200-ib``: 8x H200 SXM, same links as h100-ib, ~700 TFLOP/s achievable.
          - ``p5``: 8x H100 SXM (as h100-ib) with 4x 100 Gbps EFA per GPU (3200 Gbps per
            machine), the machine the public EFA all-to-all and NVSHMEM figures are from.

        Bandwidths are line rates; ``links`` holds the measured efficiencies by transport,
        pattern and message size (docs/simulator.md, "The link model").

        Raises:
            ValueError: unknown preset name or ``machines < 1``.
        """
        try:
            spec = _PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown topology preset {name!r}; known presets: {sorted(_PRESETS)}"
            ) from None
        return cls(machines=machines, name=name, **spec)

    @staticmethod
    def presets() -> list[str]:
        return sorted(_PRESETS)


# Link efficiencies (every number's source and fit is in docs/simulator.md, "The link
# model"). Inside machines: NCCL ring all-reduce bus bandwidth
# at 1 GB on one machine (two-sided), an NVSHMEM NVLink put stress test (one-sided); m_half
# 0: the per-message latency alone (intra_latency) covers small messages there.
# Between machines: NCCL all-to-all on p5 (EFA) fitted by size (e_max 0.865, 0.235 ms per
# call + 4.6 us per remote peer), NCCL all-reduce on 3-4 p4dn machines for EFA's e_max on A100 machines, NVIDIA's
# 46-49 GB/s per NDR NIC for InfiniBand, NVSHMEM shmem_put_bw on p5 for the one-sided
# per-put cost (32 us). m_half = per-call seconds x e_max x per-GPU line rate (and
# m_half_per_peer the same of the per-peer seconds).
_NCCL_CALL_S = 0.235e-3  # fitted to p5 nccl-tests all_to_all, 2-8 machines ...
_NCCL_PEER_S = 4.6e-6  # ... plus this per peer on other machines (Note [Per-peer call cost])
_NVSHMEM_PUT_S = 32e-6  # shmem_put_bw on p5: 64-256 KB puts take ~32 us each


# Note [Per-peer call cost]
# An NCCL all-to-all over EFA costs more per call the more peers it has: fitted on p5 at 2-8
# machines (nccl-tests alltoall_perf, 32 MB-2 GB per rank), a flat per-call cost leaves the
# same file's 16 and 32 machines (128-256 remote peers) 20-36 % faster than measured at
# 32-256 MB; a cost of 0.235 ms + 4.6 us per remote peer fits 2-8 machines at rms 4 % (the
# flat one at 6 %) and predicts the held-out 16-32 machines within -17..+29 %
# (docs/simulator.md). A ring shift has one remote peer, a head scatter over 4 machines of 8
# GPUs 24. The per-peer form was chosen after the held-out miss was seen; its constants were
# fitted on 2-8 machines only. One-sided puts keep a per-put cost (no per-peer data).


def _inter(e_two: float, e_one: float, per_gpu_bw: float) -> dict[str, LinkCurve]:
    two = LinkCurve(
        e_max=e_two,
        m_half=_NCCL_CALL_S * e_two * per_gpu_bw,
        m_half_per_peer=_NCCL_PEER_S * e_two * per_gpu_bw,
    )
    return {
        "inter_all_to_all": two,
        # no published NCCL send/recv size curve over EFA/IB was found: the all-to-all's
        "inter_send_recv": two,
        "inter_one_sided": LinkCurve(e_max=e_one, m_half=_NVSHMEM_PUT_S * e_one * per_gpu_bw),
    }


_PRESETS: dict[str, dict[str, Any]] = {
    "p4de": dict(
        gpus_per_machine=8,
        intra_bw=300 * _GB,  # NVLink 3: 12 links x 25 GB/s per direction
        intra_latency=3e-6,
        inter_bw=12.5 * _GB,  # one 100 Gbps EFA NIC
        inter_latency=15e-6,
        gpus_per_nic=2,
        device_flops=250e12,
        device_sms=108,
        links=LinkModel(
            intra_two_sided=LinkCurve(e_max=0.77),  # p4dn 1 machine: 230.8 / 300 GB/s
            intra_one_sided=LinkCurve(e_max=0.85),
            # p4dn all-reduce 3-4 machines: 29.6-31.8 of 50 GB/s per machine; one-sided: no
            # p4de NVSHMEM figure, assumed equal (p5's NVSHMEM reaches less: docs)
            **_inter(0.6, 0.6, 12.5 * _GB / 2),
        ),
    ),
    "h100-ib": dict(
        gpus_per_machine=8,
        intra_bw=450 * _GB,  # NVLink 4: 18 links x 25 GB/s per direction
        intra_latency=2e-6,
        inter_bw=50 * _GB,  # one 400 Gbps NDR NIC
        inter_latency=5e-6,
        gpus_per_nic=1,
        device_flops=650e12,
        links=LinkModel(
            intra_two_sided=LinkCurve(e_max=0.82),  # 8x H100 ring all-reduce ~370 / 450 GB/s
            intra_one_sided=LinkCurve(e_max=0.85),  # NVSHMEM put 396 / 468 GB/s
            **_inter(0.94, 0.94, 50 * _GB),  # 46-49 GB/s per NDR NIC
        ),
    ),
    "h200-ib": dict(
        gpus_per_machine=8,
        intra_bw=450 * _GB,
        intra_latency=2e-6,
        inter_bw=50 * _GB,
        inter_latency=5e-6,
        gpus_per_nic=1,
        device_flops=700e12,
        links=LinkModel(
            intra_two_sided=LinkCurve(e_max=0.82),
            intra_one_sided=LinkCurve(e_max=0.85),
            **_inter(0.94, 0.94, 50 * _GB),
        ),
    ),
    "p5": dict(
        gpus_per_machine=8,
        intra_bw=450 * _GB,
        intra_latency=2e-6,
        inter_bw=50 * _GB,  # 4x 100 Gbps EFA per GPU (3200 Gbps per machine)
        inter_latency=15e-6,
        gpus_per_nic=1,
        device_flops=650e12,
        links=LinkModel(
            intra_two_sided=LinkCurve(e_max=0.82),
            intra_one_sided=LinkCurve(e_max=0.85),
            # NCCL all-to-all fitted on p5 itself; NVSHMEM put: shmem_put_bw's 512 KB point
            # after the 32 us per put (24.6 of 50 GB/s)
            **_inter(0.865, 0.49, 50 * _GB),
        ),
    ),
}
