"""Faults: SIGKILL + resume is bitwise exact, a kill while writing never corrupts `latest`, SIGTERM checkpoints."""

import json
import signal
import subprocess
import time

from train_harness import FAULT_RUN, harness_cmd, losses, run_harness, wait_for

from terrafm.checkpoint_io import load_backbone_state
from terrafm.stop_signals import REQUEUE_EXIT_CODE


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


def _signal_after_two_steps(tmp_path, signum) -> tuple[int, str]:
    """A long run signalled once it has logged two steps: (exit code, stderr)."""
    # SIGHUP as a terminal sends it, also where the tests themselves run under nohup (which the run would honour)
    proc = subprocess.Popen(harness_cmd(tmp_path, "train.max_steps=1000", "train.checkpoint_every=1000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigterm_writes_a_checkpoint_and_exits_with_the_requeue_code(tmp_path):
    code, err = _signal_after_two_steps(tmp_path, signal.SIGTERM)
    assert code == REQUEUE_EXIT_CODE, err[-2000:]
    metrics = tmp_path / "run" / "metrics.jsonl"
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    ckpts = tmp_path / "run" / "checkpoints"
    step_dir = ckpts / (ckpts / "latest").read_text()
    assert json.loads((step_dir / "meta.json").read_text())["step"] == last_logged
    assert step_dir.is_dir() and (tmp_path / "run" / "preempted").read_text().strip() == str(last_logged)


def test_a_hang_up_checkpoints_at_the_step_end_without_the_requeue(tmp_path):
    """SIGHUP (the terminal or ssh session of an interactive run closed) killed the run without a checkpoint."""
    code, err = _signal_after_two_steps(tmp_path, signal.SIGHUP)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").exists() and not (tmp_path / "run" / "preempted").exists()


def test_ctrl_c_checkpoints_at_the_step_end_and_a_second_stops_at_once(tmp_path):
    """Ctrl-C was a KeyboardInterrupt traceback wherever it landed (mid-save too), losing the steps since the
    last checkpoint. Now the first one stops like SIGTERM but without the requeue marker (exit 130); a second
    one, here during a save that hangs, stops at once, one line, `latest` untouched."""
    code, err = _signal_after_two_steps(tmp_path, signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").exists() and not (tmp_path / "run" / "preempted").exists()

    second = tmp_path / "second"
    proc = subprocess.Popen(harness_cmd(second, "--hang-in-save", "1", "train.max_steps=1000",
                                        "train.checkpoint_every=2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (second / "hanging").exists(), proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)  # a second later: within PreemptionFlag.SAME_STOP_S it is the same stop delivered twice
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    # the hanging save never published, and the message does not point at a `latest` that is not there
    assert "interrupted; no checkpoint was completed (--resume starts the run over)" in err
    assert not (second / "run" / "checkpoints" / "latest").exists()
