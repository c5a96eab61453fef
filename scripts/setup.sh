#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, CPU or GPU):
#   .venv       terrafm installed editable (this builds csrc/ through CMake) + the test and DALI extras;
#               torch==2.13.0 and triton==3.7.1 are pinned here (pyproject.toml accepts torch 2.11-2.13 and triton
#               3.6-3.7 for GPU images; pip takes the CPU wheel from the local wheel folder where one is configured)
#   .venv-swap  torch 2.14.1 + torchvision 0.29.1 + timm, for the accelerate_vit tests against real
#               timm/torchvision ViTs (torchvision does not import beside the torch 2.13.0 CPU wheel).
#               It is a ~5.5 GB CUDA build: it is made only where the disk has room (SWAP_ENV_MIN_FREE_GB,
#               default 14), and a failed install (disk, network) removes it and says so instead of failing
#               the whole setup; scripts/test.sh then prints the swap tests as NOT RUN with the reason.
#               TERRAFM_SKIP_SWAP_ENV=1 skips it; TERRAFM_REQUIRE_SWAP_ENV=1 makes any failure fatal.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "terrafm needs Python >= 3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 triton==3.7.1
.venv/bin/python -m pip install -q -e ".[test,dali]"
.venv/bin/terrafm info

SKIPPED=.venv-swap.skipped  # why the swap env is missing, printed by scripts/test.sh
rm -f "$SKIPPED"
swap_skip() {
  echo "$1" > "$SKIPPED"
  echo "WARNING: no .venv-swap: $1 (the timm/torchvision swap tests will not run)" >&2
  if [ "${TERRAFM_REQUIRE_SWAP_ENV:-0}" = "1" ]; then exit 1; fi
}
need_gb=${SWAP_ENV_MIN_FREE_GB:-14}
free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "${TERRAFM_SKIP_SWAP_ENV:-0}" = "1" ]; then
  swap_skip "TERRAFM_SKIP_SWAP_ENV=1 at setup"
elif [ -x .venv-swap/bin/python ] && .venv-swap/bin/python -c 'import timm, torchvision' 2>/dev/null; then
  .venv-swap/bin/python -m pip install -q -e . --no-deps
elif [ "$free_gb" -lt "$need_gb" ]; then
  swap_skip "only ${free_gb} GB free on this disk; torch 2.14.1 + torchvision need about ${need_gb} GB to install"
elif ! bash scripts/setup_swap_env.sh; then
  rm -rf .venv-swap
  swap_skip "scripts/setup_swap_env.sh failed (see its pip error above); removed the partial .venv-swap"
fi
