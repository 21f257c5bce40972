#!/usr/bin/env bash
# Create .venv at the repo root and install pase with its test extras.
# torch is pinned to the local CPU wheel *first*, so the range in setup.py is already
# satisfied and pip never pulls a multi-GB CUDA build. Users with their own CUDA torch
# should `pip install -e .` into their environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${PASE_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==$TORCH_VERSION (CPU wheel)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
echo "[setup] installing pase (editable) with test extras"
"${PIP[@]}" install -e ".[test]"
# An editable install leaves pase's own sources uncompiled, and with PYTHONDONTWRITEBYTECODE set
# every command would compile them again (0.15 s of each `pase plan`): compile them once, as a
# regular pip install does.
.venv/bin/python -m compileall -q pase cost_models strategies
# Headless Chromium opens the HTML reports in tests/test_reports_in_browser.py (Debian's package, about 20 s).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  echo "[setup] installing chromium (the browser test of the HTML reports)"
  { $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }; } \
    >/dev/null 2>&1 || echo "[setup] could not install chromium: tests/test_reports_in_browser.py will be skipped"
fi
echo "[setup] done: $(.venv/bin/python -c 'import torch, pase; print("torch", torch.__version__, "| pase", pase.__version__)')"
