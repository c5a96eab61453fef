#!/usr/bin/env bash
# Run the accelerate_vit tests against real timm / torchvision / Hugging Face ViTs in .venv-swap
# (made by scripts/setup_swap_env.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-swap/bin/python ] || { echo "no .venv-swap: run scripts/setup_swap_env.sh first" >&2; exit 2; }
exec .venv-swap/bin/python -m pytest tests/bench/test_swap.py -p no:cacheprovider "$@"
