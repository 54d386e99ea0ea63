"""The simulator's prediction for `streamfusion bench attention --emulate`, beside what the
bench measured: one attention layer per strategy, costed by ``sf_attn.simulate`` on a
topology whose rates are this host's, measured separately (nothing fitted to the bench):

- compute: a rank's float32 attention rate (``sf_attn.attention_with_lse`` of a 2x2 rank's
  share, 1024 x 4096 keys x 8 x 64, while all 4 ranks compute on the 2 cores: 39 GFLOP/s,
  from ``--measure-interference``), scaled by 4 / ranks, at the layer's own head_dim (no
  GPU kernel curve: ``CostModel(kernel="measured")``);
- inside a machine: the transport's own all-to-all rate of `streamfusion bench comm` at
  16 MB on 4 ranks (shm 1.55 GB/s, gloo over loopback 0.50 GB/s; 0.5 / 1 ms per message),
  scaled the same way (shm+gloo rows use shm's, gloo rows gloo's);
- between machines: the emulated NIC (`--emulate M x G : GBPS`), shared by the machine's
  ranks that cross in a call (Note [NIC sharers] in sf_comm.collectives): by default 96 % of
  it as payload (a single 8 MB flow measured 0.385 Gbit/s at 0.4) and 0.5 ms per message;
  with ``--measure-links``, the send/recv and all-to-all curves measured on the same
  emulation as each bench output (:func:`measure_links`). gloo is two-sided, so shm+gloo
  and gloo rows are costed two-sided (the shm half's handshake is small beside the TCP one).

    python tools/emulated_prediction.py [--interference F] [--comm-interference G]
        [--measure-links [--link-runs N]] BENCH_OUTPUT ...
    python tools/emulated_prediction.py --measure-interference
    python tools/emulated_prediction.py --measure-comm-interference BENCH_OUTPUT ...

``--measure-interference`` measures the compute slowdown while two-sided bytes move
(``CostModel.interference``, Note [Interference] in sf_attn.sim.layer) on a 2x2 emulation at
0.43 Gbit/s: each rank's attention share timed alone, then while a gloo all-to-all of 4 MB
per peer (longer than the attention) is in flight; f = 1 - alone / during. ``--interference
F`` costs the layers with it (default 0: no interference). ``--measure-comm-interference``
measures the other direction (``CostModel.comm_interference``: a 4 MB inter-machine shift
alone and while every rank computes, alternating pairs) and costs the layers with it;
``--comm-interference G`` gives it.

Each BENCH_OUTPUT is what `streamfusion bench attention --emulate ... --json` printed (its
header line names the topology and the link rate).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import sf_attn
import sf_comm
from sf_attn.sim.layer import CostModel
from sf_comm import Topology
from sf_comm.topology import LinkCurve, LinkModel

RANK_FLOPS_4 = 39e9  # attention_with_lse per rank, 4 ranks busy on 2 cores (measured)
# all_to_all at 16 MB, streamfusion bench comm --world 4: bytes/s and per-message seconds
INTRA = {"shm+gloo": (1.55e9, 0.5e-3), "gloo": (0.50e9, 1e-3)}
TCP_LATENCY_S = 0.5e-3
PAYLOAD = 0.96  # of the emulated link rate


def predict(
    header: str,
    transport: str,
    interference: float = 0.0,
    links: dict[str, tuple[float, float]] | None = None,
    comm_interference: float = 0.0,
) -> dict[str, float]:
    shape = tuple(int(v) for v in re.search(r"attention \(([\d, ]+)\)", header)[1].split(","))
    machines, gpus = (int(v) for v in re.search(r"topology (\d+)x(\d+)", header).groups())
    gbps = float(re.search(r"each NIC ([\d.]+) Gbit/s", header)[1])
    ranks = machines * gpus
    share = min(1.0, 4 / ranks)
    intra_bw, intra_latency = INTRA[transport]
    topo = Topology(
        machines=machines,
        gpus_per_machine=gpus,
        intra_bw=intra_bw * 4 / ranks,
        intra_latency=intra_latency,
        inter_bw=gbps * 1e9 / 8 * (1.0 if links else PAYLOAD),
        inter_latency=0.0 if links else TCP_LATENCY_S,
        links=_link_model(links, gbps * 1e9 / 8 / gpus),
        gpus_per_nic=gpus,
        device_flops=RANK_FLOPS_4 * share,
        device_sms=1,
        name="cpu-emulated",
    )
    # the rate was measured at this head_dim: no H100 kernel curve (Note [Kernel rates])
    cost = CostModel(
        mem_bw=2e9 * share,
        q_tile=0,
        interference=interference,
        comm_interference=comm_interference,
        kernel="measured",
    )
    batch, seq, heads, dim = shape
    out = {}
    for strategy in ("usp", "tas", "torus", "ulysses", "ring"):
        res = sf_attn.simulate(
            strategy,
            topo,
            seq_len=seq,
            heads=heads,
            head_dim=dim,
            dtype=torch.float32,
            batch=batch,
            one_sided=False,
            cost=cost,
        )
        out[strategy] = res.latency_s
    return out


def _link_model(links: dict[str, tuple[float, float]] | None, peak: float) -> LinkModel:
    """The emulated NIC's measured curves ((e_max, seconds per call) per pattern; ``peak``:
    a rank's share of the NIC), or line rate."""
    if not links:
        return LinkModel()
    curves = {
        pattern: LinkCurve(e_max=e_max, m_half=t_call * peak * e_max)
        for pattern, (e_max, t_call) in links.items()
    }
    return LinkModel(inter_all_to_all=curves["all_to_all"], inter_send_recv=curves["send_recv"])


def _attention_chunk() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 8, 64, generator=g)  # ~15 ms per call with 4 ranks on 2 cores
    k, v = (torch.randn(1, 4096, 8, 64, generator=g) for _ in range(2))
    return q, k, v


def _link_times(
    ctx: sf_comm.Context, sizes: tuple[int, ...], iters: int, load: bool
) -> dict[str, list[float]]:
    """Seconds per call of an inter-machine send/recv (every rank to its peer on the other
    machine, at once), of a world all-to-all and of a shift along the world (a flat ring:
    one rank per machine crosses each way), for each per-peer size in bytes. With
    ``load``, every rank computes attention while its transfer is in flight (the CPU the
    transfer needs is then shared with compute, as in the strategies) and the call's time
    is when its handle first reports completion (checked every ~15 ms of compute)."""
    chunk = _attention_chunk()
    out: dict[str, list[float]] = {"send_recv": [], "all_to_all": [], "flat_ring": []}
    inter, world = ctx.group("inter"), ctx.group("world")
    for size in sizes:
        x = torch.ones(size // 4)
        issue: dict[str, Callable[[], Any]] = {
            "send_recv": lambda: sf_comm.shift(ctx, inter, x, 1),
            # one rank per machine sends out, one receives
            "flat_ring": lambda: sf_comm.shift(ctx, world, x, 1),
            "all_to_all": lambda: sf_comm.all_to_all(ctx, world, [x] * ctx.world_size),
        }
        for pattern in out:
            times = [_timed_transfer(ctx, issue[pattern], chunk, load) for _ in range(iters)]
            out[pattern].append(statistics.median(times))
    return out


def _timed_transfer(
    ctx: sf_comm.Context, issue: Callable[[], Any], chunk: tuple[torch.Tensor, ...], load: bool
) -> float:
    """Seconds from issuing a transfer (after a barrier) to its completion; with ``load``
    the rank computes attention chunks meanwhile and completion is checked between them."""
    from sf_attn import attention_with_lse

    ctx.barrier()
    start = time.perf_counter()
    handle = issue()
    while load and not handle.is_completed():
        attention_with_lse(*chunk)
    handle.wait()
    return time.perf_counter() - start


# bytes per peer: the sizes of these layers' transfers (0.5-4 MB per peer at 2x2 and 4x2)
LINK_SIZES = (256 * 1024, 1 << 20, 4 << 20)


def measure_links(
    spec: str = "2x2", gbps: float = 0.43, load: bool = False
) -> dict[str, tuple[float, float]]:
    """(e_max, seconds per call) of the emulated NIC per pattern on the emulation ``spec``
    at ``gbps``, gloo, from the median time of 5 calls at each size of :data:`LINK_SIZES`:
    least squares of ``t = m / (peak * e_max) + t_call`` over the sizes (``m``: a rank's
    bytes to other machines, ``peak``: its share of the NIC, which every rank of the machine
    uses at once in both patterns). ``load``: while every rank computes (:func:`_link_times`)."""
    from sf_comm.launch import RankPool

    machines, gpus = (int(v) for v in spec.split("x"))
    ranks = machines * gpus
    with sf_comm.Emulation(spec, inter_gbps=gbps) as emu, RankPool(ranks, emulation=emu) as pool:
        out = pool.run(
            _link_times, LINK_SIZES, 5, load, topology=spec, transport="gloo", timeout=1200
        )
    peak = gbps * 1e9 / 8 / gpus
    curves = {}
    for pattern in ("send_recv", "all_to_all", "flat_ring"):
        per_peer = ranks - gpus if pattern == "all_to_all" else 1  # peers on other machines
        xs = [size * per_peer for size in LINK_SIZES]
        ts = [max(r[pattern][i] for r in out) for i in range(len(LINK_SIZES))]
        # a flat ring's crossing rank has the NIC to itself; the others share it
        share = gpus if pattern == "flat_ring" else 1
        mx, mt = statistics.fmean(xs), statistics.fmean(ts)
        slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
        e_max = min(1.0, 1 / (peak * share * slope))
        t_call = max(0.0, mt - slope * mx)
        curves[pattern] = (e_max, t_call)
        sizes = ", ".join(f"{x / 1e6:.2f} MB {t * 1e3:.0f} ms" for x, t in zip(xs, ts))
        print(
            f"{spec} at {gbps} Gbit/s, {pattern}{' (under load)' if load else ''}: {sizes} "
            f"-> e_max {e_max:.2f}, per call {t_call * 1e3:.1f} ms"
        )
    del curves["flat_ring"]  # reported only: the link model has one send/recv curve
    return curves


def _interference(ctx: sf_comm.Context, iters: int) -> tuple[float, float]:
    from sf_attn import attention_with_lse

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1024, 8, 64, generator=g)
    k, v = (torch.randn(1, 4096, 8, 64, generator=g) for _ in range(2))
    group = ctx.group("world")
    alone, during = [], []
    for _ in range(iters):
        ctx.barrier()
        start = time.perf_counter()
        attention_with_lse(q, k, v)
        alone.append(time.perf_counter() - start)
        chunks = [torch.ones(2**20) for _ in range(ctx.world_size)]  # 4 MB per peer
        ctx.barrier()
        moving = sf_comm.all_to_all(ctx, group, chunks)
        start = time.perf_counter()
        attention_with_lse(q, k, v)
        during.append(time.perf_counter() - start)
        moving.wait()
    return statistics.median(alone), statistics.median(during)


def measure_interference(iters: int = 5) -> float:
    from sf_comm.launch import RankPool

    with sf_comm.Emulation("2x2", inter_gbps=0.43) as emu, RankPool(4, emulation=emu) as pool:
        out = pool.run(_interference, iters, topology="2x2", transport="gloo", timeout=600)
    for rank, (alone, during) in enumerate(out):
        print(
            f"rank {rank}: attention alone {alone * 1e3:.1f} ms, during a gloo all-to-all "
            f"{during * 1e3:.1f} ms"
        )
    alone = statistics.median(a for a, _ in out)
    during = statistics.median(d for _, d in out)
    flops = 4 * 1024 * 4096 * 8 * 64
    print(f"attention rate per rank (4 ranks busy): {flops / alone / 1e9:.1f} GFLOP/s")
    return 1 - alone / during


def _comm_slowdown(ctx: sf_comm.Context, pairs: int) -> list[tuple[float, float]]:
    """(alone, while every rank computes) seconds of a 4 MB shift to the peer on the other
    machine, ``pairs`` times alternating, so that both see the same state of the link."""
    chunk = _attention_chunk()
    inter = ctx.group("inter")
    x = torch.ones(1 << 20)

    def shift() -> Any:
        return sf_comm.shift(ctx, inter, x, 1)

    return [
        (_timed_transfer(ctx, shift, chunk, False), _timed_transfer(ctx, shift, chunk, True))
        for _ in range(pairs)
    ]


def measure_comm_interference(pairs: int = 9) -> float:
    """``CostModel.comm_interference`` on a 2x2 emulation at 0.43 Gbit/s, gloo: g = 1 -
    alone / while computing, from the medians (over pairs) of the slowest rank's times."""
    from sf_comm.launch import RankPool

    with sf_comm.Emulation("2x2", inter_gbps=0.43) as emu, RankPool(4, emulation=emu) as pool:
        out = pool.run(_comm_slowdown, pairs, topology="2x2", transport="gloo", timeout=900)
    alone = statistics.median(max(r[i][0] for r in out) for i in range(pairs))
    during = statistics.median(max(r[i][1] for r in out) for i in range(pairs))
    print(
        f"4 MB inter-machine shift: alone {alone * 1e3:.0f} ms, while every rank computes "
        f"{during * 1e3:.0f} ms (median of {pairs} alternating pairs, slowest rank)"
    )
    return max(0.0, 1 - alone / during)


def main(
    paths: list[str],
    interference: float,
    measure: bool = False,
    load: bool = False,
    link_runs: int = 1,
    comm_interference: float = 0.0,
) -> None:
    """Print measured vs predicted per strategy for each bench output; ``measure``: cost the
    inter-machine transfers with curves measured on the same emulation (:func:`measure_links`,
    ``link_runs`` times: each pattern's median e_max and per-call seconds)."""
    for path in paths:
        with open(path) as f:
            text = f.read()
        header = text.splitlines()[0]
        rows = json.loads(text[text.index("\n[") + 1 :])
        links = None
        if measure:
            spec = "x".join(re.search(r"topology (\d+)x(\d+)", header).groups())
            gbps = float(re.search(r"each NIC ([\d.]+) Gbit/s", header)[1])
            runs = [measure_links(spec, gbps, load) for _ in range(link_runs)]
            links = {
                pattern: (
                    statistics.median(r[pattern][0] for r in runs),
                    statistics.median(r[pattern][1] for r in runs),
                )
                for pattern in runs[0]
            }
            if link_runs > 1:
                print(
                    "median of the runs: "
                    + ", ".join(
                        f"{p} e_max {e:.2f}, {t * 1e3:.1f} ms" for p, (e, t) in links.items()
                    )
                )
        predicted = {t: predict(header, t, interference, links, comm_interference) for t in INTRA}
        print(header)
        print(
            f"{'strategy':<9} {'transport':<9} {'measured ms':>12} {'predicted ms':>13} {'error':>7}"
        )
        for row in rows:
            if row["strategy"] == "sdpa":
                continue
            p, m = predicted[row["transport"]][row["strategy"]], row["median_s"]
            print(
                f"{row['strategy']:<9} {row['transport']:<9} {m * 1e3:12.1f} {p * 1e3:13.1f} "
                f"{(p - m) / m * 100:+6.0f}%"
            )
        print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="*")
    parser.add_argument("--interference", type=float, default=0.0)
    parser.add_argument("--measure-interference", action="store_true")
    parser.add_argument(
        "--comm-interference",
        type=float,
        default=0.0,
        help="transfer speed lost while the ranks compute (CostModel.comm_interference)",
    )
    parser.add_argument("--measure-comm-interference", action="store_true")
    parser.add_argument(
        "--measure-links",
        action="store_true",
        help="cost the inter-machine transfers with the emulated NIC's measured curves",
    )
    parser.add_argument(
        "--link-runs",
        type=int,
        default=1,
        help="with --measure-links: measure N times and use each pattern's median",
    )
    parser.add_argument(
        "--under-load",
        action="store_true",
        help="with --measure-links: measure the curves while every rank computes",
    )
    args = parser.parse_args()
    if args.measure_interference:
        print(f"interference: {measure_interference():.2f}")
    comm_interference = args.comm_interference
    if args.measure_comm_interference:
        comm_interference = measure_comm_interference()
        print(f"comm interference: {comm_interference:.2f}")
    main(
        args.outputs,
        args.interference,
        args.measure_links,
        args.under_load,
        args.link_runs,
        comm_interference,
    )
