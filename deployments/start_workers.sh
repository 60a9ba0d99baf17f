#!/usr/bin/env bash
# Start one process worker per GPU (each pinned to its GPU and its own queue) and one CPU
# worker, in the background; their pids go to deployments/workers.pids.
#   deployments/start_workers.sh [N_GPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)}
[ "${n:-0}" -ge 1 ] || n=1
: > deployments/workers.pids
for i in $(seq 0 $((n - 1))); do
    CUDA_VISIBLE_DEVICES=$i nohup prefect worker start --pool "${QSAE_GPU_POOL:-qsae-gpu}" --work-queue "gpu-$i" \
        --name "gpu-$i-$(hostname)" > "deployments/worker-gpu-$i.log" 2>&1 &
    echo $! >> deployments/workers.pids
done
nohup prefect worker start --pool "${QSAE_CPU_POOL:-qsae-cpu}" --name "cpu-$(hostname)" > deployments/worker-cpu.log 2>&1 &
echo $! >> deployments/workers.pids
echo "started $((n + 1)) workers: $(tr '\n' ' ' < deployments/workers.pids)(stop: kill \$(cat deployments/workers.pids))"
