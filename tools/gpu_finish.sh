#!/usr/bin/env bash
# The GPU steps results/GPU-2026-11-27.md left open, in one call on the lent GPU machine:
#
#   1. nvshmem with 2 and 4 PEs on the one GPU under CUDA MPS (without MPS NVSHMEM runs in
#      its limited multi-process-per-GPU mode, which refused the stream-ordered signal waits);
#   2. backend="streamfusion" vs backend="inductor" at world size 1 on FLUX.1-sized blocks,
#      bf16, 1024 px and 2048 px (python -m sf_compile.compile_bench world1);
#   3. the GPU test tier (tests/unit, tests/gpu: -m gpu), but for nvshmem, which step 1 runs
#      under MPS (the tests cannot start MPS themselves).
#
# Device tool call (the wheels are not in git; the download commands are below):
#   run(command="bash tools/gpu_finish.sh", carry=[".whl"], timeout_s=580)
# Wheels for Python 3.12 (pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl):
#   nvshmem4py-cu13==0.4.1 cuda-core==1.2.2 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1
#   cuda-python==13.4.4 diffusers==0.42.1 importlib_metadata
# Logs go to $OUT (the device tool's output folder), else out/gpu-finish. Each step has its
# own time limit, so a hang in one still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-finish}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

source tools/gpu_install.sh
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 - <<'EOF'
import importlib.metadata as m, platform, torch

def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"

names = ("torch", "triton", "diffusers", "nvshmem4py-cu13", "nvidia-nvshmem-cu13", "cuda-core")
print("python", platform.python_version(), "CUDA", torch.version.cuda)
print(", ".join(f"{n} {version(n)}" for n in names))
EOF
} 2>&1 | tee "$OUT/versions.txt"

step "1. nvshmem under CUDA MPS"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/sf-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/sf-mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
stop_mps() { echo quit | nvidia-cuda-mps-control 2>/dev/null; }
trap stop_mps EXIT
if nvidia-cuda-mps-control -d 2>&1 | tee -a "$OUT/steps.log"; then
    for n in 2 4; do
        # NVSHMEM's full multi-process-per-GPU support needs the PEs' active thread
        # percentages to add up to at most 100, so that every PE's kernels fit at once.
        timeout 75 python3 tools/gpu_smoke.py --transports nvshmem --worlds "$n" \
            --budget 60 --world-budget 55 \
            --env "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / n))" 2>&1 | tee "$OUT/smoke-mps-$n.log"
        echo get_server_list | nvidia-cuda-mps-control 2>&1 | sed 's/^/MPS server: /' \
            | tee -a "$OUT/smoke-mps-$n.log"
    done
    stop_mps
    sleep 2
fi
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY

for px in 1024 2048; do
    step "2. streamfusion vs inductor, world 1, FLUX.1-sized blocks, ${px} px bf16"
    timeout 150 python3 -m sf_compile.compile_bench world1 --dims flux1 --layers 1x2 \
        --height "$px" --width "$px" --dtype bf16 --device cuda --repeats 50 \
        --json "$OUT/compile-world1-$px.json" 2>&1 | tee "$OUT/compile-world1-$px.log"
done

step "3. GPU test tier"
timeout 140 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not nvshmem" tests/unit tests/gpu 2>&1 \
    | tee "$OUT/pytest-gpu.log"
step done
