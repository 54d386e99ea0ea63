"""Run by tests/emulate under ``streamfusion emulate``: plain torch.distributed, no
StreamFusion import, so it measures the emulated network and nothing of ours.

Times an 8 MB send/recv between two machines (rank 0 -> the first rank of machine 1),
between two ranks of one machine (rank 0 -> rank 1), and from both ranks of machine 0 to both
of machine 1 at once ("shared": they share the NIC), each the median of a few transfers after
a warm-up, and prints one line per receiver::

    RESULT {"pair": "inter", "gbps": 0.39, "pid": 1234, ...}

Every rank prints its pid (``PID <n>``), so the test can check no rank is left running.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.distributed as dist

NBYTES = 8 * 2**20
REPEATS = 3


def timed(pairs: list[tuple[int, int]], buf: torch.Tensor) -> float | None:
    """Median seconds of ``buf`` transfers src -> dst, all pairs at once (on each dst; None
    elsewhere)."""
    rank = dist.get_rank()
    times = []
    for i in range(REPEATS + 1):  # the first one warms the connections up
        dist.barrier()
        start = time.perf_counter()
        for src, dst in pairs:
            if rank == src:
                dist.send(buf, dst)
            elif rank == dst:
                dist.recv(buf, src)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) if rank in [dst for _, dst in pairs] else None


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    print(f"PID {os.getpid()}", flush=True)
    buf = torch.zeros(NBYTES, dtype=torch.uint8)
    runs = {
        "inter": [(0, local)],
        "intra": [(0, 1)],
        # both ranks of machine 0 to both of machine 1 at once: they share one NIC
        "shared": [(0, local), (1, local + 1)],
    }
    for pair, pairs in runs.items():
        seconds = timed(pairs, buf)
        if seconds is not None:
            result = {"pair": pair, "gbps": NBYTES * 8 / seconds / 1e9, "seconds": seconds}
            result["rank"] = rank
            result["machine"] = os.environ.get("SF_EMULATED_MACHINE")
            result["netns"] = os.stat("/proc/self/ns/net").st_ino
            print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
