"""Run by tests/emulate under an emulation: every sf_attn strategy on ``transport="auto"``.

Each rank builds the full inputs from a shared seed, runs ``parallel_attention`` on its shard
for every strategy and compares its rows with float64 attention on the gathered inputs
(tolerance as tests/multiproc/test_parallel_attention.py: float32 within 2e-5). Then it
checks where the bytes went: ``auto`` must have picked shm+gloo (the ranks are on more than
one machine), and every byte to a rank of another machine must have gone through gloo, every
byte to a rank of this machine through shm. Prints ``RESULT {...}`` per rank; exits 1 on any
mismatch.

``prog_attention.py die R``: rank R exits (status 7) just before the second strategy; the
others must fail on their own, fast (each prints ``FAILED <seconds> <error>`` and exits 1)
instead of waiting for their timeout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import sf_attn
import sf_comm
from sf_attn.backends import reference_attention

STRATEGIES = ["ulysses", "ring", "usp", "tas", "torus", "auto"]
TOL = 2e-5  # float32 vs float64 over ~40 keys: ~1e-6; a missing block moves outputs ~1e-1


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    die = int(argv[1]) if argv[:1] == ["die"] else None
    print(f"PID {os.getpid()}", flush=True)
    ctx = sf_comm.init(transport="auto", timeout=60)
    transport = ctx.transport
    gpus = ctx.topology.gpus_per_machine
    errors: dict[str, float] = {}
    batch, seq, heads, dim, text = 1, 37, 4, 16, 5  # 37 rows do not divide over 4 ranks
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3))
    tq, tk, tv = (torch.randn(batch, text, heads, dim, generator=g) for _ in range(3))
    full = [torch.cat([t, i], dim=1) for t, i in zip((tq, tk, tv), (q, k, v))]
    ref, _ = reference_attention(*full)
    for i, strategy in enumerate(STRATEGIES):
        if die is not None and i == 1:
            if ctx.rank == die:
                os._exit(7)
            start = time.monotonic()
            try:
                sf_attn.parallel_attention(
                    *(sf_attn.shard(t, ctx) for t in (q, k, v)), ctx=ctx, strategy=strategy
                )
            except sf_comm.CommError as exc:
                print(f"FAILED {time.monotonic() - start:.1f} {exc}", flush=True)
                # no interpreter teardown: gloo aborts the process on works the dead peer
                # left pending, and its status would mask this one
                os._exit(1)
            return 0  # finished without the dead rank: the test fails on the status
        out, txt_out = sf_attn.parallel_attention(
            *(sf_attn.shard(t, ctx) for t in (q, k, v)),
            ctx=ctx,
            strategy=strategy,
            joint=(tq, tk, tv),
        )
        want = sf_attn.shard(ref[:, text:], ctx)
        torch.testing.assert_close(out.double(), want, atol=TOL, rtol=TOL)
        torch.testing.assert_close(txt_out.double(), ref[:, :text], atol=TOL, rtol=TOL)
        errors[strategy] = (out.double() - want).abs().max().item()
    routes = getattr(transport, "routes", {})
    wrong = [
        f"{route} to rank {peer}"
        for (route, peer), nbytes in routes.items()
        if nbytes and (route == "shm") != (peer // gpus == ctx.rank // gpus)
    ]
    by_route = {
        r: sum(n for (route, _), n in routes.items() if route == r) for r in ("shm", "gloo")
    }
    local = getattr(transport, "local", None)
    result = {
        "rank": ctx.rank,
        "transport": transport.name,
        "max_err": errors,
        "bytes": by_route,
        "wrong_route": wrong,
        "shm_world": None if local is None else local.world_size,
        "machines": getattr(transport, "machines", None),
        "pid": os.getpid(),
    }
    print("RESULT " + json.dumps(result), flush=True)
    ctx.close()
    ok = transport.name == "shm+gloo" and not wrong and by_route["gloo"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
