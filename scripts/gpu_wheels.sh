#!/usr/bin/env bash
# Download the wheels a GPU machine without internet needs for benchmarks/bench_capture_gpu.py
# (it has torch, transformers, xarray and scipy) into storage/wheels/, for its Python version:
#   PY=3.12 bash scripts/gpu_wheels.sh
# then on the device (carry storage/wheels):
#   pip install --no-index --no-deps storage/wheels/*.whl && PYTHONPATH=. \
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/bench_capture_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.11}"
out=storage/wheels
mkdir -p "$out"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$out" zarr numcodecs donfig google-crc32c pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions dask partd locket toolz cloudpickle fsspec \
    flash-linear-attention fla-core tqdm
du -sh "$out"
