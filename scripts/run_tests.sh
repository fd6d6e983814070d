#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU, plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m pytest -v --durations=15 "$@"
