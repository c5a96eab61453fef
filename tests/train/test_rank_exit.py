"""A torchrun rank ends without interpreter finalization (terrafm.train.cli.end_of_rank): a thread inside a torch
op while the interpreter finalizes aborts the process (pytorch/pytorch#38228), the way 2-rank CPU runs died after
their last checkpoint."""

import os
import subprocess
import sys

import pytest

from terrafm.train.cli import end_of_rank

BUSY_THREAD = """
import sys, threading, time
import torch

def busy():
    a = torch.randn(1000)
    while True:
        a + a

threading.Thread(target=busy, daemon=True).start()
time.sleep(0.2)
"""  # a thread inside a torch op when the interpreter finalizes
SCRIPT = BUSY_THREAD + """
from terrafm.train.cli import end_of_rank
print("checkpoint written", flush=False)  # buffered: end_of_rank must flush it
sys.exit(end_of_rank(int(sys.argv[1])) if sys.argv[2] == "end_of_rank" else int(sys.argv[1]))
"""


def _run(code: int, how: str, world: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": world}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(code), how], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("code", [0, 2, 75])
def test_a_rank_with_a_thread_in_a_torch_op_exits_cleanly_with_its_code(code):
    proc = _run(code, "end_of_rank", "2")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "checkpoint written" in proc.stdout and "terminate called" not in proc.stderr


def test_without_it_the_same_process_aborts_at_finalization():
    """The failure end_of_rank prevents: plain interpreter exit with that thread running."""
    proc = _run(0, "sys.exit", "2")
    assert proc.returncode != 0 and "terminate called without an active exception" in proc.stderr


def test_outside_a_multi_rank_job_it_returns_the_code(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert end_of_rank(3) == 3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert end_of_rank(75) == 75


PROGRAM = BUSY_THREAD + """
from terrafm.cli import main
sys.argv = ["terrafm", "pretrain", "--resume-from", sys.argv[1], "--out", sys.argv[2]]
sys.exit(main())  # as the console script calls it
"""


def test_the_pretrain_program_ends_without_finalization_too(tmp_path):
    """A single-process `terrafm pretrain` that refused a resume printed its message, then aborted at interpreter
    exit (exit 134) in about 1 run in 20: the same teardown crash, outside torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "nowhere"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "terrafm pretrain: cannot resume" in proc.stderr and "terminate called" not in proc.stderr
