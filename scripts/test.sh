#!/usr/bin/env bash
# The test command: ruff, the whole pytest suite (CPU: Triton kernels under the interpreter), then
# the AOT compile report of every shipped kernel config for sm_80/sm_90 (fails on spills).
# Extra pytest arguments pass through, e.g. `scripts/test.sh -m "not slow"` while iterating.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
mkdir -p results
.venv/bin/python -m terrafm_kernels.compile_report --strict --json results/compile_report.json
