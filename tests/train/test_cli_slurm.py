"""The sbatch scripts' own logic with stand-ins for srun and scontrol (no training): which requeue, how many
ranks, paths with spaces. tests/train/test_slurm.py runs them end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["pretrain_1node.sbatch", "pretrain_multinode.sbatch"]
SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""

# The Python the scripts check the config with (srun's stand-ins never start one): every config is good.
PYTHON = "#!/bin/bash\nexit 0\n"


def slurm_env(tmp_path: Path, srun: str, **env_extra: str) -> dict[str, str]:
    """The environment of a batch job with stand-ins for srun and scontrol first on PATH."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, text in (("srun", srun), ("scontrol", SCONTROL), ("python", PYTHON)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "GPUS_PER_NODE"}
    env.update(PATH=f"{shims}:{os.environ['PATH']}", PYTHON=str(shims / "python"), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node001", SLURM_JOB_NUM_NODES="1", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
               SRUN_ARGS=str(tmp_path / "srun.args"))
    env.update(env_extra)
    return env


def run_script(tmp_path: Path, script: str, srun: str, unset: tuple[str, ...] = (),
               **env_extra: str) -> subprocess.CompletedProcess:
    env = slurm_env(tmp_path, srun, **env_extra)
    for name in unset:
        env.pop(name)
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_job_that_fails_before_training_is_not_requeued_by_an_old_preemption_marker(tmp_path, script):
    """The marker of the preemption that requeued this job used to requeue it again when the job then failed
    before the trainer cleared it (corrupt checkpoint, node fault): an endless requeue loop."""
    run_dir = tmp_path / "run dir"  # a space: every use of RUN_DIR must be quoted
    run_dir.mkdir()
    (run_dir / "preempted").write_text("120\n")
    proc = run_script(tmp_path, script, "#!/bin/bash\nexit 1\n", RUN_DIR=str(run_dir))
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "scontrol.log").exists(), "requeued on a marker this job did not write"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_preempted_job_is_requeued(tmp_path, script):
    """The trainer's marker written during this job still requeues it (and a RUN_DIR with a space works)."""
    run_dir = tmp_path / "run dir"
    srun = '#!/bin/bash\nmkdir -p "$RUN_DIR" && echo 7 > "$RUN_DIR/preempted"\nexit 1\n'
    proc = run_script(tmp_path, script, srun, RUN_DIR=str(run_dir))
    assert proc.returncode == 75, "the trainer's code for preempted after a checkpoint (it used to be torchrun's 1)"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "preempted at step 7: requeueing job 4242" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_ranks_per_node_follow_the_allocations_gpus(tmp_path, script):
    """`sbatch --gpus-per-node=4 ...` used to start 8 ranks per node (the script's fixed default) on 4 GPUs."""
    srun = '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n'
    proc = run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--nproc_per_node=4 " in args and "parallel." not in args, args  # the mesh is the config's
    proc = run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), SLURM_GPUS_ON_NODE="4",
                      GPUS_PER_NODE="2")  # an explicit GPUS_PER_NODE still wins
    assert "--nproc_per_node=2 " in (tmp_path / "srun.args").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_config_file_gives_the_run_folder_its_name(tmp_path, script):
    """CONFIG=/path/to/exp.yaml made the default RUN_DIR runs//path/to/exp.yaml; it is runs/exp, like a preset's."""
    srun = '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n'
    proc = run_script(tmp_path, script, srun, CONFIG=str(tmp_path / "exp.yml"))
    assert proc.returncode == 0, proc.stderr
    assert "--out runs/exp --resume" in (tmp_path / "srun.args").read_text()
    proc = run_script(tmp_path, script, srun, CONFIG="vitl_h100")
    assert "--out runs/vitl_h100 --resume" in (tmp_path / "srun.args").read_text()


BAD_SETTINGS = [(script, name, value) for script in SCRIPTS for name, value in (
    ("GPUS_PER_NODE", "8x"), ("GPUS_PER_NODE", "0"), ("GPUS_PER_NODE", "99999999999999999999"),
    ("SLURM_GPUS_ON_NODE", "gpu:8"), ("SHUTDOWN_TIMEOUT", "-5"), ("SHUTDOWN_TIMEOUT", "1.5"),
    ("THREADS_PER_RANK", "0"), ("THREADS_PER_RANK", "4 "), ("SLURM_CPUS_PER_TASK", "64(x2)"))] + [
    ("pretrain_multinode.sbatch", name, value)  # the one-node script runs torchrun --standalone: no port
    for name, value in (("MASTER_PORT", "70000"), ("MASTER_PORT", "x"), ("SLURM_JOB_NUM_NODES", "two"))]


@pytest.mark.parametrize(("script", "name", "value"), BAD_SETTINGS)
def test_a_bad_setting_stops_the_script_before_it_changes_anything(tmp_path, script, name, value):
    """GPUS_PER_NODE=8x printed a bash arithmetic error, then removed the preemption marker and reached srun."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("120\n")
    proc = run_script(tmp_path, script, '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n', RUN_DIR=str(run_dir),
                      **{name: value})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"{script}: {name} must be a whole number from 1 to ")
    assert proc.stderr.endswith(f", got '{value}'\n") and len(proc.stderr.splitlines()) == 1
    assert proc.stdout == "" and (run_dir / "preempted").exists() and not (tmp_path / "srun.args").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_config_key_is_one_message_before_torchrun(tmp_path, script):
    """A bad override reached every rank under torchrun: one message per rank inside torchrun's failure report,
    and exit 1 (torchrun's) for the trainer's 2. The script checks the config first, with the ranks' command line."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("120\n")
    env = slurm_env(tmp_path, '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n', RUN_DIR=str(run_dir),
                    PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), "train.max_step=10"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("terrafm pretrain: configuration error: unknown config key 'train.max_step'")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (run_dir / "preempted").exists() and not (tmp_path / "srun.args").exists()

    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), "train.max_steps=10"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train.max_steps=10" in (tmp_path / "srun.args").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_good_settings_with_leading_zeros_are_decimal(tmp_path, script):
    srun = '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n'
    proc = run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="08",
                      SHUTDOWN_TIMEOUT="090", MASTER_PORT="029501")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--nproc_per_node=8 " in args and "--shutdown-timeout=90 " in args
    assert "8 ranks" in proc.stdout
    if script == "pretrain_multinode.sbatch":
        assert "--rdzv_endpoint=127.0.0.1:29501 " in args


@pytest.mark.parametrize("script", SCRIPTS)
def test_ranks_get_the_allocations_cores_as_threads(tmp_path, script):
    """OMP_NUM_THREADS was 8 whatever --cpus-per-task gave: a node of 128 cores ran its 8 ranks on 64 threads."""
    srun = '#!/bin/bash\necho "$OMP_NUM_THREADS" > "$SRUN_ARGS"\n'
    for env, threads in (({"SLURM_CPUS_PER_TASK": "128"}, "16"), ({"SLURM_CPUS_PER_TASK": "4"}, "1"),
                         ({}, "8"), ({"SLURM_CPUS_PER_TASK": "128", "THREADS_PER_RANK": "3"}, "3")):
        proc = run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="8", **env)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "srun.args").read_text() == f"{threads}\n", env
        assert f"; {threads} CPU threads per rank" in proc.stdout


@pytest.mark.parametrize(("script", "needed"), [
    ("pretrain_1node.sbatch", ("SLURM_JOB_ID",)),
    ("pretrain_multinode.sbatch", ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES")),
])
def test_outside_slurm_the_script_says_it_needs_sbatch(tmp_path, script, needed):
    """The multi-node script stopped with `SLURM_JOB_NODELIST: unbound variable` (exit 1); the one-node script
    removed the preemption marker and then failed to find srun."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("120\n")
    proc = run_script(tmp_path, script, "#!/bin/bash\nexit 0\n", unset=needed, RUN_DIR=str(run_dir))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr == (f"{script}: {' '.join(needed)} not set: it runs under SLURM "
                           f"(sbatch {'--nodes=N ' if len(needed) > 1 else ''}{ROOT}/scripts/slurm/{script})\n")
    assert (run_dir / "preempted").exists()
    if len(needed) > 1:  # each one missing is named on its own
        proc = run_script(tmp_path, script, "#!/bin/bash\nexit 0\n", unset=("SLURM_JOB_NODELIST",))
        assert proc.returncode == 2 and proc.stderr.startswith(f"{script}: SLURM_JOB_NODELIST not set: "), proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_sigterm_to_the_batch_shell_reaches_the_ranks_and_still_requeues(tmp_path, script):
    """scancel -b / --full or a preemption's grace time send SIGTERM to the batch shell itself: it died (143)
    before its requeue check, and with -b the ranks never heard of it. It passes SIGUSR1 on: srun forwards that
    one, while it answers a SIGTERM by SIGKILLing every task (Slurm's srun_job.c), which the stand-in does too."""
    import contextlib
    import signal
    import time

    run_dir = tmp_path / "run"
    srun = ('#!/bin/bash\ntrap \'mkdir -p "$RUN_DIR" && echo 9 > "$RUN_DIR/preempted"; exit 1\' USR1\n'
            'trap \'echo "srun: forcing job termination" >&2; exit 137\' TERM\n'
            'touch "$RUN_DIR.started"\nwhile :; do sleep 0.1; done\n')
    env = slurm_env(tmp_path, srun, RUN_DIR=str(run_dir))
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / script)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{run_dir}.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the batch shell only, as scancel -b
        out, err = proc.communicate(timeout=30)
    finally:  # the srun stand-in loops until it is told to stop
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, (proc.returncode, out, err)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "SIGTERM: passed on to the ranks as SIGUSR1" in out and "preempted at step 9" in out
    assert "forcing job termination" not in err


def test_each_multinode_job_has_its_own_rendezvous_port(tmp_path):
    """A fixed 29500: a second job on the same first node found the port taken and torchrun joined the first
    job's c10d store as a client (its fallback), so losing that job's store ended this one."""
    srun = '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n'
    for job, port in (("4242", 24242), ("1234567", 24567)):
        proc = run_script(tmp_path, "pretrain_multinode.sbatch", srun, RUN_DIR=str(tmp_path / "run"),
                          SLURM_JOB_ID=job)
        assert proc.returncode == 0, proc.stderr
        assert f"--rdzv_endpoint=127.0.0.1:{port} --rdzv_id={job} " in (tmp_path / "srun.args").read_text()
    proc = run_script(tmp_path, "pretrain_multinode.sbatch", srun, SLURM_JOB_ID="job7")
    assert proc.returncode == 2 and proc.stderr.startswith("pretrain_multinode.sbatch: SLURM_JOB_ID must be a whole")


def test_the_one_node_script_refuses_more_nodes(tmp_path):
    """`sbatch --nodes=2 pretrain_1node.sbatch` started two independent standalone runs in one RUN_DIR."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("120\n")
    proc = run_script(tmp_path, "pretrain_1node.sbatch", '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n',
                      RUN_DIR=str(run_dir), SLURM_JOB_NUM_NODES="2")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr == ("pretrain_1node.sbatch: SLURM_JOB_NUM_NODES is '2': it trains on one node "
                           "(more: pretrain_multinode.sbatch)\n")
    assert (run_dir / "preempted").exists() and not (tmp_path / "srun.args").exists()


@pytest.mark.parametrize("scontrol, message", [
    ("#!/bin/bash\necho 'scontrol: error: Invalid node name specified' >&2\nexit 1\n",
     "failed (scontrol: error: Invalid node name specified): no node to rendezvous on"),
    ("#!/bin/bash\nexit 0\n", "named no node: no node to rendezvous on"),
])
def test_a_node_list_scontrol_cannot_expand_stops_the_multinode_script(tmp_path, scontrol, message):
    """A failing scontrol ended the script with its own error and exit 1; one that printed nothing launched torchrun
    with --rdzv_endpoint=:PORT."""
    env = slurm_env(tmp_path, '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n', RUN_DIR=str(tmp_path / "run"))
    (tmp_path / "bin" / "scontrol").write_text(scontrol)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "pretrain_multinode.sbatch")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "srun.args").exists()


def test_the_one_node_script_reads_one_node_written_with_a_leading_zero(tmp_path):
    proc = run_script(tmp_path, "pretrain_1node.sbatch", '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n',
                      RUN_DIR=str(tmp_path / "run"), SLURM_JOB_NUM_NODES="01")
    assert proc.returncode == 0 and (tmp_path / "srun.args").exists(), proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_leave_the_mesh_to_the_config_and_start_one_task_per_node(tmp_path, script):
    """They passed parallel.dp_replicate=<nodes> parallel.dp_shard=<gpus> first: a config file's parallel section
    was dropped, and parallel.dp_shard=4 alone on 8 x 8 GPUs made 8 x 4 = 32 of 64 ranks (every rank stopped).
    srun took sbatch --ntasks-per-node=8 from the job: eight torchruns in one RUN_DIR."""
    srun = '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n'
    proc = run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), SLURM_NTASKS="8",
                      SLURM_NTASKS_PER_NODE="8")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text()
    assert args.startswith("--kill-on-bad-exit=1 --ntasks=1 --ntasks-per-node=1 "), args
    assert "parallel." not in args and "dp_replicate=" not in proc.stdout
    run_script(tmp_path, script, srun, RUN_DIR=str(tmp_path / "run"), CONFIG="flat.yaml")
    assert (tmp_path / "srun.args").read_text().rstrip().endswith(" --resume")  # no argument after the user's


def test_the_multinode_script_starts_one_task_on_each_node_and_keeps_nccl_settings(tmp_path):
    srun = '#!/bin/bash\necho "$@ IB=$NCCL_IB_DISABLE" > "$SRUN_ARGS"\n'
    proc = run_script(tmp_path, "pretrain_multinode.sbatch", srun, RUN_DIR=str(tmp_path / "run"),
                      SLURM_JOB_NUM_NODES="4", NCCL_IB_DISABLE="1")  # an Ethernet-only cluster
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--ntasks=4 --ntasks-per-node=1 " in args and args.strip().endswith("IB=1"), args


def test_a_warning_scontrol_prints_is_not_taken_for_a_node(tmp_path):
    """`hostnames` read stderr too: a slurm.conf parse warning became the rendezvous host."""
    env = slurm_env(tmp_path, '#!/bin/bash\necho "$@" > "$SRUN_ARGS"\n', RUN_DIR=str(tmp_path / "run"))
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\necho 'scontrol: warning: Parse warning in "
                                               "/etc/slurm/slurm.conf line 12' >&2\necho gpu01\necho gpu02\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "pretrain_multinode.sbatch")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--rdzv_endpoint=gpu01:24242 " in (tmp_path / "srun.args").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_refused_requeue_says_how_to_continue_and_reports_the_stop(tmp_path, script):
    """Under salloc, --no-requeue or a site policy `scontrol requeue` fails: set -e ended the job with its 1, and the
    log's last word was "requeueing", as if a checkpointed stop were a crash."""
    run_dir = tmp_path / "run"
    srun = '#!/bin/bash\nmkdir -p "$RUN_DIR" && echo 7 > "$RUN_DIR/preempted"\nexit 1\n'
    env = slurm_env(tmp_path, srun, RUN_DIR=str(run_dir))
    (tmp_path / "bin" / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo 127.0.0.1 && exit 0\n'
                                               'echo "scontrol: error: Job is no longer requeueable" >&2\nexit 1\n')
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, (proc.stdout, proc.stderr)
    assert f"{script}: scontrol requeue 4242 failed: the run stopped at its checkpoint; submit the same command " \
           "again to continue it (--resume)" in proc.stderr
