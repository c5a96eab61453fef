"""2-rank FSDP2 (gloo, torchrun) matches 1 rank on the same global batch: losses, grad norms, teacher."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_harness import HARNESS, free_port, metric_records, run_ranks

from terrafm.checkpoint_io import load_backbone_state

# momentum 0: after every step the teacher must equal the student, which proves the EMA writes the
# shards in place (with a momentum near 1 a no-op update would be invisible after 3 steps). Global-norm clipping:
# its factor (3 / ~240 here) scales the float noise of gradients that are zero in exact arithmetic (the key bias,
# an undrawn sensor's patch embedding) under Adam's eps; per-parameter clipping leaves it, Adam turns it into steps
# of ~lr whose sign the reduction order decides (up to 3.5e-4 apart after 3 steps), so the weights could not be
# compared at 1e-4. Per-parameter clipping on shards is checked against one process in test_clipping.py.
STEPS = ["train.max_steps=3", "train.checkpoint_every=3", "ssl.teacher_momentum=0.0", "ssl.teacher_momentum_end=0.0",
         "optim.clip_mode=global"]


def records(out: Path) -> list[dict]:
    return metric_records(out / "run")


@pytest.mark.parametrize("fused_head_loss", [False, True])
def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path, fused_head_loss):
    """fused_head_loss=True on the 2 ranks only: the fused op runs inside the FSDP2-sharded head's forward
    and must match the unfused single-rank run (its prototype gradients are reduce-scattered too)."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(HARNESS), str(one), "--batch", "8", *STEPS], check=True,
                   capture_output=True, timeout=300)
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(HARNESS), str(two), "--batch", "4", *STEPS,
                      f"ssl.fused_head_loss={str(fused_head_loss).lower()}"], fresh=two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # rtol 1e-5 plus atol 2e-6: the loss collapses from ~4.3 to ~0.09 over these 3 steps, and the
    # float-reordering noise of the all-reduce, amplified by Adam (see below), is ~1e-6 absolute at
    # step 3 (measured: 1.07e-6, i.e. 1.25e-5 relative); steps 1 and 2 agree to <= 5e-7 relative
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]) + 2e-6, (ra["loss"], rb["loss"])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * ra["grad_norm"], (ra["grad_norm"], rb["grad_norm"])
    # the EMA teacher, updated on each rank's shards and reassembled from 2 ranks' DCP shards
    _, teacher_one = load_backbone_state(one / "run")
    _, teacher_two = load_backbone_state(two / "run")
    assert teacher_one.keys() == teacher_two.keys()
    # Adam turns float-reordering noise in tiny gradients into ~1e-5 weight differences; one step
    # moves a weight by ~lr (1.6e-3), so 1e-4 still catches any real mismatch
    for k in teacher_one:
        torch.testing.assert_close(teacher_one[k], teacher_two[k], rtol=1e-4, atol=1e-4, msg=k)
    _, student_two = load_backbone_state(two / "run", "student")
    for k in teacher_two:
        assert torch.equal(teacher_two[k], student_two[k]), k


def test_two_ranks_on_the_sample_tiles_with_per_rank_modality_draws(tmp_path):
    """The real loader draws sensors per rank: FSDP collectives must still line up (blocks run per crop size).
    With per-parameter clipping (every preset's, pinned here): the trainer's path on DTensor gradients."""
    run_dir = tmp_path / "run"
    proc = run_ranks([sys.executable, "-m", "terrafm.cli", "pretrain", "--nproc", "2", "--out", str(run_dir),
                      "train.max_steps=2", "train.log_every=1", "optim.clip_mode=per_parameter"], fresh=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((run_dir / "checkpoints" / "step_00000002").glob("rank_*.json"))) == 2


def test_elastic_resume_from_two_ranks_onto_one(tmp_path):
    """A 2-rank checkpoint resumed on 1 rank: refused by default, then resharded with train.elastic_resume.

    The resumed step runs with lr 1e-30 (optim.lr must be > 0; an update that small rounds away in fp32)
    and teacher momentum 0, so it must leave the student exactly as the 2-rank checkpoint holds it and
    copy it into the teacher: proof that DCP resharded the weights.
    """
    run_dir = tmp_path / "run"
    pretrain = [sys.executable, "-m", "terrafm.cli", "pretrain", "--out", str(run_dir)]
    first = run_ranks(pretrain + ["--nproc", "2", "train.max_steps=2", "train.checkpoint_every=2",
                                  "train.log_every=1", "data.batch_size=8", "train.probe=false"], fresh=run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    _, student_two_ranks = load_backbone_state(run_dir, "student")
    # same global batch (2 x 8 -> 1 x 16), one more step
    resume = pretrain + ["--resume", "train.max_steps=3", "train.log_every=1", "data.batch_size=16",
                         "train.probe=false", "optim.lr=1e-30", "optim.min_lr=0",
                         "ssl.teacher_momentum=0.0", "ssl.teacher_momentum_end=0.0"]
    refused = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2  # fix the setup and rerun
    assert "written by 2 ranks, this run has 1" in refused.stderr and "train.elastic_resume=true" in refused.stderr
    assert refused.stderr.count("Traceback") == 0, refused.stderr[-3000:]
    resumed = subprocess.run(resume + ["train.elastic_resume=true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "elastic resume: 2 -> 1 ranks at step 2; samples per loader step 16 -> 16" in resumed.stdout
    assert "0 samples drawn again" in resumed.stdout
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    step3 = run_dir / "checkpoints" / "step_00000003"
    assert [p.name for p in step3.glob("rank_*.json")] == ["rank_00000.json"]
    _, student = load_backbone_state(step3, "student")
    _, teacher = load_backbone_state(step3, "teacher")
    for k, v in student_two_ranks.items():
        assert torch.equal(student[k], v), k
        assert torch.equal(teacher[k], v), k


@pytest.mark.parametrize("collapsed_rank", [0, 1])
def test_stop_on_collapse_is_rank_0s_decision_on_every_rank(tmp_path, collapsed_rank):
    """The monitors are rank 0's (the logged ones); each rank used to decide on its own, so one rank stopped
    and the others died in their next collective (gloo: connection reset; NCCL: a hang until the timeout)."""
    run = tmp_path / "run"
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(HARNESS), str(tmp_path), "--batch", "4",
                      "--collapse-on-rank", str(collapsed_rank), "train.max_steps=3", "train.checkpoint_every=3",
                      "train.log_every=1", "optim.warmup_epochs=0", "train.stop_on_collapse=true"], fresh=run)
    output = proc.stdout + proc.stderr
    assert "Connection reset" not in output and "RuntimeError" not in output, output[-3000:]
    if collapsed_rank == 0:  # both ranks stop at the first logged step after warm-up, with the trainer's message
        assert proc.returncode != 0, output[-3000:]  # torchrun's own ChildFailedError report follows
        assert output.count("stopped at step 1 (train.stop_on_collapse)") == 2, output[-3000:]
        assert "no checkpoint was written yet" in output
    else:  # rank 1's own monitors are not what decides
        assert proc.returncode == 0, output[-3000:]
        assert [r["step"] for r in metric_records(run)] == [1, 2, 3]


@pytest.mark.parametrize("corrupt_rank", [0, 1])
def test_a_corrupt_chunk_on_one_rank_keeps_the_steps_done_in_a_checkpoint_of_all_ranks(tmp_path, corrupt_rank):
    """The rank that met it raised at once: the others waited in the forward's collectives (gloo: connection
    reset; NCCL: a hang until the timeout) and the steps since the last checkpoint were lost. Now the step is
    discarded on every rank, all write the checkpoint of the steps done and stop with the shard's message."""
    run = tmp_path / "run"
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(HARNESS), str(tmp_path), "--batch", "4",
                      "--corrupt-batch", f"{corrupt_rank}:4", "train.max_steps=10", "train.checkpoint_every=1000",
                      "train.log_every=1"], fresh=run)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Connection reset" not in output, output[-3000:]
    message = (f"rank {corrupt_rank}: part-00004.bin: record 130 s1 band 0: crc32 0x1 != stored 0x2 "
               f"(rank {corrupt_rank}) (checkpoint {run / 'checkpoints' / 'step_00000003'} holds the 3 steps done")
    assert output.count(message) == 2, output[-3000:]  # each rank says it
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3]


def test_a_corrupt_first_batch_after_a_resume_stops_every_rank_with_its_message(tmp_path):
    """With no batch to stand in, the rank that could not read its first batch after a resume raised at once;
    the others died in the forward's collectives (gloo: connection closed; NCCL: a hang until the timeout).
    The ranks now agree on the first batch before the first step."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    proc = run_ranks([*torchrun, f"--master_port={free_port()}", str(HARNESS), str(tmp_path), "--batch", "4",
                      "train.max_steps=2", "train.checkpoint_every=2"], fresh=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_ranks([*torchrun, f"--master_port={free_port()}", str(HARNESS), str(tmp_path), "--batch", "4",
                      "--resume", "--corrupt-batch", "1:1", "train.max_steps=4"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Connection" not in output, output[-3000:]
    assert output.count("rank 1: part-00004.bin: record 130 s1 band 0: crc32 0x1 != stored 0x2 (rank 1) "
                        f"(nothing was trained since {run / 'checkpoints' / 'step_00000002'})") == 2, output[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
