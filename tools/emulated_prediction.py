"""The simulator's prediction for `streamfusion bench attention --emulate`, beside what the
bench measured: one attention layer per strategy, costed by ``sf_attn.simulate`` on a
topology whose rates are this host's, measured separately (nothing fitted to the bench):

- compute: one core's float32 SDPA rate (110 GFLOP/s at 4096 x 8 x 64, one thread), shared by
  the ranks on the host's cores (4 ranks on 2 cores: half each);
- inside a machine: the transport's own all-to-all rate of `streamfusion bench comm` at
  16 MB on 4 ranks (shm 1.55 GB/s, gloo over loopback 0.50 GB/s; 0.5 / 1 ms per message),
  scaled the same way (shm+gloo rows use shm's, gloo rows gloo's);
- between machines: the emulated NIC (`--emulate M x G : GBPS`), 96 % of it as payload
  (measured: 0.385 Gbit/s at 0.4), shared by the machine's G ranks; 0.5 ms per message
  (gloo over TCP on this host); gloo is two-sided, so shm+gloo and gloo rows are costed
  two-sided (the shm half's handshake is small beside the TCP one).

    python tools/emulated_prediction.py BENCH_OUTPUT [BENCH_OUTPUT ...]

Each BENCH_OUTPUT is what `streamfusion bench attention --emulate ... --json` printed (its
header line names the topology and the link rate).
"""

from __future__ import annotations

import json
import re
import sys

import torch

import sf_attn
from sf_attn.sim.layer import CostModel
from sf_comm import Topology

CORES = 2
CORE_FLOPS = 110e9  # float32 SDPA, one thread (measured, 4096 x 8 x 64)
# all_to_all at 16 MB, streamfusion bench comm --world 4: bytes/s and per-message seconds
INTRA = {"shm+gloo": (1.55e9, 0.5e-3), "gloo": (0.50e9, 1e-3)}
TCP_LATENCY_S = 0.5e-3
PAYLOAD = 0.96  # of the emulated link rate


def predict(header: str, transport: str) -> dict[str, float]:
    shape = tuple(int(v) for v in re.search(r"attention \(([\d, ]+)\)", header)[1].split(","))
    machines, gpus = (int(v) for v in re.search(r"topology (\d+)x(\d+)", header).groups())
    gbps = float(re.search(r"each NIC ([\d.]+) Gbit/s", header)[1])
    ranks = machines * gpus
    share = min(1.0, CORES / ranks)
    intra_bw, intra_latency = INTRA[transport]
    topo = Topology(
        machines=machines,
        gpus_per_machine=gpus,
        intra_bw=intra_bw * 4 / ranks,
        intra_latency=intra_latency,
        inter_bw=gbps * 1e9 / 8 * PAYLOAD,
        inter_latency=TCP_LATENCY_S,
        gpus_per_nic=gpus,
        device_flops=CORE_FLOPS * share,
        device_sms=1,
        name="cpu-emulated",
    )
    cost = CostModel(mem_bw=4e9 * share, q_tile=0)
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


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            text = f.read()
        header = text.splitlines()[0]
        rows = json.loads(text[text.index("\n[") + 1 :])
        predicted = {t: predict(header, t) for t in INTRA}
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
    main(sys.argv[1:])
