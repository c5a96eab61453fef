"""Shared pieces of the trainer tests: the harness subprocess and one uninterrupted reference run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("run_pretrain.py")
# 6 optimiser steps, checkpoints at 2, 4, 6; deterministic kernels so reruns are bitwise equal
FAULT_RUN = ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.deterministic=true"]


def harness_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(HARNESS), str(out), *args]


def run_harness(out: Path, *args: str, expect_rc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(harness_cmd(out, *args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted FAULT_RUN: its losses are what every interrupted + resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_harness(out, *FAULT_RUN)
    return out
