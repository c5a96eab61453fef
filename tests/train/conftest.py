"""Trainer-test fixtures: one uninterrupted reference run shared by the fault tests."""

from pathlib import Path

import pytest
from train_harness import FAULT_RUN, run_harness


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted FAULT_RUN: its losses are what every interrupted + resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_harness(out, *FAULT_RUN)
    return out
