"""Run by tests/emulate under an emulation: sf_comm's collectives on ``transport="auto"``
(shm+gloo across emulated machines), bit-exact, with messages from 4 KB to 12 MB.

Each round issues four collectives at once (an all-to-all over the world, shifts over the
world and over a machine, an all-gather across machines) and waits for them in reverse
order, so both halves of shm+gloo have messages in flight together and every rank must keep
both moving while it waits on one (Note [Waiting on two transports] in sf_comm.shm_gloo).
Every received tensor is compared bit for bit (torch.equal) with what its sender made from a
shared seed. Prints ``RESULT {...}`` per rank; exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys

import torch

import sf_comm

SIZES = [1_000, 300_000, 3_000_000]  # float32 elements: 4 KB, 1.2 MB (rendezvous), 12 MB


def data(src: int, dst: int, n: int, tag: int) -> torch.Tensor:
    """What ``src`` sends ``dst`` in message ``tag`` (anyone can rebuild it)."""
    g = torch.Generator().manual_seed(1_000_003 * tag + 1_009 * src + dst)
    return torch.randn(n, generator=g)


def main() -> int:
    torch.set_num_threads(1)
    ctx = sf_comm.init(transport="auto", timeout=60)
    me, world = ctx.rank, ctx.group("world")
    inter, intra = ctx.group("inter"), ctx.group("intra")
    bad = []
    for round_, n in enumerate(SIZES):
        tag = 10 * round_
        a2a = sf_comm.all_to_all(ctx, world, [data(me, r, n, tag) for r in world.ranks])
        nxt = world.peer(1)
        ring = sf_comm.shift(ctx, world, data(me, nxt, n, tag + 1), offset=1)
        gather = sf_comm.all_gather(ctx, inter, data(me, -1, n, tag + 2))
        mate = sf_comm.shift(ctx, intra, data(me, intra.peer(1), n, tag + 3), offset=1)
        checks = [
            ("intra shift", [mate.wait()], [data(intra.peer(-1), me, n, tag + 3)]),
            ("inter all_gather", gather.wait(), [data(r, -1, n, tag + 2) for r in inter.ranks]),
            ("world shift", [ring.wait()], [data(world.peer(-1), me, n, tag + 1)]),
            ("all_to_all", a2a.wait(), [data(r, me, n, tag) for r in world.ranks]),
        ]
        for name, got, want in checks:
            if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
                bad.append(f"{name} of {n * 4} bytes")
    transport = ctx.transport
    routes = getattr(transport, "routes", {})
    gpus = ctx.topology.gpus_per_machine
    wrong = [
        f"{route} to rank {peer}"
        for (route, peer), nbytes in routes.items()
        if nbytes and (route == "shm") != (peer // gpus == me // gpus)
    ]
    local = getattr(transport, "local", None)
    result = {
        "rank": me,
        "transport": transport.name,
        "bad": bad,
        "wrong_route": wrong,
        "shm_slot_bytes": None if local is None else local.slot_bytes,
        "shm_rendezvous": None if local is None else bool(local._cma_min),
    }
    print("RESULT " + json.dumps(result), flush=True)
    ctx.close()
    return 0 if not bad and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
