"""Run by tests/emulate under an emulation: one rank behaviour per mode, no StreamFusion.

    prog_ranks.py sleep              every rank prints its pid, then sleeps (to be stopped)
    prog_ranks.py fail RANK CODE     RANK exits with CODE after a moment; the others sleep
    prog_ranks.py kill RANK          RANK SIGKILLs itself after a moment; the others sleep
    prog_ranks.py allreduce          gloo all_reduce over the emulated network, checked

Every rank first prints ``PID <pid> NETNS <inode of its network namespace>``.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    netns = os.stat("/proc/self/ns/net").st_ino
    print(f"PID {os.getpid()} NETNS {netns}", flush=True)
    mode = argv[0]
    if mode == "allreduce":
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        world = dist.get_world_size()
        assert x.item() == world * (world + 1) / 2, x
        print(f"SUM {x.item():g}", flush=True)
        dist.destroy_process_group()
        return 0
    if mode in ("fail", "kill") and rank == int(argv[1]):
        time.sleep(1.0)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"rank {rank} fails with status {argv[2]}", file=sys.stderr, flush=True)
        return int(argv[2])
    time.sleep(300)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
