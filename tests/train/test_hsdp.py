"""HSDP: 4 gloo ranks as a 2x2 (dp_replicate x dp_shard) mesh match 1 rank on the same global batch, and
its checkpoint resumes on another mesh (4x1) and on 1 rank (train.elastic_resume) to the same step 3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_harness import HARNESS, free_port, metric_records, run_ranks

from terrafm.checkpoint_io import load_backbone_state

pytestmark = pytest.mark.slow

# as in test_fsdp.py: momentum 0 makes the teacher equal the student after every step (EMA on the shards), and
# global-norm clipping keeps the float noise of zero gradients under Adam's eps
STEPS = ["train.max_steps=3", "train.checkpoint_every=2", "ssl.teacher_momentum=0.0", "ssl.teacher_momentum_end=0.0",
         "optim.clip_mode=global"]
GLOBAL_BATCH = 8


def torchrun(out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                      f"--master_port={free_port()}", str(HARNESS), str(out), "--batch",
                      str(GLOBAL_BATCH // nproc), *STEPS, *args], fresh=out / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, str(HARNESS), str(out), "--batch", str(GLOBAL_BATCH), *STEPS], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("hsdp")
    proc = torchrun(out, 4, "parallel.dp_replicate=2", "parallel.dp_shard=2")
    return out, proc.stdout


def assert_same_step(a: dict, b: dict) -> None:
    """The parity tolerance of test_fsdp.py (float-reordering noise of the reductions, amplified by Adam)."""
    assert a["step"] == b["step"]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) + 2e-6, (a["loss"], b["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])


def assert_same_teacher(run_a: Path, run_b: Path) -> None:
    _, a = load_backbone_state(run_a)
    _, b = load_backbone_state(run_b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def test_2x2_hsdp_matches_one_rank_on_the_same_global_batch(one_rank, hsdp):
    out, stdout = hsdp
    assert "mesh dp_replicate x dp_shard = 2 x 2" in stdout
    meta = json.loads((out / "run" / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["mesh"] == {"dp_replicate": 2, "dp_shard": 2} and meta["world_size"] == 4
    a, b = metric_records(one_rank / "run"), metric_records(out / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert_same_step(ra, rb)
    # the EMA teacher (written on the 2x2 shards) matches, and equals the student (momentum 0)
    assert_same_teacher(one_rank / "run", out / "run")
    _, teacher = load_backbone_state(out / "run")
    _, student = load_backbone_state(out / "run", "student")
    for k in teacher:
        assert torch.equal(teacher[k], student[k]), k


@pytest.mark.parametrize("nproc,mesh", [(4, ["parallel.dp_replicate=4", "parallel.dp_shard=1"]),
                                        (1, ["train.elastic_resume=true"])])
def test_2x2_checkpoint_resumes_on_another_mesh(tmp_path, hsdp, nproc, mesh):
    """Resume step 2 of the 2x2 run on 4x1 (same world size: an exact resume, DCP reshards the weights and
    the AdamW moments) or on 1 rank (elastic): step 3's loss, grad norm and updated teacher match the
    uninterrupted 2x2 run, which they could not with wrongly resharded weights or optimiser state."""
    out, _ = hsdp
    step2 = out / "run" / "checkpoints" / "step_00000002"
    if nproc == 1:
        subprocess.run([sys.executable, str(HARNESS), str(tmp_path), "--batch", str(GLOBAL_BATCH), *STEPS, *mesh,
                        "--resume-from", str(step2)], check=True, capture_output=True, timeout=300)
    else:
        proc = torchrun(tmp_path, nproc, *mesh, "--resume-from", str(step2))
        assert "mesh dp_replicate x dp_shard = 4 x 1" in proc.stdout
    (resumed,) = metric_records(tmp_path / "run")
    assert_same_step(metric_records(out / "run")[2], resumed)
    assert_same_teacher(out / "run", tmp_path / "run")
