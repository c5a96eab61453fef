"""`terrafm pretrain --nproc N` ends the way its ranks end: their exit code and messages, not torchrun's traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest

from terrafm.data.sample import ensure_sample_shards
from terrafm.train.launch import exit_code_of_ranks, exit_code_of_signal


def test_exit_codes_follow_the_ranks_conventions():
    assert [exit_code_of_signal(s) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1)] == \
        [130, 130, 75, 75]
    assert exit_code_of_signal(signal.SIGQUIT) == 131
    assert [exit_code_of_ranks(c) for c in (2, 75, -9)] == [2, 75, 137]


def _launch(out, *overrides):
    return subprocess.Popen([sys.executable, "-m", "terrafm.cli", "pretrain", "--nproc", "2", "--out", str(out),
                             "train.probe=false", "train.log_every=1", "train.checkpoint_every=1000", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # two ranks start, train a few steps, checkpoint (~30 s)
def test_ctrl_c_under_nproc_checkpoints_and_exits_130_without_a_traceback(tmp_path):
    """The ranks checkpointed and exited 130, and then torchrun ended the command with `SignalException: Process N got
    signal: 2`, a traceback and exit 1 (docs/training.md promises 130)."""
    ensure_sample_shards()
    out = tmp_path / "run"
    proc = _launch(out, "train.max_steps=400")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert (out / "checkpoints" / "latest").exists() and not (out / "preempted").exists()


@pytest.mark.slow  # two ranks start and fail at once (~15 s)
def test_a_rank_error_under_nproc_is_the_ranks_message_and_exit_code(tmp_path):
    """A configuration error found by the ranks (here a missing shard folder) printed each rank's message, then
    torchrun's ChildFailedError traceback and root-cause table, and exited 1 instead of the ranks' 2."""
    proc = _launch(tmp_path / "run", f"data.shard_dir={tmp_path / 'missing'}")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    assert "shard directory" in err and "does not exist" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
