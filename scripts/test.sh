#!/usr/bin/env bash
# The test command: ruff, then the default pytest suite (slow tests: `scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
