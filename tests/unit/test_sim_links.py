"""Tier 1: the simulator's link model, the xDiT baseline, `--explain` and `--sweep`.

No devices. The link curves are checked on every preset; the command is run on small
sizes except in the deliverable test (auto never slower than the baseline on the twelve
points of results/SIM-2026-11-30-links.md), which is marked slow.
"""

from __future__ import annotations

import itertools
import json

import pytest

from sf_attn.sim import simulate
from sf_attn.sim.step import BASELINE_NAME, simulate_step
from sf_comm import Topology
from sf_comm.topology import PATTERNS, LinkCurve, LinkModel
from sf_models import simulate_cmd

SIZES = [2.0**k for k in range(6, 34)]  # 64 B .. 8 GB


COMBINATIONS = list(itertools.product(("intra", "inter"), (True, False), PATTERNS))


@pytest.mark.parametrize("preset", Topology.presets())
def test_link_curve_is_monotone_and_approaches_e_max(preset: str) -> None:
    """Catches a bandwidth curve that falls with message size (the planner would then favour
    splitting transfers into tiny pieces), one that overshoots its measured plateau, and one
    whose half-efficiency point is not where its parameter says."""
    topo = Topology.preset(preset, machines=2)
    for link, one_sided, pattern in COMBINATIONS:
        curve = topo.links.curve(link, one_sided=one_sided, pattern=pattern)
        peak = topo.intra_bw if link == "intra" else topo.inter_bw / topo.gpus_per_nic
        bws = [topo.bandwidth(link, m, one_sided=one_sided, pattern=pattern) for m in SIZES]
        assert all(b >= a for a, b in itertools.pairwise(bws)), (link, one_sided, pattern)
        assert all(b <= curve.e_max * peak * (1 + 1e-12) for b in bws)
        # 8 GB messages reach the plateau to within 1 % (every m_half here is < 80 MB)
        assert bws[-1] == pytest.approx(curve.e_max * peak, rel=1e-2)
        if curve.m_half:
            half = topo.bandwidth(link, curve.m_half, one_sided=one_sided, pattern=pattern)
            assert half == pytest.approx(0.5 * curve.e_max * peak, rel=1e-12)


def test_link_curve_validation_and_sweep_knob() -> None:
    """Catches an efficiency above line rate or a negative size slipping into the model, and a
    sweep knob that leaves some inter-machine curve (or an intra one) at the wrong value."""
    with pytest.raises(ValueError, match="e_max"):
        LinkCurve(e_max=1.2)
    with pytest.raises(ValueError, match="m_half"):
        LinkCurve(m_half=-1.0)
    links = Topology.preset("p4de").links
    swept = links.with_inter_efficiency(0.35)
    for name in ("inter_all_to_all", "inter_send_recv", "inter_one_sided"):
        assert getattr(swept, name).e_max == 0.35
        assert getattr(swept, name).m_half == getattr(links, name).m_half
    assert swept.intra_two_sided == links.intra_two_sided
    assert swept.intra_one_sided == links.intra_one_sided


def _layer(strategy: str, topo: Topology, *, one_sided: bool) -> float:
    return simulate(
        strategy, topo, seq_len=8192, heads=16, head_dim=64, one_sided=one_sided
    ).latency_s


def test_each_transfer_uses_its_own_curve() -> None:
    """Catches a transfer costed on the wrong curve: ring shifts must use the send/recv curve
    and only it, all-to-alls the all-to-all curve, one-sided puts the put curve (a mix-up
    would make the planner credit one transport or pattern with another's network)."""
    base = Topology(
        machines=2,
        gpus_per_machine=4,
        intra_bw=200e9,
        inter_bw=10e9,
        gpus_per_nic=2,
        device_flops=200e12,
    )
    slow = LinkCurve(e_max=0.1)
    slow_p2p = base.replace(links=LinkModel(inter_send_recv=slow))
    slow_a2a = base.replace(links=LinkModel(inter_all_to_all=slow))
    slow_put = base.replace(links=LinkModel(inter_one_sided=slow))
    # Ring over all 8 ranks moves only by shifts; Ulysses over 8 only by all-to-alls
    ring, ulysses = "ring", "ulysses"
    assert _layer(ring, slow_p2p, one_sided=False) > _layer(ring, base, one_sided=False)
    assert _layer(ring, slow_a2a, one_sided=False) == _layer(ring, base, one_sided=False)
    assert _layer(ulysses, slow_a2a, one_sided=False) > _layer(ulysses, base, one_sided=False)
    assert _layer(ulysses, slow_p2p, one_sided=False) == _layer(ulysses, base, one_sided=False)
    for name in (ring, ulysses):
        assert _layer(name, slow_put, one_sided=True) > _layer(name, base, one_sided=True)
        assert _layer(name, slow_put, one_sided=False) == _layer(name, base, one_sided=False)
        assert _layer(name, slow_p2p, one_sided=True) == _layer(name, base, one_sided=True)


def test_efficiency_slows_inter_bound_steps() -> None:
    """Catches the link curves not reaching the simulator (the step would not change) or
    reaching it inverted (a less efficient network giving a faster step)."""
    topo = Topology.preset("p4de", machines=2)
    steps = [
        simulate_step(
            "flux",
            topo.replace(links=topo.links.with_inter_efficiency(e)),
            height=1024,
            width=1024,
            strategy="usp",
            text="sharded",
        )
        for e in (0.3, 0.6, 1.0)
    ]
    latencies = [s.strategies["usp"].latency_s for s in steps]  # type: ignore[union-attr]
    assert latencies[0] > latencies[1] > latencies[2]
    baselines = [s.baseline.latency_s for s in steps]  # type: ignore[union-attr]
    assert baselines[0] > baselines[1] > baselines[2]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert simulate_cmd.main(list(argv)) == 0
    return capsys.readouterr().out


SMALL = ("--model", "flux", "--height", "1024", "--width", "1024", "--hardware", "p4de")


def test_json_has_the_baseline_and_every_row_its_transport(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches the xDiT baseline missing from --json, costed with StreamFusion's transport or
    text layout instead of xDiT's, or speedups computed against something else."""
    out = json.loads(_cli(capsys, *SMALL, "--machines", "2", "--json"))
    base = out["baseline"]
    assert base["name"] == BASELINE_NAME == "xdit-usp"
    assert base["transport"] == "two-sided" and base["text"] == "sharded"
    p_u, p_r = base["degrees"]
    assert (p_u, p_r) == (8, 2)  # Ulysses inside the 8-GPU machines, Ring across the two
    assert base["latency_s"] > 0
    for name, row in out["strategies"].items():
        if row is None:
            continue
        assert row["transport"] == "one-sided" and row["text"] == "sharded", name
        assert row["speedup"] == pytest.approx(base["latency_s"] / row["latency_s"], rel=1e-12)
    two = json.loads(_cli(capsys, *SMALL, "--machines", "2", "--json", "--two-sided"))
    assert all(r["transport"] == "two-sided" for r in two["strategies"].values() if r)


def test_table_and_explain_shape(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches the baseline row or the speedup column missing from the table, and --explain
    not naming the choice and one of the four terms as the dominant one."""
    out = _cli(capsys, *SMALL, "--machines", "2", "--explain")
    lines = out.splitlines()
    assert f"vs {BASELINE_NAME}" in lines[2]
    assert lines[4].startswith(f"{BASELINE_NAME} (base)") and "2-sided" in lines[4]
    assert "1.00x" in lines[4]
    explain = [line for line in lines if line.startswith("explain")]
    assert len(explain) == 1 and "auto picks" in explain[0]
    dominated = [line for line in lines if line.endswith("dominates")]
    assert len(dominated) == 2  # auto and the baseline
    terms = ("inter-machine transfer", "intra-machine transfer", "compute", "overheads")
    for line in dominated:
        assert any(line.endswith(f"-> {t} dominates") for t in terms), line
    assert any(line.strip().startswith("runner-up:") for line in lines)


def test_sweep_output_shape(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """Catches a sweep that does not vary the inter-machine efficiency (every row the same),
    drops a strategy column, or fails to draw."""
    png = tmp_path / "sweep.png"
    out = _cli(
        capsys,
        *SMALL,
        "--machines",
        "2",
        "--sweep",
        "inter-efficiency=0.3,0.6,1.0",
        "--plot",
        str(png),
    )
    lines = out.splitlines()
    head = lines[1].split()
    assert head[:2] == ["e_max", f"{BASELINE_NAME}"]
    for name in ("usp", "tas", "torus", "ulysses", "ring", "auto"):
        assert name in head
    rows = lines[3:6]
    assert [float(r.split()[0]) for r in rows] == [0.3, 0.6, 1.0]
    base_ms = [float(r.split()[1]) for r in rows]
    assert base_ms[0] > base_ms[1] > base_ms[2]  # the baseline is swept too
    assert lines[6] == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads(
        _cli(capsys, *SMALL, "--machines", "2", "--sweep", "inter-efficiency=0.5", "--json")
    )
    assert [p["inter_efficiency"] for p in points["points"]] == [0.5]
    assert points["points"][0]["baseline"]["name"] == BASELINE_NAME


@pytest.mark.parametrize(
    "value",
    [
        "bandwidth",
        "inter-efficiency=0",
        "inter-efficiency=1.5",
        "inter-efficiency=0.9:0.3:0.1",
        "inter-efficiency=0.3:1.0:0",
        "inter-efficiency=a,b",
        "inter-efficiency=",
    ],
)
def test_bad_sweep_values_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """Catches a bad --sweep turning into a traceback, a silent default, or an error that does
    not say what is allowed."""
    with pytest.raises(SystemExit) as exc:
        simulate_cmd.main([*SMALL, "--sweep", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --sweep" in err, err
    assert "inter-efficiency" in err


def test_sweep_default_values() -> None:
    """Catches the documented default range (0.3 .. 1.0 by 0.1) drifting, and LO:HI:STEP
    losing its last point to rounding."""
    assert simulate_cmd.sweep_spec("inter-efficiency") == (
        "inter-efficiency",
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    )
    assert simulate_cmd.sweep_spec("inter-efficiency=0.3:1.0:0.1")[1][-1] == 1.0


POINTS = [
    ("flux", 3072, 3072, 1),
    ("flux", 4096, 4096, 1),
    ("cogvideox", 768, 1360, 161),  # 20 s at 8 fps
    ("cogvideox", 768, 1360, 321),  # 40 s
]


@pytest.mark.slow
@pytest.mark.parametrize("machines", [2, 3, 4])
@pytest.mark.parametrize(("model", "height", "width", "frames"), POINTS)
def test_auto_never_slower_than_xdit_baseline(
    model: str, height: int, width: int, frames: int, machines: int
) -> None:
    """Catches an auto that loses to xDiT's USP as deployed on the twelve deliverable points
    (p4de, 2-4 machines): a planner that ranks with the wrong transport or text layout, or
    an auto that cannot fall back to the baseline's own configuration."""
    for one_sided in (True, False):
        res = simulate_step(
            model,
            Topology.preset("p4de", machines),
            height=height,
            width=width,
            frames=frames,
            strategy="auto",
            one_sided=one_sided,
            text="sharded",
        )
        auto = res.strategies["auto"]
        assert res.baseline is not None and auto is not None
        assert auto.latency_s <= res.baseline.latency_s, (model, frames, machines, one_sided)


def test_auto_never_slower_than_xdit_baseline_small() -> None:
    """The fast tier's version of the test above, on sizes that take a second: catches the same
    bugs on 1-4 p4de machines, one- and two-sided, and with replicated text (auto must then
    still match the baseline, which shards it)."""
    for machines, one_sided, text in itertools.product(
        (1, 2, 4), (True, False), ("sharded", "replicated")
    ):
        res = simulate_step(
            "flux",
            Topology.preset("p4de", machines),
            height=1024,
            width=1024,
            strategy="auto",
            one_sided=one_sided,
            text=text,  # type: ignore[arg-type]
        )
        auto = res.strategies["auto"]
        assert res.baseline is not None and auto is not None
        assert auto.latency_s <= res.baseline.latency_s, (machines, one_sided, text)


def test_covered_counts_overlapping_spans_once() -> None:
    from sf_attn.sim.layer import _covered

    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]
    assert _covered(spans, 0.5, 5.5) == pytest.approx(2.5 + 0.5)
    assert _covered(spans, 3.0, 5.0) == 0.0
    assert _covered([], 0.0, 1.0) == 0.0


def test_interference_slows_overlapped_compute_only() -> None:
    """Catches the interference term charging one-sided transfers, compute that overlaps
    nothing, or more than the stated fraction: Ring on 4 ranks (its compute overlaps the
    next block's shift) gets slower two-sided, by at most f/(1-f) of its compute; one-sided
    and f = 0 change nothing; f outside [0, 1) is refused."""
    from sf_attn.sim.layer import CostModel

    topo = Topology.preset("p4de", machines=1)
    kw = dict(seq_len=32768, heads=24, head_dim=128)
    f = 0.2

    def run(one_sided: bool, fraction: float) -> object:
        cost = CostModel(interference=fraction)
        return simulate("ring", topo, one_sided=one_sided, cost=cost, **kw)

    plain, slowed = run(False, 0.0), run(False, f)
    assert slowed.latency_s > plain.latency_s
    assert slowed.latency_s <= plain.latency_s + plain.breakdown["compute"] * f / (1 - f) + 1e-12
    assert run(True, f).latency_s == run(True, 0.0).latency_s
    assert simulate("ring", topo, one_sided=False, **kw).latency_s == plain.latency_s
    with pytest.raises(ValueError, match="interference"):
        CostModel(interference=1.0)
