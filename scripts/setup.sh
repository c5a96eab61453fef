#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, CPU or GPU):
#   .venv       terrafm installed editable (this builds csrc/ through CMake) + the test and DALI extras;
#               torch==2.13.0 is pinned (pip takes the CPU wheel from the local wheel folder where one is configured)
#   .venv-swap  torch 2.14.1 + torchvision 0.29.1 + timm, for the accelerate_vit tests against real
#               timm/torchvision ViTs (torchvision does not import beside the torch 2.13.0 CPU wheel);
#               skipped with TERRAFM_SKIP_SWAP_ENV=1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "terrafm needs Python >= 3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,dali]"
.venv/bin/terrafm info
if [ "${TERRAFM_SKIP_SWAP_ENV:-0}" = "1" ]; then
  echo "TERRAFM_SKIP_SWAP_ENV=1: not making .venv-swap (the timm/torchvision swap tests will not run)"
else
  bash scripts/setup_swap_env.sh
fi
