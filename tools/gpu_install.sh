# Sourced by the tools/gpu_*.sh scripts on the lent GPU machine: installs the carried wheels
# (.whl/, if any) and the four packages into /tmp/site (installed, not from source: torch
# finds the compile backend through its entry point), and puts them and libnvshmem_host
# (nvidia-nvshmem-cu13 is on the image) on the paths. Needs step() from the caller.
step "install carried wheels and the four packages into /tmp/site"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target /tmp/site packages/sf-comm packages/sf-attn packages/sf-models packages/sf-compile \
    || exit 1
export PYTHONPATH=/tmp/site
nvshmem_lib=$(python3 -c 'import os, nvidia.nvshmem as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nvshmem_lib}:${LD_LIBRARY_PATH:-}
