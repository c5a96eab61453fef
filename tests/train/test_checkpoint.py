"""Checkpoint trust boundary and integrity: nothing read back runs code, a changed byte is refused by
file name with the previous checkpoint offered, a full disk says so and keeps `latest`."""

import argparse
import errno
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from train_harness import metric_records, run_harness

from terrafm import checkpoint_io
from terrafm.checkpoint_io import CheckpointError, SafeLoadPlanner, hash_file, previous_checkpoint
from terrafm.cli import main
from terrafm.models import load_checkpoint
from terrafm.train import checkpoint
from terrafm.train.trainer import SetupError, train

RUN = ["train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.deterministic=true"]


class RunsCode:
    """Unpickling this touches a marker file: the stand-in for an attacker's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 1 and 2 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("ckpt")
    run_harness(out, *RUN)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "out")
    return tmp_path / "out"


def _rehash(folder: Path, name: str) -> None:
    """Update the manifest for `name`, as an attacker who rewrites files would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hash_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_rank_state_is_json_and_every_file_is_in_the_manifest(two_checkpoints):
    step2 = two_checkpoints / "run" / "checkpoints" / "step_00000002"
    state = json.loads((step2 / "rank_00000.json").read_text())
    assert state["step"] == 2 and set(state["rng"]) >= {"torch", "numpy", "python"}
    files = json.loads((step2 / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in step2.iterdir()} - {"manifest.json"}
    assert checkpoint_io.verify(step2) == []


def test_a_crafted_dcp_metadata_runs_no_code_on_resume_or_export(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    (step2 / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    _rehash(step2, ".metadata")  # the manifest cannot stop someone who writes the folder
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert "refused to load pathlib.Path.touch" in proc.stderr, proc.stderr
    assert ".metadata" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    assert not marker.exists()


def test_dcp_non_tensor_values_are_read_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lr": RunsCode(marker)}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SafeLoadPlanner().load_bytes(None, buf)
    assert not marker.exists()


def test_a_flipped_byte_is_refused_by_name_and_the_previous_checkpoint_offered(two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path)
    ckpts = out / "run" / "checkpoints"
    shard = ckpts / "step_00000002" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert "step_00000002 is corrupt (__0_0.distcp: sha256" in proc.stderr, proc.stderr
    offer = f"the previous checkpoint is {ckpts / 'step_00000001'}: pass it instead (`terrafm pretrain --resume-from`"
    assert offer in proc.stderr
    assert main(["export", str(out / "run"), str(tmp_path / "x.safetensors")]) == 2
    assert "__0_0.distcp: sha256" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: sha256"):
        load_checkpoint(out / "run")  # the eval path reads trainer checkpoints too


def test_missing_or_incompatible_checkpoints_exit_2_with_a_message(two_checkpoints, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "fresh"), "--resume-from", str(tmp_path / "nowhere")]) == 2
    assert "is not a checkpoint, a checkpoints/ folder or a run folder" in capsys.readouterr().err
    copy = tmp_path / "copy"  # `cp step_N/* copy/` leaves the hidden .metadata behind
    copy.mkdir()
    for f in (two_checkpoints / "run" / "checkpoints" / "step_00000002").iterdir():
        if not f.name.startswith("."):
            shutil.copy(f, copy / f.name)
    assert main(["export", str(copy), str(tmp_path / "x.safetensors")]) == 2
    assert f"{copy} holds a checkpoint's files but not its .metadata (a copy that skipped hidden files" in \
        capsys.readouterr().err
    out = _copy(two_checkpoints, tmp_path)
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", "ssl.head_hidden_dim=48", expect_rc=2)
    assert "does not fit this model and optimiser" in proc.stderr and "meta.json" in proc.stderr
    assert "ssl.head_hidden_dim: checkpoint " in proc.stderr and "this run 48" in proc.stderr  # names the key
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("meta", ['[1, 2]', '{"model": {"name": "terrafm_tiny", "img_size": "abc"}}'])
def test_an_edited_meta_json_is_one_message_for_resume_export_and_eval(two_checkpoints, tmp_path, capsys, meta):
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    (step2 / "meta.json").write_text(meta)
    _rehash(step2, "meta.json")  # consistent with the manifest: only the content is wrong
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert "meta.json: not a terrafm checkpoint's meta.json" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    assert "meta.json: not a terrafm checkpoint's meta.json" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a terrafm checkpoint's meta.json"):
        load_checkpoint(step2)


def test_a_meta_json_cut_short_is_a_corrupt_checkpoint_with_the_previous_one_offered(two_checkpoints, tmp_path,
                                                                                        capsys):
    """A meta.json that is no longer JSON (cut short, garbage) was "not a readable meta.json", without the word corrupt
    or the previous checkpoint that the same file edited into other JSON got: resume read it before the manifest."""
    out = _copy(two_checkpoints, tmp_path)
    ckpts = out / "run" / "checkpoints"
    step2 = ckpts / "step_00000002"
    (step2 / "meta.json").write_bytes((step2 / "meta.json").read_bytes()[:40])
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert "step_00000002 is corrupt (meta.json: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert f"the previous checkpoint is {ckpts / 'step_00000001'}" in proc.stderr
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    assert "step_00000002 is corrupt (meta.json: " in capsys.readouterr().err


def _edit(folder: Path, name: str, edit) -> None:
    """Change one JSON file of a checkpoint with `edit(record)`, keeping the manifest consistent."""
    record = json.loads((folder / name).read_text())
    edit(record)
    (folder / name).write_text(json.dumps(record))
    _rehash(folder, name)


@pytest.mark.parametrize("name, edit", [
    ("meta.json", lambda m: m.update(total_steps="2")),
    ("meta.json", lambda m: m.update(config=[1])),
    ("meta.json", lambda m: m.update(data=[1])),
    ("rank_00000.json", lambda r: r.update(state=[1])),
    ("rank_00000.json", lambda r: r["rng"].update(torch=5)),
    ("rank_00000.json", lambda r: r["state"].update(skipped_steps="0")),
    ("rank_00000.json", lambda r: r.update(step=-3)),  # resumed into step_-0000001 folders
], ids=["total_steps", "config", "data", "rank_state", "rng", "skipped_steps", "step"])
def test_a_field_of_another_form_in_meta_json_or_a_rank_state_is_one_message(two_checkpoints, tmp_path, name, edit):
    """Each of these passed the manifest and the old checks, then ended the resume in a traceback (exit 1)."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _edit(step2, name, edit)
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert f"cannot resume from {step2}: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step_00000002"


def test_rng_bytes_that_torch_refuses_are_named_as_the_rank_state(two_checkpoints, tmp_path):
    """torch's set_rng_state raises RuntimeError on bytes of another size: the message said the checkpoint did not
    fit the model and optimiser, and pointed at model.* and ssl.* settings."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _edit(step2, "rank_00000.json", lambda r: r["rng"].update(torch="00"))
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2)
    assert f"{step2 / 'rank_00000.json'}: its RNG states do not restore (RuntimeError" in proc.stderr, proc.stderr
    assert "does not fit this model" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda loader: loader.pop("batch_size"), "its loader state has no batch_size"),
    (lambda loader: loader.update(batch_size="4"), "its rank state's loader batch_size is '4', not a positive integer"),
    (lambda loader: loader.update(batch_size=-4), "its rank state's loader batch_size is -4, not a positive integer"),
    (lambda loader: loader.update(position="1"), "its loader state does not restore into this loader (TypeError"),
], ids=["no_batch_size", "string_batch_size", "negative_batch_size", "string_position"])
def test_an_elastic_resume_from_a_rank_state_with_a_loader_field_of_another_form_is_one_message(
        two_checkpoints, tmp_path, edit, message):
    """A checkpoint of another world size converts the loader position from its batch_size: a missing one read as
    "does not fit this model and optimiser" (the loader's KeyError; a KeyError traceback after a loader that does not
    need it), a string one and a string position were TypeError tracebacks in the loader, and a negative one
    resumed at a negative position."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _edit(step2, "meta.json", lambda m: m.update(world_size=2))
    _edit(step2, "rank_00000.json", lambda r: edit(r["state"]["loader"]))
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", "train.elastic_resume=true", expect_rc=2)
    assert f"cannot resume from {step2}: {message}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step_00000002"


def test_an_edited_input_statistic_in_meta_json_is_refused_by_export_and_eval(two_checkpoints, tmp_path, capsys):
    """meta.json's data entries are held to the form an export's metadata must have: a std of 0 went into the
    model's input_metadata (eval divides by it) and into an export that load_checkpoint then refused."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _edit(step2, "meta.json", lambda m: m.update(data={"std": {"s1": [0.0, 1.0]}}))
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    assert "meta.json's data 'std' is" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="meta.json's data 'std' is"):
        load_checkpoint(step2)


@pytest.mark.parametrize("edit, message", [
    (lambda model: model.update(name="terrafm_small"), "describes another model than its weights, so the export would "
                                                       "not load: .*x.safetensors does not match terrafm_small"),
    (lambda model: model.update(patch_size=8), "describes another model than its weights, so the export would not "
                                               "load: .*metadata says img_size .* / patch_size 8"),
    (lambda model: model.update(fusion_heads="abc"), "meta.json: model.fusion_heads is 'abc', not an integer"),
], ids=["name", "patch_size", "fusion_heads"])
def test_export_refuses_a_meta_json_whose_model_is_not_its_weights(two_checkpoints, tmp_path, capsys, edit, message):
    """An edited model section was written into exports that load_checkpoint then refused (exit 0), or ended in
    `invalid literal for int()` naming neither file nor key."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _edit(step2, "meta.json", lambda m: edit(m["model"]))
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.tmp").exists()


def test_export_keeps_an_existing_output_and_reports_write_errors(two_checkpoints, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    step2 = two_checkpoints / "run" / "checkpoints" / "step_00000002"
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"an earlier export")
    assert main(["export", str(step2), str(target)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and target.read_bytes() == b"an earlier export"
    dangling = tmp_path / "dangling.safetensors"  # was refused only after the whole export, as 'written meanwhile'
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(["export", str(step2), str(dangling)]) == 2
    assert f"output {dangling} is a symlink to nothing; pass --force" in capsys.readouterr().err
    assert main(["export", str(step2), str(tmp_path)]) == 2  # a folder: no .safetensors suffix
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["export", str(step2), str(tmp_path / ".safetensors")]) == 2  # only the suffix: a dotfile
    err = capsys.readouterr().err
    assert "needs a file name before .safetensors" in err and "must end in" not in err
    (tmp_path / "dir.safetensors").mkdir()
    assert main(["export", str(step2), str(tmp_path / "dir.safetensors")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(step2), str(target / "sub" / "y.safetensors")]) == 2  # under a file
    assert f"cannot write {target}/sub/y.safetensors: {target} is a file, not a folder" in capsys.readouterr().err

    def disk_error(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_error)
    assert main(["export", str(step2), str(target), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {target}" in err and "No space left" in err and "Traceback" not in err
    assert target.read_bytes() == b"an earlier export" and list(tmp_path.glob("*.tmp")) == []
    monkeypatch.undo()
    assert main(["export", str(step2), str(target), "--force"]) == 0
    assert target.read_bytes()[:8] != b"an earlie"


@pytest.mark.parametrize("where", ["rank_state", "dcp_shard"])
def test_a_full_disk_says_no_space_left_and_keeps_latest(tmp_path, monkeypatch, where):
    """ENOSPC at the second checkpoint, in our own rank-state write or inside DCP's writer threads."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm.config import load_config

    module, name = (checkpoint, "write_hashed") if where == "rank_state" else (dcp_filesystem, "_write_item")
    original = getattr(module, name)

    def disk_fills_at_the_second_checkpoint(*args, **kwargs):
        if (tmp_path / "run" / "checkpoints" / "step_00000001").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, disk_fills_at_the_second_checkpoint)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    with pytest.raises(SetupError, match=r"no space left on the device of .* writing checkpoint step_00000002: it "
                                         r"needs about \d+\.\d+ GB \(\d+\.\d+ GB free now\).*previous checkpoint is "
                                         r".*step_00000001.*No space left on device"):
        train(cfg, loader=SyntheticLoader(batch_size=4))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000001" and not list(ckpts.glob("*.tmp"))


@pytest.mark.parametrize("where", ["tmp_folder", "dcp_shard", "latest"])
def test_a_checkpoint_write_error_other_than_a_full_disk_is_one_message_and_keeps_latest(tmp_path, monkeypatch,
                                                                                          where):
    """EROFS (a file system remounted read-only), EIO, EFBIG at a save were a traceback and exit 1; only ENOSPC
    was a message. Any OSError now is one, naming the checkpoint, with `latest` on the previous one."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm.config import load_config

    second = tmp_path / "run" / "checkpoints" / "step_00000001"
    module, name = {"tmp_folder": (pathlib.Path, "mkdir"), "dcp_shard": (dcp_filesystem, "_write_item"),
                    "latest": (checkpoint, "atomic_write_bytes")}[where]
    original = getattr(module, name)

    def read_only_at_the_second_checkpoint(*args, **kwargs):
        hit = {"tmp_folder": str(args[0]).endswith("step_00000002.tmp"), "dcp_shard": second.exists(),
               "latest": args[1:] == (b"step_00000002",)}[where]
        if hit:
            raise OSError(errno.EROFS, "Read-only file system")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, read_only_at_the_second_checkpoint)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    ckpts = tmp_path / "run" / "checkpoints"
    if where == "latest":  # the step folder was published: it is complete, and the message says that --resume takes it
        with pytest.raises(SetupError, match=r"checkpoint .*step_00000002 is complete, but .*latest could not name "
                                             r"it \(.*Read-only file system\); --resume takes the newest"):
            train(cfg, loader=SyntheticLoader(batch_size=4))
        assert (ckpts / "latest").read_text() == "step_00000001" and not list(ckpts.glob("*.tmp"))
        monkeypatch.undo()
        cfg.train.max_steps = 3
        assert train(cfg, resume=True, loader=SyntheticLoader(batch_size=4)).step == 3
        assert [r["step"] for r in metric_records(tmp_path / "run")] == [1, 2, 3]
        return
    with pytest.raises(SetupError, match=r"cannot (write|finish) checkpoint step_00000002 in .*checkpoints "
                                         r"\(.*Read-only file system\).*previous checkpoint is .*step_00000001"):
        train(cfg, loader=SyntheticLoader(batch_size=4))
    assert (ckpts / "latest").read_text() == "step_00000001" and not list(ckpts.glob("*.tmp"))


def test_a_write_cut_short_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer reports a short write as 'unexpected pos' with no errno; a file-size limit (ulimit -f) ended
    in "no space left on the device ... (65 GB free now)", with the wrong advice."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm.config import load_config

    original = dcp_filesystem._write_item

    def short_write_at_the_second_checkpoint(*args, **kwargs):
        if (tmp_path / "run" / "checkpoints" / "step_00000001").exists():
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", short_write_at_the_second_checkpoint)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    with pytest.raises(SetupError, match=r"cannot write checkpoint step_00000002 in .*: a write stopped short "
                                         r"\(.*unexpected pos.*\) with .* GB free .*file-size limit.*previous "
                                         r"checkpoint is .*step_00000001") as caught:
        train(cfg, loader=SyntheticLoader(batch_size=4))
    assert "no space left" not in str(caught.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000001" and not list(ckpts.glob("*.tmp"))


def test_a_second_ctrl_c_inside_a_checkpoint_save_or_load_is_an_interrupt(tmp_path, monkeypatch):
    """DCP catches a KeyboardInterrupt in its save or load and raises a CheckpointException holding it: a second Ctrl-C
    during a save was a traceback (exit 1), during a resume "it does not fit this model" (exit 2). Both are the stop
    they are (KeyboardInterrupt: exit 130, `latest` untouched)."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm.config import load_config

    original = dcp_filesystem._write_item

    def ctrl_c_at_the_second_checkpoint(*args, **kwargs):
        if (tmp_path / "run" / "checkpoints" / "step_00000001").exists():
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", ctrl_c_at_the_second_checkpoint)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, loader=SyntheticLoader(batch_size=4))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000001"
    monkeypatch.undo()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp_filesystem.FileSystemReader, "read_data", ctrl_c)
    cfg.train.max_steps = 3
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, loader=SyntheticLoader(batch_size=4))
    monkeypatch.undo()
    assert train(cfg, resume=True, loader=SyntheticLoader(batch_size=4)).step == 3


def test_a_checkpoints_path_that_is_a_file_stops_the_run_before_training(tmp_path, capsys):
    """The run trained up to its first save, then died with FileExistsError (a traceback, exit 1)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.max_steps=1", "train.probe=false"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the run folder" in err and "checkpoints" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_folder_whose_name_is_not_utf8_is_refused_before_training(tmp_path, capsys):
    """--out with a byte Linux allows in names but UTF-8 does not (as os.fsdecode gives it, a lone surrogate): the
    run made the folder and then died with TensorBoard's UnicodeEncodeError (a traceback, exit 1)."""
    run = tmp_path / os.fsdecode(b"run\xff")
    assert main(["pretrain", "--out", str(run), "train.max_steps=1", "train.probe=false"]) == 2
    err = capsys.readouterr().err
    assert "its path is not UTF-8 text (byte 0xff" in err and "Traceback" not in err, err
    assert not run.exists()


def test_a_metadata_declaring_more_tensor_bytes_than_the_files_hold_is_refused(two_checkpoints, tmp_path, capsys):
    """An edited .metadata (manifest rehashed) with a huge tensor size: torch.empty of it was a RuntimeError
    traceback in export, before any read."""
    import dataclasses

    out = _copy(two_checkpoints, tmp_path)
    step = out / "run" / "checkpoints" / "step_00000002"
    metadata = checkpoint_io.read_metadata(step)
    key = next(k for k in metadata.state_dict_metadata if k.startswith("teacher.backbone.blocks.0"))
    item = metadata.state_dict_metadata[key]
    metadata.state_dict_metadata[key] = dataclasses.replace(item, size=torch.Size([2**40, 2**10]))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(step, ".metadata")
    with pytest.raises(CheckpointError, match=r"declares .* GB of teacher backbone tensors, more than its"):
        checkpoint_io.load_backbone_state(step)
    assert main(["export", str(step), str(tmp_path / "x.safetensors")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_pth_that_inflates_far_past_its_size_is_refused_before_loading(tmp_path, monkeypatch):
    """torch.load inflated compressed zip entries without a limit (40 KB -> 40 MB here; any size by design)."""
    import zipfile

    from terrafm import models

    monkeypatch.setattr(models, "MAX_INFLATED_BYTES", 2**20)
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(8 * 2**20))
    with pytest.raises(ValueError, match=r"bomb.pth: its zip entries expand to .* GiB from .* MiB"):
        load_checkpoint(tmp_path / "bomb.pth")


def test_the_restricted_unpickler_accepts_what_dcp_writes(two_checkpoints):
    step1 = two_checkpoints / "run" / "checkpoints" / "step_00000001"
    metadata = checkpoint_io.read_metadata(step1)
    assert any(k.startswith("teacher.backbone.") for k in metadata.state_dict_metadata)
    with pytest.raises(CheckpointError, match="not a readable DCP metadata file"):
        checkpoint_io.read_metadata(step1 / "nowhere")


def test_a_full_disk_at_the_start_of_a_resume_keeps_config_and_metrics(tmp_path, monkeypatch):
    """ENOSPC writing config.yaml or trimming metrics.jsonl when a run (re)starts: one SetupError, old files whole."""
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm import fileio
    from terrafm.config import load_config

    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    train(cfg, loader=SyntheticLoader(batch_size=4))
    run = tmp_path / "run"
    config, metrics = (run / "config.yaml").read_bytes(), (run / "metrics.jsonl").read_bytes()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')  # a torn last line (a kill mid-write): dropped on resume, no crash
    torn = (run / "metrics.jsonl").read_bytes()
    original = fileio.Path.write_bytes

    def full_disk(self, data):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(fileio.Path, "write_bytes", full_disk)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN,
                                              "train.max_steps=3"])
    with pytest.raises(SetupError, match=r"cannot write the run folder .*run: No space left on device"):
        train(cfg, resume=True, loader=SyntheticLoader(batch_size=4))
    assert (run / "config.yaml").read_bytes() == config and not list(run.glob("*.tmp"))
    assert (run / "metrics.jsonl").read_bytes() == torn  # whole as it was (`len(metrics) > 0` checked nothing)
    monkeypatch.undo()
    train(cfg, resume=True, loader=SyntheticLoader(batch_size=4))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3 and len(metrics) > 0
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics)  # the records before the resume, kept


@pytest.mark.parametrize("pointer", [b"\xff\xfe", b"", b"../elsewhere", None])
def test_a_bad_latest_pointer_is_one_checkpoint_error(two_checkpoints, tmp_path, capsys, pointer):
    out = _copy(two_checkpoints, tmp_path)
    latest = out / "run" / "checkpoints" / "latest"
    latest.unlink()
    if pointer is None:
        latest.mkdir()
    else:
        latest.write_bytes(pointer)
    with pytest.raises(CheckpointError, match="latest (is not a readable pointer|does not name a checkpoint)"):
        checkpoint_io.latest_checkpoint(out / "run" / "checkpoints")
    assert main(["export", str(out / "run"), str(tmp_path / "x.safetensors")]) == 2
    assert "latest" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_latest_pointer_that_is_a_fifo_or_a_device_is_refused_not_read(two_checkpoints, tmp_path, capsys, kind):
    """latest was read with read_text: a FIFO in its place hung export and eval until killed, and a symlink to /dev/zero
    read until memory ran out. (A daemon thread holds the read, so that the old code fails the test, not hangs it.)"""
    import os
    import threading

    out = _copy(two_checkpoints, tmp_path)
    latest = out / "run" / "checkpoints" / "latest"
    latest.unlink()
    os.mkfifo(latest) if kind == "fifo" else latest.symlink_to("/dev/zero")
    found = []

    def read() -> None:
        try:
            checkpoint_io.latest_checkpoint(out / "run" / "checkpoints")
        except CheckpointError as err:
            found.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and found, "reading the pointer blocked or ran on"
    assert "latest is not a readable pointer" in found[0] and ("FIFO" in found[0] or "device" in found[0]), found
    assert main(["export", str(out / "run" / "checkpoints" / "latest"), str(tmp_path / "x.safetensors")]) == 2
    assert "latest is not a readable pointer" in capsys.readouterr().err


def test_latest_naming_an_incomplete_checkpoint_names_the_missing_file(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    (out / "run" / "checkpoints" / "step_00000002" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"names step_00000002, which is not a complete checkpoint \(it lacks "
                                              r"meta.json\); the previous checkpoint is .*step_00000001"):
        checkpoint_io.latest_checkpoint(out / "run" / "checkpoints")


@pytest.mark.parametrize("manifest", ['{"files": {"meta.json": "x"}}', '{"files": [1]}',
                                      '{"files": {"meta.json": {"sha256": "00"}}}'])
def test_a_malformed_manifest_is_one_message(two_checkpoints, tmp_path, capsys, manifest):
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    (step2 / "manifest.json").write_text(manifest)
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    assert "manifest.json: not a checksum manifest" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a checksum manifest"):
        load_checkpoint(step2)


def test_a_checkpoint_of_another_size_names_the_shapes(tmp_path):
    from terrafm.models import build_model

    path = tmp_path / "tiny.pth"
    torch.save(build_model("terrafm_tiny", img_size=32).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match terrafm_small: \d+ tensors have other shapes, e.g. "
                                         r"cls_token \(1, 1, 192\) \(the model's \(1, 1, 384\)\)"):
        load_checkpoint(path, name="terrafm_small")


@pytest.mark.parametrize("keep, why", [(1000, ": its .metadata declares"),  # less than the backbone's bytes
                                       (0.3, " (EOFError, the data ends early)")])  # enough bytes, the wrong ones
def test_a_truncated_distcp_with_a_matching_manifest_is_one_message_for_export_and_eval(two_checkpoints, tmp_path,
                                                                                         capsys, keep, why):
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    shard = next(step2.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:keep if isinstance(keep, int) else int(keep * len(data))])
    _rehash(step2, shard.name)  # a copy cut short, then re-manifested: the checksums cannot tell
    target = tmp_path / "x.safetensors"
    assert main(["export", str(step2), str(target)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {step2}: its tensors do not read back{why}" in err
    assert "Traceback" not in err
    assert not target.exists()
    with pytest.raises(CheckpointError, match="its tensors do not read back"):
        load_checkpoint(step2)


def test_a_checkpoint_removed_while_it_is_read_is_said_so_for_resume_from_and_export(tmp_path, monkeypatch, capsys):
    """--resume-from, export and eval of a run that is still training: its rotation (train.keep_checkpoints) can
    remove the checkpoint they chose before they read it. That was "does not fit this model", "is corrupt ... there
    is no earlier checkpoint" or "has no manifest.json", with tracebacks from DCP, about a checkpoint that was fine."""
    from synthetic import TINY_OVERRIDES, SyntheticLoader

    from terrafm.config import load_config
    from terrafm.train import trainer

    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *RUN])
    train(cfg, loader=SyntheticLoader(batch_size=4))
    ckpts = tmp_path / "run" / "checkpoints"
    step2 = ckpts / "step_00000002"
    saved = tmp_path / "saved"
    shutil.copytree(step2, saved)
    removed = r"checkpoint .*step_00000002 was removed while it was read: the run writing into .*checkpoints keeps " \
              r"only its newest checkpoints \(train.keep_checkpoints\); the newest now is .*step_00000001"

    def rotated_before(function):
        def read(*args, **kwargs):
            shutil.rmtree(step2)  # the source run's rotation, between choosing the checkpoint and reading it
            return function(*args, **kwargs)
        return read

    monkeypatch.setattr(trainer, "restore", rotated_before(trainer.restore))
    other = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=other", *RUN,
                                                "train.max_steps=3"])
    with pytest.raises(SetupError, match="cannot resume: " + removed):
        train(other, resume=tmp_path / "run", loader=SyntheticLoader(batch_size=4))
    monkeypatch.undo()
    shutil.copytree(saved, step2)
    monkeypatch.setattr(checkpoint_io, "_load_backbone_state", rotated_before(checkpoint_io._load_backbone_state))
    target = tmp_path / "x.safetensors"
    assert main(["export", str(tmp_path / "run"), str(target)]) == 2
    err = capsys.readouterr().err
    assert re.search(removed, err) and "Traceback" not in err and not target.exists(), err


def test_export_without_force_never_replaces_a_file_written_meanwhile(two_checkpoints, tmp_path, monkeypatch, capsys):
    """The output was checked once at the start and then renamed over: two exports to one new name both said
    "wrote", and the file held one of them. A file that appears meanwhile is now kept, and the export refused."""
    from terrafm.train import export as export_module

    target = tmp_path / "x.safetensors"
    real = export_module.chmod_shared

    def another_export_publishes_first(path):
        target.write_bytes(b"the other export")
        return real(path)

    monkeypatch.setattr(export_module, "chmod_shared", another_export_publishes_first)
    assert main(["export", str(two_checkpoints / "run"), str(target)]) == 2
    err = capsys.readouterr().err
    assert f"output {target} exists (written meanwhile by another program); pass --force" in err
    assert target.read_bytes() == b"the other export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp left
    assert main(["export", "--force", str(two_checkpoints / "run"), str(target)]) == 0
    assert load_checkpoint(target) is not None


def test_a_resume_from_an_earlier_step_never_prunes_what_it_just_saved(tmp_path):
    """Retention kept the highest step numbers: a run resumed from an earlier step deleted its own newest save
    whenever `keep` folders of the abandoned continuation were numbered above it, and `latest` named a folder
    that was gone (the next --resume failed). The abandoned ones are now moved aside, not counted."""
    run_harness(tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                "train.deterministic=true")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_0000000{i}" for i in (2, 3, 4)]
    proc = run_harness(tmp_path, "--resume-from", str(ckpts / "step_00000002"), "train.max_steps=3",
                       "train.checkpoint_every=1", "train.keep_checkpoints=1", "train.deterministic=true")
    aside = ckpts / "abandoned_after_step_00000002"
    assert f"step_00000003, step_00000004 are later steps of an earlier continuation; moved to {aside}" in (
        proc.stdout + proc.stderr)
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003", "step_00000004"]  # nothing deleted
    assert (ckpts / "step_00000003").is_dir() and (ckpts / "latest").read_text() == "step_00000003"
    assert not (ckpts / "step_00000002").exists()  # keep 1: the earlier one goes
    proc = run_harness(tmp_path, "--resume", "train.max_steps=4", "train.checkpoint_every=1",
                       "train.keep_checkpoints=1", "train.deterministic=true")
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004"]


def test_retention_keeps_every_checkpoint_while_there_are_fewer_than_keep(tmp_path):
    """The slice of the checkpoints to remove went negative below `keep - 1` earlier ones and removed them."""
    run_harness(tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]


def test_checkpoints_of_an_abandoned_continuation_are_never_the_fallback_or_counted(tmp_path):
    """Resumed from step 2 with checkpoints at other steps than the first run's, its step 7 counted towards keep
    once the run passed it (pushing out the run's own step 4) and was offered as the previous checkpoint."""
    run_harness(tmp_path, "train.max_steps=7", "train.checkpoint_every=2", "train.keep_checkpoints=10")
    ckpts = tmp_path / "run" / "checkpoints"
    run_harness(tmp_path, "--resume-from", str(ckpts / "step_00000002"), "train.max_steps=8",
                "train.checkpoint_every=2", "train.keep_checkpoints=3")
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]
    assert "step_00000006" in previous_checkpoint(ckpts / "step_00000008")
    assert sorted(p.name for p in (ckpts / "abandoned_after_step_00000002").iterdir()) == [
        "step_00000004", "step_00000006", "step_00000007"]


def test_a_checkpoint_from_before_the_fusion_settings_resumes_only_with_its_own(two_checkpoints, tmp_path):
    """A meta.json without fusion_heads / fusion_norm was written with LEGACY_FUSION (16 heads, norm after the
    pooling); the run's default (norm on the values) loaded the same-shaped weights into another network and
    went on with one "settings changed" line."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    meta = json.loads((step2 / "meta.json").read_text())
    for section in (meta["model"], meta["config"]["model"]):
        del section["fusion_heads"], section["fusion_norm"]
    (step2 / "meta.json").write_text(json.dumps(meta))
    _rehash(step2, "meta.json")
    proc = run_harness(out, "--resume-from", str(step2), *RUN, "train.max_steps=3", expect_rc=2)
    assert ("its fusion was trained with model.fusion_heads=16, model.fusion_norm=pooled, this run's config has "
            "model.fusion_heads=16, model.fusion_norm=values" in proc.stderr), proc.stderr[-2000:]
    assert "resume with model.fusion_heads=16 model.fusion_norm=pooled" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "run" / "checkpoints" / "step_00000003").exists()
    run_harness(out, "--resume-from", str(step2), *RUN, "train.max_steps=3", "model.fusion_norm=pooled")
    resumed = json.loads((out / "run" / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert resumed["model"]["fusion_norm"] == "pooled"


def test_a_fused_checkpoint_does_not_resume_without_fusion(two_checkpoints, tmp_path):
    """model.fusion=false on a checkpoint with trained fusion weights loaded the rest in silence (DCP loads a subset)
    and every later checkpoint left the fusion out: once retention rotated the old ones, it was gone."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    assert json.loads((step2 / "meta.json").read_text())["model"]["fusion"] is True
    proc = run_harness(out, "--resume", *RUN, "train.max_steps=3", "model.fusion=false", "data.p_fused=0",
                       expect_rc=2)
    assert ("it holds trained fusion weights (model.fusion=true) and this run has model.fusion=false"
            in proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (out / "run" / "checkpoints" / "step_00000003").exists()

def _set_aside_on_rank(rank: int, root: str, port: int, results) -> None:
    import datetime
    import time

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    if rank == 1:
        time.sleep(1.0)  # a slower rank: it lists the folder after rank 0 has moved the later checkpoints
    names, target = checkpoint.set_aside_later(Path(root), 2)
    dist.barrier()  # the first collective after it: a rank that skipped the gather pairs with the wrong call
    results[rank] = (names, str(target))
    dist.destroy_process_group()


def test_every_rank_gets_rank_0s_set_aside_and_no_rank_skips_its_collective(tmp_path):
    """Each rank listed the folder itself: one listing after rank 0's move saw nothing, returned before the
    all-gather, and left rank 0 waiting in it (a timeout, or a hang until the collective timeout)."""
    import torch.multiprocessing as mp
    from train_harness import free_port

    for step in (1, 2, 3, 4):
        (tmp_path / checkpoint.step_dir_name(step)).mkdir()
    (tmp_path / "latest").write_text("step_00000004")
    results = mp.Manager().dict()
    mp.start_processes(_set_aside_on_rank, args=(str(tmp_path), free_port(), results), nprocs=2, join=True,
                       start_method="spawn")
    aside = str(tmp_path / "abandoned_after_step_00000002")
    assert dict(results) == {0: (["step_00000003", "step_00000004"], aside),
                             1: (["step_00000003", "step_00000004"], aside)}
    assert (tmp_path / "latest").read_text() == "step_00000002"


def test_a_kill_between_publishing_a_checkpoint_and_pointing_latest_at_it_loses_no_steps(tmp_path):
    """`save` renames step_N.tmp to step_N, then replaces `latest`: a run killed in between resumed from the
    checkpoint before (set aside the newer one and trained its steps again), or, at its first checkpoint, started
    over from step 0 and deleted that checkpoint when it saved the same step again."""
    args = ["train.checkpoint_every=2", "train.keep_checkpoints=3", "train.deterministic=true"]
    run_harness(tmp_path, "train.max_steps=4", *args)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "latest").write_text("step_00000002")  # killed before `latest` moved on to step 4
    proc = run_harness(tmp_path, "--resume", "train.max_steps=6", *args)
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in proc.stdout
    assert not list(ckpts.glob("abandoned_after_*"))
    assert (ckpts / "latest").read_text() == "step_00000006"

    first = tmp_path / "first"
    run_harness(first, "train.max_steps=2", *args)
    (first / "run" / "checkpoints" / "latest").unlink()  # killed before its first `latest` was written
    proc = run_harness(first, "train.max_steps=4", *args, expect_rc=2)
    assert "already has checkpoints; pass --resume" in proc.stderr
    proc = run_harness(first, "--resume", "train.max_steps=4", *args)
    assert f"resumed from {first / 'run' / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout


def test_resume_past_a_step_folder_without_manifest_is_refused_by_name(two_checkpoints, tmp_path):
    """save publishes a folder whole, manifest included: a step_N without one is a partial copy. --resume skipped
    it, and with no `latest` beside it started a fresh run over the folder (its save of step N then met it)."""
    root = _copy(two_checkpoints, tmp_path) / "run" / "checkpoints"
    partial = root / "step_00000009"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="step_00000009 without manifest.json.*resume from step_00000002"):
        checkpoint.resume_point(root)
    (root / "latest").unlink()
    shutil.rmtree(root / "step_00000001")
    shutil.rmtree(root / "step_00000002")
    with pytest.raises(CheckpointError, match="step_00000009 without manifest.json.*resume from the start"):
        checkpoint.resume_point(root)
    shutil.rmtree(partial)
    assert checkpoint.resume_point(root) is None


def test_a_resume_from_another_runs_checkpoint_into_a_folder_with_checkpoints_is_refused_and_loses_nothing(
        tmp_path):
    """--resume-from another run's checkpoint into a folder with checkpoints of its own set that folder's later steps
    aside as "an earlier continuation", let retention delete its earlier ones and replaced its metrics.jsonl and
    config.yaml (exit 0). Now it is refused before anything is touched; into a fresh folder it starts from that
    checkpoint, with none of an earlier attempt's records."""
    import hashlib

    args = ["train.checkpoint_every=2", "train.log_every=1", "train.deterministic=true"]
    run_harness(tmp_path / "old", "train.max_steps=4", *args)
    new = tmp_path / "new"
    run_harness(new, "train.max_steps=3", *args)

    def state() -> dict:  # .lock aside: each run that claims the folder writes its host and pid there
        return {str(p.relative_to(new)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(new.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    before = state()
    other = tmp_path / "old" / "run" / "checkpoints" / "step_00000004"
    proc = run_harness(new, "--resume-from", str(other), "train.max_steps=6", *args, expect_rc=2)
    assert f"{new / 'run'} already has checkpoints of its own; --resume-from {other} (another run's)" in proc.stderr
    assert "pass --resume to continue this run" in proc.stderr and "Traceback" not in proc.stderr
    assert state() == before
    fresh = tmp_path / "fresh"
    run_harness(fresh, "--resume-from", str(other), "train.max_steps=6", *args)
    assert [r["step"] for r in metric_records(fresh / "run")] == [5, 6]
    run_harness(fresh, "--resume", "train.max_steps=7", *args)
    assert [r["step"] for r in metric_records(fresh / "run")] == [5, 6, 7]  # its own checkpoint: its records stay


def test_resume_with_resume_from_continues_the_runs_own_checkpoint_even_without_latest(tmp_path, monkeypatch):
    """A requeued job passes --resume --resume-from X; a run killed after publishing its first step_N and before
    writing `latest` restarted from X instead of its own step_N."""
    from terrafm.checkpoint_io import MANIFEST
    from terrafm.train import cli

    own = tmp_path / "run" / "checkpoints" / "step_00000004"
    own.mkdir(parents=True)
    (own / MANIFEST).write_text("{}")
    seen = []
    monkeypatch.setattr(cli, "train_exit_code", lambda cfg, resume, loader=None: seen.append(resume) or 0)
    args = ["--out", str(tmp_path / "run"), "--resume", "--resume-from", str(tmp_path / "other" / "step_00000002")]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(args)) == 0
    assert seen == [True]


def test_export_names_a_non_finite_weight_and_a_negative_declared_size(two_checkpoints, tmp_path, capsys):
    """A NaN in the weights was blamed on meta.json ("describes another model than its weights"); a .metadata that
    declares a negative size was a RuntimeError traceback from torch.empty."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    _, state = checkpoint_io.load_backbone_state(step2)
    shard = next(step2.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    at = data.find(state["cls_token"].numpy().tobytes())
    assert at >= 0
    data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    shard.write_bytes(bytes(data))
    _rehash(step2, shard.name)
    target = tmp_path / "x.safetensors"
    assert main(["export", str(step2), str(target)]) == 2
    err = capsys.readouterr().err
    assert "weight cls_token (1, 1, 192) is not finite: 1 NaN or inf values" in err and "meta.json" not in err
    assert not target.exists()

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = checkpoint_io.read_metadata(step2)
    item = metadata.state_dict_metadata["teacher.backbone.cls_token"]
    assert isinstance(item, TensorStorageMetadata)
    item.size = torch.Size([1, -1, 192])
    (step2 / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(step2, ".metadata")
    assert main(["export", str(step2), str(target)]) == 2
    err = capsys.readouterr().err
    assert "declares teacher.backbone.cls_token of size (1, -1, 192), which no tensor has" in err
    assert "Traceback" not in err


def test_export_to_a_name_that_is_not_utf8_writes_a_file_that_loads(two_checkpoints, tmp_path):
    """safetensors takes only UTF-8 paths: an export into a Latin-1 folder name was refused at its load-back check."""
    step2 = two_checkpoints / "run" / "checkpoints" / "step_00000002"
    target = tmp_path / os.fsdecode(b"w\xff.safetensors")
    assert main(["export", str(step2), str(target)]) == 0
    exported = load_checkpoint(target).state_dict()
    _, state = checkpoint_io.load_backbone_state(step2)
    assert all(torch.equal(exported[k], v) for k, v in state.items() if k in exported) and "cls_token" in exported


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_dcp_metadata_naming_a_file_outside_its_folder_is_refused(two_checkpoints, tmp_path, capsys, where):
    """The unpickler limited the classes only: a .metadata whose storage entries name '../other/__0_0.distcp' or an
    absolute path made DCP read another checkpoint's (or any) file, past the manifest, which covers this folder."""
    out = _copy(two_checkpoints, tmp_path)
    step1, step2 = (out / "run" / "checkpoints" / f"step_0000000{i}" for i in (1, 2))
    victim = step1 / "__0_0.distcp"
    metadata = checkpoint_io.read_metadata(step2)
    for info in metadata.storage_data.values():
        info.relative_path = str(victim) if where == "absolute" else f"../{step1.name}/__0_0.distcp"
    (step2 / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(step2, ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: names the data file '.*__0_0\.distcp', which is not a "
                                              "file of this checkpoint folder"):
        checkpoint_io.load_backbone_state(step2)
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a file of this checkpoint folder" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_manifest_naming_a_path_is_not_a_manifest(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    manifest = json.loads((step2 / "manifest.json").read_text())
    manifest["files"]["../step_00000001/meta.json"] = manifest["files"]["meta.json"]
    (step2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a checksum manifest .*each name a file of this folder"):
        checkpoint_io.verify(step2)


@pytest.mark.parametrize("name", ["manifest.json", "meta.json", "rank_00000.json"])
def test_a_deeply_nested_or_non_file_json_in_a_checkpoint_is_one_message(two_checkpoints, tmp_path, capsys, name):
    """json raises RecursionError for nesting past the stack: a traceback for the manifest and meta.json, and a
    rank state's was called a checkpoint that 'does not fit this model and optimiser'. A FIFO in place of the file
    hung export until a writer came."""
    out = _copy(two_checkpoints, tmp_path)
    step2 = out / "run" / "checkpoints" / "step_00000002"
    (step2 / name).write_text("[" * 100000)
    if name != "manifest.json":
        _rehash(step2, name)
    if name == "rank_00000.json":  # read on resume only
        err = run_harness(out, "--resume", *RUN, "train.max_steps=3", expect_rc=2).stderr
    else:
        assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
    assert f"{name}: not a readable" in err and "nests its JSON too deeply" in err and "Traceback" not in err, err
    (step2 / name).unlink()
    os.mkfifo(step2 / name)
    assert main(["export", str(step2), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a FIFO (named pipe), not a regular file" in err or f"{name}: missing" in err, err
