#!/usr/bin/env bash
# Memory on a GPU machine, in one call: a real-size parallel VAE decode (Wan 2.1's VAE, an
# 81-frame 720p latent; Flux's VAE, a 4096 px latent; random weights, bf16) at world 1 and
# on 2 ranks sharing the one GPU (CUDA MPS), peak allocated memory per rank; then
# `streamfusion generate --offload` against the same run without it (tiny Flux, peak memory
# per rank in the summary).
#
# Device tool call (wheels as for tools/gpu_generate.sh):
#   run(command="bash tools/gpu_memory.sh", carry=[".whl"], timeout_s=580)
# Lines go to $OUT/summary.txt; results/ gets them by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-memory}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SF_TIMEOUT=300
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

source tools/gpu_install.sh
RUN="python3 -m torch.distributed.run --standalone"

for vae in wan flux; do
    step "VAE $vae, world 1"
    timeout 240 $RUN --nproc-per-node 1 tools/gpu_vae_decode.py --vae $vae \
        --reference "/tmp/ref-$vae.pt" 2>&1 | tee "$OUT/vae-$vae-w1.log" | grep '^{' >> "$OUT/summary.txt"
done

export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50
for vae in wan flux; do
    step "VAE $vae, 2 ranks on the one GPU"
    timeout 240 $RUN --nproc-per-node 2 tools/gpu_vae_decode.py --vae $vae \
        --reference "/tmp/ref-$vae.pt" 2>&1 | tee "$OUT/vae-$vae-w2.log" | grep '^{' >> "$OUT/summary.txt"
done

python3 -m sf_models.cli make-tiny /tmp/tiny-flux --model flux > /dev/null || exit 1
for offload in "" "--offload"; do
    step "generate, 2 ranks, bf16 $offload"
    timeout 180 $RUN --nproc-per-node 2 -m sf_models.generate --model-dir /tmp/tiny-flux \
        --prompt "a red fox in the snow" --steps 8 --seed 0 --dtype bf16 $offload \
        --json "$OUT/generate$offload.json" > "$OUT/generate$offload.log" 2>&1
    echo "rc=$? offload='$offload' $(grep -i 'peak' "$OUT/generate$offload.log" | tr '\n' ' ')" \
        | tee -a "$OUT/summary.txt"
done
