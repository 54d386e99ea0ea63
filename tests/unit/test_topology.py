"""Tier 1: Topology parsing, detection, presets and their errors."""

from __future__ import annotations

import pytest

from sf_comm import Topology


def test_parse_and_rank_layout() -> None:
    """Catches a wrong rank -> (machine, local) mapping, which would put the ring on the wrong link."""
    topo = Topology.parse("2x4")
    assert (topo.machines, topo.gpus_per_machine, topo.world_size) == (2, 4, 8)
    assert [topo.machine_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [topo.local_of(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert topo.same_machine(1, 3) and not topo.same_machine(3, 4)


@pytest.mark.parametrize("spec", ["2", "2x", "x4", "2*4", "0x4", "2x0", "-1x2"])
def test_parse_rejects_bad_specs(spec: str) -> None:
    """Catches silently accepting a malformed SF_TOPOLOGY (the job would run with a wrong mesh)."""
    with pytest.raises(ValueError, match="MACHINESxGPUS|positive"):
        Topology.parse(spec)


def test_detect_env_override_and_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches SF_TOPOLOGY being ignored, or a topology/world mismatch passing unnoticed."""
    monkeypatch.setenv("SF_TOPOLOGY", "2x2")
    assert Topology.detect(world_size=4).shape == (2, 2)
    with pytest.raises(ValueError, match=r"SF_TOPOLOGY=2x2.*world size 8"):
        Topology.detect(world_size=8)
    monkeypatch.delenv("SF_TOPOLOGY")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert Topology.detect().shape == (2, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="does not divide"):
        Topology.detect()


def test_presets() -> None:
    """Catches preset link numbers drifting from the hardware they name (the planner relies on them)."""
    p4de = Topology.preset("p4de", machines=4)
    assert p4de.shape == (4, 8)
    # 4x 100 Gbps EFA per machine: 2 GPUs per 12.5 GB/s NIC = 50 GB/s per machine
    assert p4de.inter_bw * p4de.gpus_per_machine / p4de.gpus_per_nic == pytest.approx(50e9)
    ib = Topology.preset("h100-ib", machines=2)
    assert ib.inter_bw * ib.gpus_per_machine / ib.gpus_per_nic == pytest.approx(400e9)
    assert set(Topology.presets()) >= {"p4de", "h100-ib", "h200-ib"}
    with pytest.raises(ValueError, match="unknown topology preset 'dgx'.*p4de"):
        Topology.preset("dgx")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machines", 0),
        ("gpus_per_machine", 2.0),
        ("inter_bw", 0.0),
        ("intra_latency", -1.0),
        ("gpus_per_nic", 3),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    """Catches a bad link parameter slipping into the simulator as a division by zero later."""
    kwargs: dict[str, object] = {"machines": 1, "gpus_per_machine": 4, field: value}
    with pytest.raises(ValueError, match=field):
        Topology(**kwargs)  # type: ignore[arg-type]
