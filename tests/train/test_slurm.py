"""The sbatch scripts, run as SLURM would run them, on CPU: stand-ins for `srun` (runs its command once,
as one task on one node) and `scontrol` (hostnames, and a requeue that is recorded), 2 gloo ranks.

Covers what the scripts own: the torchrun command lines (standalone and c10d rendezvous), passing
overrides through, and the preemption path: SIGUSR1 (SLURM's --signal=USR1@120 warning) to the job
step -> every rank checkpoints -> `scontrol requeue` -> the requeued job resumes where it stopped.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_harness import free_port, metric_records, wait_for

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "scripts" / "slurm"
JOB_ID = "4242"

SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, then run the task (one node, one task per node).
while [[ "${1:-}" == -* ]]; do shift; done
exec "$@"
"""
SRUN_NODES = """#!/bin/bash
# srun stand-in for an allocation of SLURM_JOB_NUM_NODES nodes on this one machine: one task per "node".
while [[ "${1:-}" == -* ]]; do shift; done
pids=()
for _ in $(seq "$SLURM_JOB_NUM_NODES"); do "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: `show hostnames` gives this machine; `requeue` is recorded for the test.
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 2 ;;
esac
"""

pytestmark = pytest.mark.slow


def slurm_env(tmp_path: Path) -> dict:
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", PYTHON=sys.executable, CONFIG="tiny_cpu",
               RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
               SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST="node001", SLURM_JOB_NUM_NODES="1",
               SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    return env


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metric_records(run_dir)]


def test_multinode_script_trains_and_checkpoints_through_c10d_rendezvous(tmp_path):
    env = slurm_env(tmp_path)
    proc = subprocess.run(["bash", str(SLURM / "pretrain_multinode.sbatch"), "train.max_steps=2",
                           "train.checkpoint_every=2", "train.log_every=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the mesh from the allocation (1 node x 2 "GPUs"), printed by the script and used by the trainer
    assert "terrafm: 1 node(s) x 2 GPUs = 2 ranks" in proc.stdout
    assert "mesh dp_replicate x dp_shard = 1 x 2" in proc.stdout
    run_dir = tmp_path / "run"
    assert steps(run_dir) == [1, 2]
    assert len(list((run_dir / "checkpoints" / "step_00000002").glob("rank_*.json"))) == 2
    assert not (tmp_path / "scontrol.log").exists()  # a finished job is not requeued


def test_multinode_script_on_two_nodes_trains_on_the_hsdp_mesh_it_derives(tmp_path):
    """2 "nodes" x 1 "GPU": two torchrun agents meet through c10d; the script derives replicate across the
    nodes, shard within one (2 x 1), and the trainer runs on that mesh."""
    env = dict(slurm_env(tmp_path), SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="1")
    (tmp_path / "bin" / "srun").write_text(SRUN_NODES)
    proc = subprocess.run(["bash", str(SLURM / "pretrain_multinode.sbatch"), "train.max_steps=2",
                           "train.checkpoint_every=2", "train.log_every=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terrafm: 2 node(s) x 1 GPUs = 2 ranks" in proc.stdout
    assert "mesh dp_replicate x dp_shard = 2 x 1" in proc.stdout
    assert steps(tmp_path / "run") == [1, 2]


def test_1node_script_requeues_on_sigusr1_and_the_requeued_job_resumes(tmp_path):
    env = slurm_env(tmp_path)
    run_dir = tmp_path / "run"
    cmd = ["bash", str(SLURM / "pretrain_1node.sbatch"), "train.max_steps=400", "train.checkpoint_every=400",
           "train.log_every=1"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, job)
        # SLURM signals the job step (srun's task: torchrun), not the batch shell
        step_pids = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(step_pids) == 1, step_pids
        os.kill(int(step_pids[0]), signal.SIGUSR1)
        out, err = job.communicate(timeout=180)
    finally:
        job.kill()
    assert job.returncode == 75, "a preempted job reports 75 (checkpointed, requeued), not success or a failure"
    stopped_at = int((run_dir / "preempted").read_text())
    assert 2 <= stopped_at < 400
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
    assert f"preempted at step {stopped_at}: requeueing job {JOB_ID}" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    # the requeued job: same script, same arguments, but a nearer end so the test stays short
    resumed = subprocess.run(cmd[:2] + [f"train.max_steps={stopped_at + 2}"] + cmd[3:], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "preempted").exists()
    assert steps(run_dir) == list(range(1, stopped_at + 3))  # no step lost, none repeated
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # requeued once only


@pytest.mark.parametrize("script", ["pretrain_1node.sbatch", "pretrain_multinode.sbatch"])
def test_srun_gets_the_allocations_cpus_per_task(tmp_path, script):
    """Since Slurm 22.05 srun does not take --cpus-per-task from sbatch: the scripts pass it on, so torchrun's
    ranks and data workers get the allocation's cores, not one."""
    env = slurm_env(tmp_path)
    (tmp_path / "bin" / "srun").write_text('#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n')
    for cpus, wanted in (("64", "--cpus-per-task=64 "), (None, None)):
        env.pop("SLURM_CPUS_PER_TASK", None)
        if cpus:
            env["SLURM_CPUS_PER_TASK"] = cpus
        env["SRUN_ARGS"] = str(tmp_path / f"srun-{cpus}.args")
        proc = subprocess.run(["bash", str(SLURM / script)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        args = Path(env["SRUN_ARGS"]).read_text()
        tasks = "--ntasks=1 --ntasks-per-node=1 "  # one node in this environment
        assert args.startswith("--kill-on-bad-exit=1 " + tasks + (wanted or "")) and "torch.distributed.run" in args
        assert wanted or "--cpus-per-task" not in args
