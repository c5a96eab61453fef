#!/usr/bin/env bash
# The test command: ruff, the whole pytest suite (CPU: Triton kernels under the interpreter), the
# accelerate_vit tests against real timm/torchvision ViTs in .venv-swap, then the AOT compile
# report of every shipped kernel config for sm_80/sm_90 (fails on spills).
# Extra arguments go to the main pytest run, e.g. `scripts/test.sh -m "not slow"` while iterating.
# pytest runs on TERRAFM_TEST_WORKERS xdist workers (default 2, one per core of the dev machine; 0 = in-process);
# runs that must not overlap (the GPU presets; ViT-L holds ~14 GB) are one test, so one worker runs them in turn
# (xdist_group marks are dropped on the workers by pytest-xdist 3.8 under pytest 9.2). Hypothesis draws the
# same examples on every run of this command (HYPOTHESIS_PROFILE=ci, tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} .venv/bin/python -m pytest -q -n "${TERRAFM_TEST_WORKERS:-2}" "$@"
if [ -x .venv-swap/bin/python ]; then
  bash scripts/test_swap.sh -q
else
  reason="no .venv-swap; make it with scripts/setup_swap_env.sh"
  [ -f .venv-swap.skipped ] && reason="$(cat .venv-swap.skipped)"
  echo "NOT RUN: accelerate_vit tests on real timm/torchvision ViTs ($reason)." \
       "The Hugging Face ViT swap tests above ran in .venv."
  if [ "${TERRAFM_REQUIRE_SWAP_ENV:-0}" = "1" ]; then exit 1; fi  # CI: they must run
fi
mkdir -p results
.venv/bin/python -m terrafm_kernels.compile_report --strict --json results/compile_report.json
