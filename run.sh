#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo [args]  set up, then run the capture flow on the embedded default
#   ./run.sh test [args]  set up, then lint and run the test suite
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        bash scripts/setup.sh demo
        QSAE_SETUP_SECONDS=$(cat .venv/.qsae-setup-seconds 2>/dev/null || echo "") exec .venv/bin/qsae demo "$@" ;;
    test)
        bash scripts/setup.sh test
        .venv/bin/ruff check qsae flows tests benchmarks
        HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
