"""The trainer's guards: non-finite gradient norms, schedule changes on resume, bad output folders and
bad values refused before anything heavy is built, each with exit code 2 (or 1) and one message."""

import os

import pytest
from train_harness import metric_records, run_harness

import terrafm.models
import terrafm.ssl.meta_arch  # imported before any patch of build_model, so its own binding is the real one
from terrafm.cli import main

RUN = ["train.max_steps=4", "train.checkpoint_every=2", "train.deterministic=true"]


def test_an_infinite_gradient_norm_skips_the_step_and_is_counted(tmp_path):
    proc = run_harness(tmp_path, "--inf-grad-steps", "1", *RUN)
    # the optimiser step of 0-based index 1 is the second: numbered as metrics.jsonl numbers it (it said "step 1")
    assert "step 2: gradient norm is inf with a finite loss; AdamW step skipped (1 in a row, 1 in all)" in proc.stdout
    records = metric_records(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1] and records[1]["step"] == 2
    grad_norms = [r["grad_norm"] for r in records]  # metrics.jsonl is strict JSON: the inf norm is written null
    assert grad_norms[1] is None and all(isinstance(g, float) for g in grad_norms[:1] + grad_norms[2:])
    run_harness(tmp_path, "--resume", *RUN, "train.max_steps=5")  # the count is part of the checkpoint
    assert metric_records(tmp_path / "run")[-1]["skipped_steps"] == 1


def test_too_many_non_finite_gradient_norms_in_a_row_stop_the_run_naming_the_step(tmp_path):
    proc = run_harness(tmp_path, "--inf-grad-steps", "2,3", *RUN, "train.max_nonfinite_grad_steps=2", expect_rc=1)
    assert "gradient norm non-finite for 2 steps in a row, the last at step 3" in proc.stderr
    assert "the last good checkpoint is" in proc.stderr and "step_00000002" in proc.stderr


def test_a_resume_that_changes_max_steps_says_what_happens_to_the_schedules(tmp_path):
    run_harness(tmp_path, *RUN)
    proc = run_harness(tmp_path, "--resume", *RUN, "train.max_steps=6")
    assert ("resume: the schedules were laid out over 4 steps, this run has 6; the lr, weight-decay and "
            "teacher-momentum cosines are re-stretched over 6 steps from step 4") in proc.stdout
    assert "Set train.max_steps=4 to keep the original schedules" in proc.stdout
    same = run_harness(tmp_path / "again", *RUN)
    assert "schedules were laid out" not in same.stdout
    done = run_harness(tmp_path, "--resume", *RUN, "train.max_steps=2")  # the run is at step 6 already
    assert "is at step 6, at or past this run's 2 steps" in done.stdout and "re-stretched" not in done.stdout


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if a model is built: the checks under test must come first."""
    def build_model(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(terrafm.models, "build_model", build_model)
    monkeypatch.setattr(terrafm.ssl.meta_arch, "build_model", build_model)


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_unwritable_output_folder_is_refused_before_anything_is_built(tmp_path, capsys, nothing_is_built, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "is_a_file" else blocker / "run"
    assert main(["pretrain", "--out", str(out), "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the run folder {out} ({blocker} is a file, not a folder)" in err
    assert "choose a writable folder" in err


@pytest.mark.parametrize("args, message", [
    (["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["model.name=vit_huge"], "model.name 'vit_huge' is not a model; choose one of terrafm_tiny"),
    (["model.fusion=false"], "model.fusion=false has no fusion parameters, but data.p_fused=0.5"),
    (["data.global_size=70"], "data.global_size=70 and data.local_size=32 must be multiples of model.patch_size=16"),
    (["data.shard_dir=/nonexistent/shards"], "shard directory /nonexistent/shards does not exist; set data.shard_dir"),
])
def test_bad_values_and_paths_exit_2_with_one_message(tmp_path, capsys, nothing_is_built, args, message):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a run that never started leaves no empty folder


def test_a_device_or_optimiser_this_machine_lacks_is_a_setup_error(tmp_path, capsys, nothing_is_built, monkeypatch):
    from terrafm import backends

    monkeypatch.setattr(backends, "cuda", lambda: backends.Availability(False, "no CUDA device visible"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.device=cuda"]) == 2  # fix the setup, not 1
    assert "train.device=cuda but CUDA is not usable: no CUDA device visible" in capsys.readouterr().err


def test_deterministic_mode_on_cuda_is_a_setup_error(tmp_path, capsys, nothing_is_built, monkeypatch):
    """train.deterministic=true was taken on CUDA, where torch refuses the bicubic resize's backward of the position
    embedding (local crops) at the first step: a run that had set up, compiled and loaded its data, then failed."""
    from terrafm import backends

    monkeypatch.setattr(backends, "cuda", lambda: backends.Availability(True, "stand-in GPU"))
    for device in ("cuda", "auto"):
        assert main(["pretrain", "--out", str(tmp_path / "run"), f"train.device={device}",
                     "train.deterministic=true"]) == 2
        err = capsys.readouterr().err
        assert "train.deterministic=true runs on the cpu only" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_more_ranks_on_a_node_than_visible_gpus_is_a_setup_error(tmp_path, capsys, nothing_is_built, monkeypatch):
    import torch

    from terrafm import backends

    monkeypatch.setattr(backends, "cuda", lambda: backends.Availability(True, "stand-in GPU"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 1 of 8 on a node that shows 4 GPUs (GPUS_PER_NODE=8 on 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "8 ranks on this node, one GPU each, but 4 GPU(s) are visible (CUDA_VISIBLE_DEVICES=0,1,2,3)" in err
    assert "start at most 4 per node" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # `terrafm pretrain --nproc 8`: refused before torchrun starts
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("torchrun was started"))
    assert main(["pretrain", "--nproc", "8", "--out", str(tmp_path / "run"), "train.device=cuda"]) == 2
    assert "configuration error: --nproc 8: 8 ranks on this node, one GPU each, but 4 GPU(s)" in capsys.readouterr().err


def test_a_batch_larger_than_the_dataset_names_data_batch_size(tmp_path):
    proc = run_harness(tmp_path, "--batch", "32", *RUN, expect_rc=2)
    assert "data.batch_size=32 is more than each of the 1 rank(s) gets from the dataset" in proc.stderr


@pytest.mark.slow  # builds the default tiny_cpu run, which stops at its first batch (~20 s on 2 cores)
def test_a_corrupt_shard_met_during_training_exits_2_naming_the_file(tmp_path, capsys):
    import shutil

    from terrafm.data.sample import ensure_sample_shards

    shards = tmp_path / "shards"
    shutil.copytree(ensure_sample_shards(), shards)
    for part in shards.glob("part-*.bin"):
        data = bytearray(part.read_bytes())
        data[::4096] = bytes(b ^ 0xFF for b in data[::4096])  # a flipped byte in every tile
        part.write_bytes(bytes(data))
    assert main(["pretrain", "--out", str(tmp_path / "run"), f"data.shard_dir={shards}", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "part-0000" in err and ".bin: record" in err and "and re-run the same `terrafm prepare` command" in err


def test_a_run_folder_in_use_by_another_run_is_refused_and_left_as_it_was(tmp_path):
    import fcntl

    run_harness(tmp_path, *RUN)
    run = tmp_path / "run"
    metrics, config = (run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()
    with open(run / ".lock", "w") as other:  # the same sbatch submitted twice: the first job is still training
        other.write("host node7, pid 4242, SLURM job 99\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX)
        proc = run_harness(tmp_path, "--resume", *RUN, "train.max_steps=6", "optim.lr=1e-4", expect_rc=2)
        assert f"{run} is in use by another run (host node7, pid 4242, SLURM job 99)" in proc.stderr
        assert "Traceback" not in proc.stderr
        # refused before its checkpoints are read: the first run may be rotating one out (it restored half a
        # checkpoint and failed as "does not fit this model and optimiser")
        rotating = run / "checkpoints" / "step_00000004" / ".metadata"
        rotating.rename(run / "aside")
        proc = run_harness(tmp_path, "--resume", *RUN, "train.max_steps=6", expect_rc=2)
        assert f"{run} is in use by another run" in proc.stderr and "cannot resume" not in proc.stderr, proc.stderr
        (run / "aside").rename(rotating)
        assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "config.yaml").read_bytes() == config
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002",
                                                                           "step_00000004"]
    run_harness(tmp_path, "--resume", *RUN, "train.max_steps=6")  # that run ended (or was killed): the lock is free
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3, 4, 5, 6]
    assert "pid" in (run / ".lock").read_text()


def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_was(tmp_path, capsys, nothing_is_built):
    """--out at a folder that is not a run (a project folder): its config.yaml, metrics.jsonl and curves.png were
    overwritten by the run's, with exit 0, with or without --resume."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name, text in (("config.yaml", "my project config\n"), ("metrics.jsonl", "my notes\n"), ("README", "x")):
        (folder / name).write_text(text)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for resume in ([], ["--resume"]):
        assert main(["pretrain", "--out", str(folder), *resume, "train.max_steps=1"]) == 2
        err = capsys.readouterr().err
        assert f"{folder} holds files that are not a terrafm run's (README, config.yaml, metrics.jsonl)" in err
        assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .lock either


def test_what_makes_an_existing_folder_a_runs(tmp_path):
    """Empty, or holding the lock, checkpoints/ or a config.yaml of a terrafm config (a run copied with cp -r dir/*,
    which leaves the hidden .lock behind, still resumes)."""
    from terrafm.config import load_config, save_config
    from terrafm.train.trainer import foreign_folder

    folder = tmp_path / "run"
    folder.mkdir()
    assert foreign_folder(folder) is None
    (folder / "notes.txt").write_text("x")
    assert "notes.txt" in foreign_folder(folder)
    save_config(load_config("tiny_cpu"), folder / "config.yaml")
    assert foreign_folder(folder) is None
    (folder / "config.yaml").write_text("- a list, not a config\n")
    assert foreign_folder(folder) is not None
    for marker in (".lock", "checkpoints"):
        (folder / marker).mkdir()
        assert foreign_folder(folder) is None
        (folder / marker).rmdir()


def test_out_dot_names_the_folder_it_is(tmp_path, capsys, monkeypatch):
    """--out . recorded run_name '' (the run's own config.yaml was then refused by --config)."""
    import yaml

    here = tmp_path / "myrun"
    (here / "sub").mkdir(parents=True)
    for out, cwd in ((".", here), ("..", here / "sub"), ("sub/..", here)):
        monkeypatch.chdir(cwd)
        assert main(["pretrain", "--out", out, "--print-config"]) == 0
        train = yaml.safe_load(capsys.readouterr().out)["train"]
        assert (train["out_dir"], train["run_name"]) == (str(tmp_path), "myrun"), out
    assert main(["pretrain", "--out", "/", "train.max_steps=1"]) == 2
    assert "--out / is the file system's root" in capsys.readouterr().err


def test_an_empty_resume_from_is_refused_not_a_fresh_run(tmp_path, capsys, nothing_is_built):
    """An unset $CKPT in a job script (--resume-from "") trained from scratch with exit 0."""
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume-from", "", "train.max_steps=1"]) == 2
    assert "--resume-from is empty (an unset variable?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_integers_past_64_bits_and_yaml_files_in_upper_case_are_handled(tmp_path, capsys, nothing_is_built):
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.grad_accum_steps=99999999999999999999"]) == 2
    assert "'train.grad_accum_steps': 99999999999999999999 does not fit in a 64-bit integer" in capsys.readouterr().err
    config = tmp_path / "MY.YAML"
    config.write_text("train:\n  max_steps: 7\n")
    assert main(["pretrain", "--config", str(config), "--print-config"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_a_deeply_nested_config_yaml_or_metrics_line_is_read_as_foreign_not_a_traceback(tmp_path):
    """A config.yaml nested past the stack in an --out folder, or such a line in metrics.jsonl on resume, raised
    RecursionError out of the checks that read them (a traceback)."""
    from terrafm.train.metrics import _step, plot_curves
    from terrafm.train.trainer import foreign_folder

    (tmp_path / "config.yaml").write_text("[" * 100000)
    assert "holds files that are not a terrafm run's (config.yaml)" in foreign_folder(tmp_path)
    (tmp_path / "config.yaml").unlink()
    os.mkfifo(tmp_path / "config.yaml")  # read as unreadable, not waited on
    assert "holds files that are not a terrafm run's (config.yaml)" in foreign_folder(tmp_path)
    deep = "[" * 100000
    assert _step(deep) == float("inf")
    (tmp_path / "metrics.jsonl").write_text(deep + "\n")
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None


def test_the_non_finite_gradient_message_says_to_start_again_when_there_is_no_checkpoint():
    """It said "no checkpoint was written yet. Resume from it with a lower optim.lr", 'it' naming nothing."""
    from pathlib import Path

    from terrafm.train.trainer import _nonfinite_grad_message

    none = _nonfinite_grad_message(3, 5, 1e-3, 3, None)
    assert "no checkpoint was written yet. Start again with a lower optim.lr" in none and "Resume" not in none
    some = _nonfinite_grad_message(3, 5, 1e-3, 3, Path("ck/step_00000004"))
    assert "the last good checkpoint is ck/step_00000004. Resume from it with a lower optim.lr" in some
