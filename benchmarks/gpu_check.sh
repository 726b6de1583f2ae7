#!/usr/bin/env bash
# One CUDA GPU, under 5 minutes: throughput of every default pair (resnet/plain/pnnh at depths
# 20/56/110 and 18/50; bf16 + channels_last; eager and compiled; batch 256) and one epoch of
# pnnh56 and resnet56 on synthetic 32x32 data, written as one JSON record.
#
#   bash benchmarks/gpu_check.sh [--out runs/gpu_check/gpu_check.json] [--budget-s 240]
#   bash benchmarks/gpu_check.sh --tiny      # the same paths at tiny sizes, on a CPU, in seconds
#
# Details: benchmarks/gpu_check.py. Run from the repository root, with the project installed
# (make setup); PYTHON overrides the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec timeout 300 "$PYTHON" benchmarks/gpu_check.py "$@"
