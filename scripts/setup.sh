#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, CPU): a virtual environment in .venv with terrafm installed
# editable (this builds csrc/ through CMake) plus the test and DALI extras.
# torch==2.13.0 is pinned: pip takes the CPU wheel from the local wheel folder where one is configured.
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
