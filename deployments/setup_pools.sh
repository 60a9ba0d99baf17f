#!/usr/bin/env bash
# Create qsae's work pools: a GPU pool with one work queue per GPU (concurrency limit 1, so
# one capture per GPU at a time) and a CPU pool for the analyses. Idempotent.
#   deployments/setup_pools.sh [N_GPUS]      (default: the GPUs nvidia-smi lists, else 1)
set -euo pipefail
n=${1:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)}
[ "${n:-0}" -ge 1 ] || n=1
gpu_pool=${QSAE_GPU_POOL:-qsae-gpu}
cpu_pool=${QSAE_CPU_POOL:-qsae-cpu}
prefect work-pool inspect "$gpu_pool" >/dev/null 2>&1 || prefect work-pool create "$gpu_pool" --type process
prefect work-pool inspect "$cpu_pool" >/dev/null 2>&1 || prefect work-pool create "$cpu_pool" --type process
for i in $(seq 0 $((n - 1))); do
    prefect work-queue inspect "gpu-$i" --pool "$gpu_pool" >/dev/null 2>&1 \
        || prefect work-queue create "gpu-$i" --pool "$gpu_pool" --limit 1
done
echo "pools: $gpu_pool (queues gpu-0..gpu-$((n - 1)), limit 1 each), $cpu_pool"
