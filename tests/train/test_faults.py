"""Faults: SIGKILL + resume is bitwise exact, a kill while writing never corrupts `latest`, SIGTERM checkpoints."""

import json
import signal
import subprocess

from train_harness import FAULT_RUN, harness_cmd, losses, run_harness, wait_for

from terrafm.checkpoint_io import load_backbone_state
from terrafm.train.trainer import REQUEUE_EXIT_CODE


def test_sigkill_mid_run_then_resume_reproduces_the_losses_bitwise(reference_run, tmp_path):
    run_harness(tmp_path, "--kill-at-batch", "5", *FAULT_RUN, expect_rc=-signal.SIGKILL)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    run_harness(tmp_path, "--resume", *FAULT_RUN)
    assert losses(tmp_path) == losses(reference_run)  # float equality: bitwise
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]  # keep 2


def test_kill_while_writing_a_checkpoint_leaves_latest_complete(reference_run, tmp_path):
    proc = subprocess.Popen(harness_cmd(tmp_path, "--hang-in-save", "2", *FAULT_RUN),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "hanging").exists(), proc)  # step 4's DCP files are written
    finally:
        proc.kill()
        proc.wait()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert (ckpts / "step_00000004.tmp" / ".metadata").exists() and not (ckpts / "step_00000004").exists()
    name, state = load_backbone_state(tmp_path / "run")  # `latest` is loadable as is
    assert name == "terrafm_tiny" and "blocks.0.attn.qkv.weight" in state
    run_harness(tmp_path, "--resume", *FAULT_RUN)
    assert losses(tmp_path) == losses(reference_run)
    assert not list(ckpts.glob("*.tmp"))


def test_sigterm_writes_a_checkpoint_and_exits_with_the_requeue_code(tmp_path):
    proc = subprocess.Popen(harness_cmd(tmp_path, "train.max_steps=1000", "train.checkpoint_every=1000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    ckpts = tmp_path / "run" / "checkpoints"
    step_dir = ckpts / (ckpts / "latest").read_text()
    assert json.loads((step_dir / "meta.json").read_text())["step"] == last_logged
    assert step_dir.is_dir() and (tmp_path / "run" / "preempted").read_text().strip() == str(last_logged)
