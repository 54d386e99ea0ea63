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
        peak = topo.peak(link)
        bws = [topo.bandwidth(link, m, one_sided=one_sided, pattern=pattern) for m in SIZES]
        assert all(b >= a for a, b in itertools.pairwise(bws)), (link, one_sided, pattern)
        assert all(b <= curve.e_max * peak * (1 + 1e-12) for b in bws)
        # 8 GB messages reach the plateau to within 1 % (every m_half here is < 80 MB)
        assert bws[-1] == pytest.approx(curve.e_max * peak, rel=1e-2)
        for peers in (1, 24):
            if curve.half(peers):
                m = curve.half(peers)
                half = topo.bandwidth(link, m, one_sided=one_sided, pattern=pattern, peers=peers)
                assert half == pytest.approx(0.5 * curve.e_max * peak, rel=1e-12)


def test_link_curve_validation_and_sweep_knob() -> None:
    """Catches an efficiency above line rate or a negative size slipping into the model, and a
    sweep knob that leaves some inter-machine curve (or an intra one) at the wrong value."""
    with pytest.raises(ValueError, match="e_max"):
        LinkCurve(e_max=1.2)
    with pytest.raises(ValueError, match="m_half"):
        LinkCurve(m_half=-1.0)
    with pytest.raises(ValueError, match="m_half_per_peer"):
        LinkCurve(m_half_per_peer=-1.0)
    links = Topology.preset("p4de").links
    swept = links.with_inter_efficiency(0.35)
    for name in ("inter_all_to_all", "inter_send_recv", "inter_one_sided"):
        assert getattr(swept, name).e_max == 0.35
        assert getattr(swept, name).m_half == getattr(links, name).m_half
        assert getattr(swept, name).m_half_per_peer == getattr(links, name).m_half_per_peer
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


def test_nic_sharers_counts_the_ranks_that_cross() -> None:
    """Catches the NIC divided among every GPU behind it when only some cross machines
    (Note [NIC sharers]): a flat ring over all ranks crosses at one rank per direction per
    NIC, a ring or all-to-all across machines at every rank behind the NIC."""
    from sf_comm.collectives import nic_sharers
    from sf_comm.transport import Group

    topo = Topology(machines=2, gpus_per_machine=4, gpus_per_nic=2)
    world = Group("world", tuple(range(8)), 0)
    # rank 0 receives from rank 7 (another machine); rank 1, behind the same NIC, from rank 0
    assert nic_sharers(topo, world, [7]) == 1
    # rank 1 sends to rank 2 (same machine); rank 0 to rank 1: nobody behind NIC 0 crosses
    assert nic_sharers(topo, Group("world", world.ranks, 1), [2]) == 1
    # rank 3 sends to rank 4: it crosses; its NIC-mate rank 2 sends to rank 3 (does not)
    assert nic_sharers(topo, Group("world", world.ranks, 3), [4]) == 1
    # the inter axis {0, 4}: rank 1 runs {1, 5}, the translate; both cross
    assert nic_sharers(topo, Group("inter", (0, 4), 0), [4]) == 2
    # every peer of an all-to-all over the world: both ranks behind the NIC cross
    assert nic_sharers(topo, world, list(range(1, 8))) == 2
    # a group whose translate would leave the machine: its NIC-mate is taken as crossing
    assert nic_sharers(topo, Group("odd", (1, 4), 1), [4]) == 2


def test_flat_ring_gets_the_whole_nic() -> None:
    """Catches a flat Ring's machine-boundary shift charged to a NIC shared by every GPU
    behind it: with one crossing rank per direction, sharing the NIC between 2 GPUs must not
    slow it, while USP (its ring runs across machines on every GPU) is slowed."""
    # line-rate links, so that no per-call cost (a time tied to the shared peak) differs
    shared = Topology.preset("p4de", machines=2).replace(links=LinkModel())  # NIC behind 2 GPUs
    alone = shared.replace(gpus_per_nic=1)
    for one_sided in (True, False):
        assert _layer("ring", shared, one_sided=one_sided) == pytest.approx(
            _layer("ring", alone, one_sided=one_sided), rel=1e-12
        )
        assert _layer("usp", shared, one_sided=one_sided) > _layer(
            "usp", alone, one_sided=one_sided
        )


def test_fewer_sharers_keep_the_per_call_cost() -> None:
    """Catches the protocol's per-call cost shrinking when fewer GPUs share the NIC (it is a
    time, h / (peak_all e_max)), and more sharers than the NIC has counting at all."""
    topo = Topology.preset("p4de", machines=2)
    curve = topo.links.curve("inter", one_sided=False)
    call_s = curve.half() / (topo.peak("inter") * curve.e_max)
    for nbytes in (1e3, 1e6, 1e9):
        one = nbytes / topo.bandwidth("inter", nbytes, one_sided=False, nic_sharers=1)
        assert one == pytest.approx(nbytes / (topo.inter_bw * curve.e_max) + call_s)
        assert topo.bandwidth("inter", nbytes, one_sided=False, nic_sharers=9) == topo.bandwidth(
            "inter", nbytes, one_sided=False
        )


def test_auto_weighs_both_text_layouts() -> None:
    """Catches text="auto" not reaching the planner (Note [Text layout choice]): for a
    joint-text model auto_by_text must hold the planner's step under each layout, auto the
    shorter (or the baseline's configuration where that is shorter still) and its layout,
    while the strategy rows keep the layout the models run (sharded); cross-attention text
    (Wan) has only one layout to weigh."""
    topo = Topology.preset("p4de", machines=2)
    strategies = ["usp", "auto"]
    both = simulate_step("flux", topo, height=512, width=512, text="auto", strategy=strategies)
    alone = {
        t: simulate_step("flux", topo, height=512, width=512, text=t, strategy=strategies)
        for t in ("sharded", "replicated")
    }
    assert set(both.auto_by_text) == {"sharded", "replicated"}
    auto = both.strategies["auto"]
    assert auto is not None
    best = min(both.auto_by_text, key=lambda t: both.auto_by_text[t])
    assert auto.latency_s <= both.auto_by_text[best]
    if auto.latency_s == both.auto_by_text[best]:
        assert auto.text == best
    for t, res in alone.items():  # alone, auto may also fall back to the baseline's config
        pick = res.strategies["auto"]
        assert pick is not None and pick.latency_s <= both.auto_by_text[t] * (1 + 1e-12)
    assert auto.latency_s >= min(r.strategies["auto"].latency_s for r in alone.values()) * (
        1 - 1e-12
    )
    assert both.text == "sharded" and both.strategies["usp"].text == "sharded"
    wan = simulate_step(
        "wan", topo, height=480, width=832, frames=17, text="auto", strategy=strategies
    )
    assert wan.auto_by_text == {} and wan.text == "replicated"
    with pytest.raises(ValueError, match="text must be one of"):
        simulate_step("flux", topo, height=512, width=512, text="both")  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["p4de", "h100-ib"])
def test_parallelize_default_text_is_the_planners_choice(preset: str) -> None:
    """Catches sf_models.parallelize's text="auto" (sharded for joint text) drifting from
    what the planner picks when it weighs both layouts: on these points replicated text
    repeats the text stream on every rank and its attention gathers every rank's text
    partials, so sharded must win (docs/simulator.md, "Text layout choice")."""
    for machines, (model, size) in itertools.product(
        (1, 2), (("flux", (256, 256, 1)), ("flux", (2048, 2048, 1)), ("sd3", (1024, 1024, 1)))
    ):
        h, w, f = size
        topo = Topology.preset(preset, machines)
        res = simulate_step(
            model, topo, height=h, width=w, frames=f, text="auto", strategy=["auto"]
        )
        assert set(res.auto_by_text) == {"sharded", "replicated"}
        assert res.strategies["auto"].text == "sharded", (model, machines, res.auto_by_text)


def test_kernel_rates_follow_the_head_dim() -> None:
    """Catches the attention rate ignoring the head_dim or the kernel (Note [Kernel rates]):
    cuDNN at head_dim 128 is the preset's rate, 64 runs at 413/595 of it and 96 between,
    FlashAttention-2 is slower at every head_dim, "measured" is the rate as given, and a
    head_dim-64 layer takes longer than the same FLOPs would at the preset's rate."""
    from sf_attn.sim.layer import CostModel, kernel_rate

    topo = Topology.preset("h100-ib", machines=1)
    assert kernel_rate(topo, 128) == pytest.approx(topo.device_flops)
    assert kernel_rate(topo, 64) == pytest.approx(topo.device_flops * 413 / 595)
    assert kernel_rate(topo, 64) < kernel_rate(topo, 96) < kernel_rate(topo, 128)
    for head_dim in (32, 64, 128, 256, 512):
        assert kernel_rate(topo, head_dim, "fa2") < kernel_rate(topo, head_dim)
        assert kernel_rate(topo, head_dim, "measured") == topo.device_flops
    kw = dict(seq_len=16384, heads=16, head_dim=64)
    cudnn = simulate("ulysses", topo, **kw).breakdown["compute"]
    flat = simulate("ulysses", topo, cost=CostModel(kernel="measured"), **kw).breakdown["compute"]
    assert cudnn > flat
    with pytest.raises(ValueError, match="kernel"):
        CostModel(kernel="fa4")


def test_per_call_cost_grows_with_remote_peers() -> None:
    """Catches the per-peer call cost (Note [Per-peer call cost]) not reaching the simulator:
    an all-to-all with 24 remote peers must pay 0.235 ms + 24 x 4.6 us per call on p5, a
    shift with one remote peer 0.235 ms + 4.6 us; and the fit's published figures: the
    model stays within 12 % of nccl-tests' 2-8 machine all-to-all times it was fitted to."""
    topo = Topology.preset("p5", machines=4)
    curve = topo.links.curve("inter", one_sided=False)
    peak = topo.peak("inter") * curve.e_max
    assert curve.half(24) / peak == pytest.approx(0.235e-3 + 24 * 4.6e-6)
    assert curve.half(1) / peak == pytest.approx(0.235e-3 + 4.6e-6)
    # (machines, MB per rank, published algbw GB/s) from nccl_alltoall.csv, fitted rows
    for machines, mb, algbw in ((2, 32, 47.78), (4, 256, 56.03), (8, 2048, 50.41)):
        size = mb * 1e6
        inter = size * (machines - 1) / machines
        peers = 8 * (machines - 1)
        predicted = inter / topo.bandwidth("inter", inter, one_sided=False, peers=peers)
        assert predicted == pytest.approx(size / (algbw * 1e9), rel=0.12), (machines, mb)


def test_closed_pipe_ends_quietly() -> None:
    """Catches a traceback when the reader of the output goes away (``| head``): the command
    stops with no message and the shell's status for a closed pipe."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "sf_models.simulate_cmd", "--calibration"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_comm_interference_slows_transfers_that_overlap_compute() -> None:
    """Catches the other direction of Note [Interference] charging transfers that overlap no
    compute, one-sided puts, or more than g/(1-g) of the compute they overlap; and the
    transfers queued behind a slowed one keeping their old start (the link would then carry
    two transfers at once)."""
    from sf_attn.sim.layer import CostModel

    topo = Topology.preset("p4de", machines=2)
    kw = dict(seq_len=32768, heads=24, head_dim=128)
    g = 0.25

    def run(one_sided: bool, fraction: float) -> object:
        return simulate(
            "torus", topo, one_sided=one_sided, cost=CostModel(comm_interference=fraction), **kw
        )

    plain, slowed = run(False, 0.0), run(False, g)
    assert slowed.latency_s > plain.latency_s
    assert slowed.latency_s <= plain.latency_s + plain.breakdown["compute"] * g / (1 - g) + 1e-12
    assert run(True, g).latency_s == run(True, 0.0).latency_s
    for track in ("intra", "inter"):  # no two transfers on one link at once
        spans = sorted((e.start, e.end) for e in slowed.events if e.track == track)
        assert all(b[0] >= a[1] - 1e-12 for a, b in itertools.pairwise(spans)), track
    with pytest.raises(ValueError, match="comm_interference"):
        CostModel(comm_interference=1.0)
