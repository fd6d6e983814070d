#!/usr/bin/env bash
# Create .venv in the project (if missing) and install the measured working set:
# torch 2.14.1 + torchvision 0.29.1, then nnunetv2-sss (pulls nnunetv2 2.8.x), then sam2 1.1.0 without its
# CUDA extension and without build isolation (it builds against the torch already installed).
# pip would byte-compile the ~13,600 installed .py files one at a time: install with
# --no-compile, then compile them once with compileall on every core (with the demo change, command 1 went from 8.0
# to 5.5 min on an idle 2-core machine; see README). Not compiling at all is slower where
# PYTHONDONTWRITEBYTECODE is set, as on these machines: every process would compile its imports again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  pip install --no-compile --upgrade pip
  pip install --no-compile torch==2.14.1 torchvision==0.29.1
fi
pip install --no-compile -e ".[test]"
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sam2') is None)"; then
  SAM2_BUILD_CUDA=0 pip install --no-compile --no-build-isolation sam2==1.1.0
fi
python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
echo "environment ready: $(pwd)/.venv"
echo "the nnUNetv2_* and nnUNetv2_sss_* commands live in .venv/bin: activate it in your shell first with"
echo "    . $(pwd)/.venv/bin/activate"
