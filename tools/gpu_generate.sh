#!/usr/bin/env bash
# `streamfusion generate` on a GPU machine, in one call: the five tiny pipelines
# (`streamfusion make-tiny`) with --device cuda at world 1, then under torchrun with 2
# processes sharing the one GPU (CUDA MPS, NVSHMEM), each checked against single-process
# diffusers (--check: float32 within 1e-3, bf16 within 0.1 of [0, 1] pixels).
#
# Device tool call (wheels not in git; see tools/gpu_finish.sh for the nvshmem4py set, plus
# transformers, accelerate, tokenizers, imageio, imageio-ffmpeg for Python 3.12):
#   run(command="bash tools/gpu_generate.sh", carry=[".whl"], timeout_s=580)
# Logs and summaries go to $OUT (the device tool's output folder), else out/gpu-generate;
# results/ gets the table by hand from $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-generate}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SF_TIMEOUT=120
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

source tools/gpu_install.sh
SF="python3 -m sf_models.cli"

declare -A SIZE=(
    [flux]="--height 256 --width 256"
    [sd3]="--height 256 --width 256"
    [cogvideox]="--height 96 --width 128 --frames 17"
    [hunyuanvideo]="--height 96 --width 128 --frames 17"
    [wan]="--height 96 --width 128 --frames 17"
)
for family in flux sd3 cogvideox hunyuanvideo wan; do
    $SF make-tiny "/tmp/tiny-$family" --model "$family" > /dev/null || exit 1
done

for dtype in fp32 bf16; do
    for family in flux sd3 cogvideox hunyuanvideo wan; do
        step "world 1, cuda, $dtype, $family"
        timeout 120 $SF generate --model-dir "/tmp/tiny-$family" --prompt "a red fox in the snow" \
            ${SIZE[$family]} --steps 8 --seed 0 --device cuda --dtype "$dtype" \
            --out "$OUT/$family-w1-$dtype.npy" --json "$OUT/$family-w1-$dtype.json" --check \
            > "$OUT/$family-w1-$dtype.log" 2>&1
        echo "rc=$? $(tail -2 "$OUT/$family-w1-$dtype.log" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
    done
done

step "torchrun, 2 processes on the one GPU (CUDA MPS; NCCL refuses two ranks per GPU)"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50
for transport in nvshmem torch-symm; do
    for family in flux sd3 cogvideox hunyuanvideo wan; do
        step "torchrun 2 processes, $transport, bf16, $family"
        timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
            -m sf_models.generate --model-dir "/tmp/tiny-$family" --prompt "a red fox in the snow" \
            ${SIZE[$family]} --steps 8 --seed 0 --dtype bf16 --transport "$transport" \
            --out "$OUT/$family-tr2-$transport.npy" --json "$OUT/$family-tr2-$transport.json" \
            --check > "$OUT/$family-tr2-$transport.log" 2>&1
        echo "rc=$? $(tail -2 "$OUT/$family-tr2-$transport.log" | tr '\n' ' ')" \
            | tee -a "$OUT/summary.txt"
    done
done
