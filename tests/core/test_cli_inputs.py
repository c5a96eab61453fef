"""Bad input to `terrafm`: one message on stderr, exit 2, no traceback; conflicting flags are resolved or refused."""

import subprocess
import sys
from pathlib import Path

import pytest

from terrafm.cli import main
from terrafm.config import ConfigError, load_config


@pytest.mark.parametrize("override, message", [
    ("data.global_scale=0.5", "expected a list of 2 values, got 0.5"),
    ("data.modalities=s2_l2a", "expected a list of str, got 's2_l2a'"),
])
def test_a_scalar_for_a_list_says_what_list_is_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full to fill the disk")
@pytest.mark.parametrize("args", [["--version"], ["pretrain", "--print-config"]])
def test_output_to_a_full_disk_is_one_message_and_exit_2(args):
    """`terrafm pretrain --print-config > cfg.yaml` on a full disk: no ENOSPC traceback."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "terrafm.cli", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["terrafm: No space left on device writing the output; free some "
                                                "space and rerun"]


@pytest.mark.parametrize("override", ["train.run_name=exp2", "train.out_dir=/scratch/runs", "train={run_name: x}"])
def test_out_and_a_run_folder_override_together_are_refused(tmp_path, capsys, override):
    """--out used to win silently over the override (e.g. `sbatch pretrain_1node.sbatch train.run_name=exp2`)."""
    assert main(["pretrain", "--out", str(tmp_path / "run"), override, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert "both name the run folder" in captured.err and override.split("=")[0] in captured.err
    assert captured.out == ""


def test_resume_with_resume_from_continues_the_runs_own_checkpoint_once_it_has_one(tmp_path, monkeypatch):
    """The SLURM scripts always pass --resume; a job started with --resume-from CKPT and requeued must continue
    from its own latest checkpoint, not restart from CKPT (which lost every step since, on every requeue)."""
    import terrafm.train.cli as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "train_exit_code", lambda cfg, resume: seen.append(resume) or 0)
    run, ckpt = tmp_path / "run", str(tmp_path / "other" / "checkpoints" / "step_00000100")
    args = ["pretrain", "--out", str(run), "--resume", "--resume-from", ckpt]
    assert main(args) == 0
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    assert main(args) == 0
    assert main(["pretrain", "--out", str(run), "--resume-from", ckpt]) == 0  # without --resume: CKPT, as asked
    assert seen == [ckpt, True, ckpt]


def test_running_out_of_memory_is_one_message_and_exit_2(monkeypatch, capsys):
    """`ssl.num_prototypes=1000000000000` (a typo) ended in the CPU allocator's traceback and exit 1."""
    import terrafm.train.trainer as trainer
    from terrafm.train.cli import train_exit_code

    def no_memory(cfg, resume, loader):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4000000000000 bytes.\nmore lines")

    monkeypatch.setattr(trainer, "train", no_memory)
    assert train_exit_code(load_config(), False) == 2
    err = capsys.readouterr().err
    assert err.startswith("terrafm pretrain: out of memory ([enforce fail") and "ssl.num_prototypes" in err
    assert len(err.strip().splitlines()) == 1

    def bug(cfg, resume, loader):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(trainer, "train", bug)  # any other error keeps its traceback: it is a bug to report
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_exit_code(load_config(), False)


@pytest.mark.parametrize("args", [
    ["prepare", "in", "--out", ""],  # wrote index.json and part files into the current folder
    ["prepare", "", "--out", "shards"],
    ["eval", "--checkpoint", "c.pth", "--data", "", "--format", "hdf5", "--out", "e"],
    ["eval", "--checkpoint", "c.pth", "--data", "d", "--format", "hdf5", "--out", ""],  # wrote into the cwd
    ["export", "", "out.safetensors"],
])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch, capsys, args):
    """An unset shell variable (`--out $SHARDS`) reached the commands as '' and meant the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "is empty (an unset variable?)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_or_file_shard_dir_is_refused(tmp_path):
    """data.shard_dir= (an unset variable) trained on the synthetic sample, exit 0; a file 'did not exist'."""
    with pytest.raises(ConfigError, match="shard_dir is empty"):
        load_config(None, ["data.shard_dir="])
    from terrafm.data.shards import ShardError, ShardSet

    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ShardError, match="is a file, not a folder"):
        ShardSet(tmp_path / "index.json")
