#!/usr/bin/env bash
# A second virtual environment, .venv-swap, for testing accelerate_vit against the real timm and
# torchvision classes. torchvision's PyPI wheels do not import beside the CPU torch 2.13.0 wheel the
# main .venv pins ("operator torchvision::nms does not exist"); torch 2.14.1 + torchvision 0.29.1 import
# as a pair (a ~5.5 GB CUDA build, which also runs on CPU). terrafm is installed without its
# dependencies so the main pin on torch does not fight this one. No pip cache: the wheels alone are
# ~4 GB and a cached copy doubles the disk the install needs. Run the tests with scripts/test_swap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv-swap/bin/python ] || "$PYTHON" -m venv .venv-swap
.venv-swap/bin/python -m pip install -q --upgrade pip
.venv-swap/bin/python -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1 timm
.venv-swap/bin/python -m pip install -q "pytest>=8" "hypothesis>=6.100" numpy "transformers>=4.40"
.venv-swap/bin/python -m pip install -q -e . --no-deps
.venv-swap/bin/python -c 'import torch, torchvision, timm, triton; print("swap env:", "torch", torch.__version__,
      "torchvision", torchvision.__version__, "timm", timm.__version__, "triton", triton.__version__)'
