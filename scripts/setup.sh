#!/usr/bin/env bash
# Create .venv and install qsae with its demo and test extras. Idempotent.
# Torch is installed first and pinned: on a CPU-only machine `torch==2.13.0` takes the
# CPU wheel that lies on disk; on a GPU machine the same pin takes PyPI's CUDA build.
# Set QSAE_TORCH_SPEC to choose another build (e.g. "torch==2.14.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "${QSAE_TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install -q -c constraints.txt -e ".[demo,test]"
echo "qsae environment ready in .venv (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
