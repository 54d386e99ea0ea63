"""GPU tier measurements and multi-rank checks, for the lent GPU machine (issue: GPU path).

    python tools/gpu_bench.py [--quick] [--out DIR]

Parts (each isolated: a failure prints its traceback and the next part runs):
  strategies-1   every strategy at world size 1 on CUDA (bf16, joint text) vs float64 attention
  strategies-N   2 and 4 processes on one GPU, torch-symm (and nvshmem when importable)
                 transport, every strategy vs float64 attention on the gathered inputs
  merge-bw       the merge kernel's achieved bandwidth vs the card's copy bandwidth
  blocking       one rank's share of a Flux 4096px attention layer (66048 tokens, 24 heads,
                 head_dim 128, bf16) run as P ring blocks + merges vs one SDPA call, P = 8, 16, 32
  p2p            one-sided shift (torch-symm) latency/bandwidth between 2 processes on the GPU
                 vs gloo (CUDA tensors staged through host memory, as gloo moves them)
Results are printed and written as JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
for sub in ("sf-comm", "sf-attn", "sf-models", "sf-compile"):
    sys.path.insert(0, os.path.join(HERE, "..", "packages", sub, "src"))

import torch
import torch.multiprocessing as mp

from sf_attn import strategy_names

STRATEGIES = tuple(strategy_names(auto=False))
RESULTS: dict[str, Any] = {}


def _cuda_time(fn: Any, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _joint_inputs(batch: int, seq: int, text: int, heads: int) -> tuple[Any, Any, Any]:
    """(q, k, v), the joint text (q, k, v), both bf16 on CUDA with head_dim 64 from seed 0,
    and float64 attention over text + image (the reference)."""
    import sf_attn

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = tuple(
        torch.randn(batch, seq, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    txt = tuple(
        torch.randn(batch, text, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    ref, _ = sf_attn.reference_attention(*(torch.cat([a, b], 1) for a, b in zip(txt, qkv)))
    return qkv, txt, ref


def _accuracy(out: Any, txt_out: Any, ref_out: Any, ref_txt: Any) -> dict[str, Any]:
    err = max(
        (out.double() - ref_out).abs().max().item(),
        (txt_out.double() - ref_txt).abs().max().item(),
    )
    return {"max_abs_err": err, "ok": err < 2e-2}


def part_strategies_1() -> dict[str, Any]:
    import sf_attn
    import sf_comm

    ctx = sf_comm.init(topology="1x1", transport="gloo", device="cuda")
    (q, k, v), txt, ref = _joint_inputs(2, 1000, 77, 8)
    out: dict[str, Any] = {}
    for s in STRATEGIES:
        o, t = sf_attn.parallel_attention(q, k, v, ctx=ctx, strategy=s, joint=txt)
        out[s] = _accuracy(o, t, ref[:, 77:], ref[:, :77])
    out["backend"] = sf_attn.available_backends(q, k, v)
    return out


def _rank_main(
    rank: int, world: int, body: Any, args: tuple[Any, ...], store: str, q_ret: Any
) -> None:
    """A spawned rank on cuda:0: joins a gloo group of ``world`` over ``store``, puts
    ``(rank, body(rank, *args))`` (or the error) on ``q_ret`` and exits."""
    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    try:
        import torch.distributed as dist

        torch.cuda.set_device(0)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store, world),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        q_ret.put((rank, body(rank, *args)))
    except Exception as exc:
        q_ret.put(
            (rank, {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-1500:]})
        )
    finally:
        sys.stdout.flush()
        q_ret.close()
        q_ret.join_thread()  # the queue's feeder thread must flush before os._exit
        os._exit(0)


def _rank_strategies(rank: int, transport: str, topo: str) -> dict[str, Any]:
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    import sf_attn
    import sf_comm

    print(f"rank {rank}: init {transport} {topo}", file=sys.stderr, flush=True)
    ctx = sf_comm.init(topology=topo, transport=transport, device="cuda", timeout=20)
    print(f"rank {rank}: ctx ready", file=sys.stderr, flush=True)
    (q, k, v), txt, ref = _joint_inputs(1, 203, 9, 4)
    res = {}
    for s in STRATEGIES:
        try:
            print(f"rank {rank}: {s}", file=sys.stderr, flush=True)
            shards = [sf_attn.shard(t, ctx) for t in (q, k, v)]
            o, t = sf_attn.parallel_attention(*shards, ctx=ctx, strategy=s, joint=txt, seq_len=203)
            torch.cuda.synchronize()
            res[s] = _accuracy(o, t, sf_attn.shard(ref[:, 9:], ctx), ref[:, :9])
        except Exception as exc:
            res[s] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            break
    return res


def _run_ranks(body: Any, world: int, args: tuple[Any, ...], seconds: float) -> dict[int, Any]:
    """Spawn ``world`` ranks running ``body(rank, *args)`` (see :func:`_rank_main`); their
    results by rank (those that reported within ``seconds``); stragglers are killed."""
    ctx = mp.get_context("spawn")
    store = os.path.join(tempfile.mkdtemp(), "s")
    q_ret = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, body, args, store, q_ret))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.time() + seconds
    while len(got) < world and time.time() < deadline:
        try:
            r, res = q_ret.get(timeout=max(0.1, deadline - time.time()))
            got[r] = res
        except Exception:
            break
    for p in procs:
        p.join(2)
        if p.is_alive():
            p.kill()
    return got


def part_strategies_n() -> dict[str, Any]:
    out: dict[str, Any] = {}
    transports = os.environ.get("SF_BENCH_TRANSPORTS", "torch-symm,nvshmem").split(",")
    seconds = float(os.environ.get("SF_BENCH_WORLD_S", 60))
    for transport in transports:
        for world, topo in ((2, "1x2"), (4, "2x2")):
            got = _run_ranks(_rank_strategies, world, (transport, topo), seconds)
            out[f"{transport}/{topo}"] = (
                got.get(0, "no result") if len(got) == world else {"partial": got}
            )
    return out


def part_merge_bw() -> dict[str, Any]:
    from sf_attn.merge import merge_attention_

    b, s, h, d = 1, 16384, 24, 128
    acc = torch.zeros(b, s, h, d, device="cuda", dtype=torch.float32)
    acc_lse = torch.zeros(b, h, s, device="cuda")
    o = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(b, h, s, device="cuda")
    t_tri = _cuda_time(lambda: merge_attention_(acc, acc_lse, o, lse, impl="triton"))
    t_torch = _cuda_time(lambda: merge_attention_(acc, acc_lse, o, lse, impl="torch"))
    moved = 2 * acc.numel() * 4 + o.numel() * 2 + 3 * lse.numel() * 4  # acc r/w, o read, lse r/r/w
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = _cuda_time(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() / t_copy
    return {
        "bytes": moved,
        "triton_s": t_tri,
        "torch_s": t_torch,
        "triton_GBps": moved / t_tri / 1e9,
        "torch_GBps": moved / t_torch / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "triton_vs_copy": (moved / t_tri) / copy_bw,
    }


def part_blocking() -> dict[str, Any]:
    from sf_attn import attention_with_lse
    from sf_attn.merge import merge_attention_

    seq, h, d = 66048, 24, 128
    out: dict[str, Any] = {}
    for p in (8, 16, 32):
        ql = seq // p
        q = torch.randn(1, ql, h, d, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(2, 1, seq, h, d, device="cuda", dtype=torch.bfloat16)
        blocks = list(kv.split(ql, dim=2))

        def one() -> None:
            attention_with_lse(q, kv[0], kv[1])

        def blocked() -> None:
            acc = torch.zeros(1, ql, h, d, device="cuda")
            acc_lse = torch.full((1, h, ql), float("-inf"), device="cuda")
            for blk in blocks:
                merge_attention_(acc, acc_lse, *attention_with_lse(q, blk[0], blk[1]))

        t1, tb = _cuda_time(one, iters=5, warmup=2), _cuda_time(blocked, iters=5, warmup=2)
        flops = 4.0 * ql * seq * h * d
        out[str(p)] = {
            "single_s": t1,
            "blocked_s": tb,
            "efficiency": t1 / tb,
            "single_TFLOPs": flops / t1 / 1e12,
            "blocked_TFLOPs": flops / tb / 1e12,
        }
    return out


def _rank_p2p(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    from sf_comm import gpu
    from sf_comm.collectives import shift
    from sf_comm.transport import Group
    from sf_comm.twosided import TwoSidedTransport

    group = Group("world", (0, 1), rank, dist.group.WORLD)

    class Ctx:  # what shift() reads of a sf_comm.CommContext when no tracer is active
        transport: Any

    res = {}
    one: Any = Ctx()
    one.transport = gpu.create(
        "torch-symm", rank=rank, world_size=2, timeout=30, device="cuda:0", slot_bytes=64 << 20
    )
    two: Any = Ctx()
    two.transport = TwoSidedTransport(rank=rank, world_size=2, timeout=30, backend="gloo")
    for size in (4 << 10, 1 << 20, 16 << 20, 64 << 20):
        x = torch.randn(size // 4, device="cuda")

        def symm() -> None:
            shift(one, group, x).wait()
            torch.cuda.synchronize()

        def staged() -> None:
            y = shift(two, group, x.cpu()).wait()
            y.to("cuda")
            torch.cuda.synchronize()

        row = {}
        for name, fn in (("torch-symm", symm), ("gloo-staged", staged)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(15 if size <= (16 << 20) else 5):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            row[name] = statistics.median(ts)
        row["ratio"] = row["gloo-staged"] / row["torch-symm"]
        row["symm_GBps"] = size / row["torch-symm"] / 1e9
        res[str(size)] = row
    return res


def part_p2p() -> dict[str, Any]:
    got = _run_ranks(_rank_p2p, 2, (), float(os.environ.get("SF_BENCH_P2P_S", 90)))
    return got.get(0, {"error": "no result", "partial": got})


PARTS = {
    "strategies-1": part_strategies_1,
    "strategies-N": part_strategies_n,
    "merge-bw": part_merge_bw,
    "blocking": part_blocking,
    "p2p": part_p2p,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    RESULTS["env"] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    try:
        import triton

        RESULTS["env"]["triton"] = triton.__version__
    except Exception:
        pass
    for name in args.parts.split(","):
        t0 = time.time()
        try:
            RESULTS[name] = PARTS[name]()
        except Exception as exc:
            RESULTS[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-2000:],
            }
        print(
            f"== {name} ({time.time() - t0:.1f}s)\n{json.dumps(RESULTS[name], indent=1, default=str)}",
            flush=True,
        )
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
