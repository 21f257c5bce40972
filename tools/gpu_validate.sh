#!/usr/bin/env bash
# Calibrate, plan, run and compare on this machine's GPUs; one JSON + PNG report (tools/gpu_validate.py).
#   tools/gpu_validate.sh [--out DIR] [--budget SECONDS]   on a machine with 1+ NVIDIA GPUs (under 8 minutes)
#   tools/gpu_validate.sh --dry [--out DIR]                 the same pipeline on CPU (gloo, fp32, small models)
# Uses .venv/bin/python when there is one (tools/setup.sh), else python3 with pase importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_validate.py "$@"
