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


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    """A homogeneous cluster: ``machines`` x ``gpus_per_machine`` ranks and its links.

    Bandwidths are in bytes/s per direction, latencies in seconds. ``inter_bw`` is the
    bandwidth of one NIC; ``gpus_per_nic`` GPUs share it, so a machine's total inter-machine
    bandwidth is ``inter_bw * gpus_per_machine / gpus_per_nic``.
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
          - ``p4de``: 8x A100 80GB, NVSwitch (~250 GB/s achievable per GPU), 4x 100 Gbps EFA
            (one NIC per 2 GPUs, ~12.5 GB/s each, 400 Gbps per machine), ~250 TFLOP/s bf16
            achievable per GPU out of 312 peak.
          - ``h100-ib``: 8x H100 SXM, NVLink 4 (~380 GB/s achievable), 8x 400 Gbps IB
            (one NIC per GPU, ~50 GB/s), ~650 TFLOP/s bf16 achievable.
          - ``h200-ib``: 8x H200 SXM, same links as h100-ib, ~700 TFLOP/s achievable.

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


_PRESETS: dict[str, dict[str, Any]] = {
    "p4de": dict(
        gpus_per_machine=8,
        intra_bw=250 * _GB,
        intra_latency=3e-6,
        inter_bw=12.5 * _GB,
        inter_latency=15e-6,
        gpus_per_nic=2,
        device_flops=250e12,
        device_sms=108,
    ),
    "h100-ib": dict(
        gpus_per_machine=8,
        intra_bw=380 * _GB,
        intra_latency=2e-6,
        inter_bw=50 * _GB,
        inter_latency=5e-6,
        gpus_per_nic=1,
        device_flops=650e12,
    ),
    "h200-ib": dict(
        gpus_per_machine=8,
        intra_bw=380 * _GB,
        intra_latency=2e-6,
        inter_bw=50 * _GB,
        inter_latency=5e-6,
        gpus_per_nic=1,
        device_flops=700e12,
    ),
}
