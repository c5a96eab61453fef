"""The training loop in-process: monitors are logged, NaN and collapse stop the run clearly, the CLI and export work."""

import errno
import json
import math
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from synthetic import TINY_OVERRIDES, SyntheticLoader
from train_harness import metric_records

from terrafm.cli import main
from terrafm.config import load_config
from terrafm.data.prepare import convert
from terrafm.data.sample import ensure_sample_shards
from terrafm.data.shards import ShardSet
from terrafm.models import build_model, load_checkpoint
from terrafm.ssl.monitors import collapse_state
from terrafm.train.trainer import CollapseError, NonFiniteLossError, SetupError, train


def tiny_config(tmp_path, *overrides):
    return load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", *overrides])


def test_trainer_logs_the_collapse_monitors_and_stops_on_collapse_when_told(tmp_path, capsys):
    """Plumbing only (learning itself: test_learning.py): every record carries the monitors, and a
    collapse diagnosis after warm-up stops the run under train.stop_on_collapse. A gap threshold no
    batch can reach makes the diagnosis certain."""
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=100", "data.batch_size=8",
                      "train.collapse_gap=100", "train.stop_on_collapse=true")
    with pytest.raises(CollapseError, match=r"stopped at step \d \(train.stop_on_collapse\): (collapse|uniform)"):
        train(cfg, loader=SyntheticLoader(num_samples=16, batch_size=8))
    out, err = capsys.readouterr()
    assert "warning at step" in out + err
    assert (tmp_path / "run" / "curves.png").exists()  # drawn when a run stops, not only when it ends
    records = metric_records(tmp_path / "run")
    assert records  # the loop below checked nothing for a run that logged no record
    for r in records:
        assert 0 <= r["teacher_entropy"] <= math.log(256) + 1e-4 and r["teacher_prototypes"] >= 1
        assert r["teacher_entropy_gap"] == pytest.approx(r["teacher_batch_entropy"] - r["teacher_entropy"])
        assert -1 <= r["teacher_cosine"] <= 1


class NaNLoader(SyntheticLoader):
    """Serves a NaN pixel from its `bad`-th batch on (1-based)."""

    def __init__(self, bad: int, **kwargs):
        super().__init__(**kwargs)
        self.bad, self.served = bad, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.served += 1
            if self.served >= self.bad:
                batch.global_views[0]["s2_l2a"][0, 0, 0, 0] = float("nan")
            yield batch


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 .*last good checkpoint is .*step_00000002"):
        train(cfg, loader=NaNLoader(3))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002" and not list(ckpts.glob("*.tmp"))


def test_nan_loss_before_any_checkpoint_points_at_the_inputs_or_at_a_fresh_start(tmp_path):
    """Both used to end "no checkpoint was written yet. Resume from it with a lower optim.lr": no checkpoint to resume
    from, and at step 0 no update has been made, so the lr is not what made the loss NaN."""
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=4")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 0 .*no step has updated the initial weights: "
                                                 r"look at the inputs first") as caught:
        train(cfg, loader=NaNLoader(1))
    assert "Resume from it" not in str(caught.value)
    cfg = tiny_config(tmp_path / "later", "train.max_steps=6", "train.checkpoint_every=4")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1 .*no checkpoint was written yet. Start again "
                                                 r"with a lower optim.lr") as caught:
        train(cfg, loader=NaNLoader(2))
    assert "Resume from it" not in str(caught.value)


def test_a_full_disk_when_the_run_claims_its_folder_names_the_folder(tmp_path, monkeypatch):
    """The lock line was buffered: its failed flush raised the run folder's message, then closing the file at the end of
    the run raised ENOSPC again, which replaced it with the generic "terrafm: No space left on device writing the
    output"."""
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SetupError, match=r"cannot write the run folder .*run: No space left on device"):
        train(tiny_config(tmp_path, "train.max_steps=1"), loader=SyntheticLoader(batch_size=4))


def test_a_name_too_long_is_one_message(tmp_path, capsys):
    """ENAMETOOLONG from the run folder's first stat was a traceback and exit 1."""
    long = tmp_path / ("y" * 256)
    for args in (["--out", str(long)], ["--out", str(tmp_path / "run"), "--resume-from", str(long)],
                 ["--out", str(long), "--resume"]):
        assert main(["pretrain", *args, "train.max_steps=1", "train.probe=false"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("terrafm: file name too long: ") and "yyyy" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_lasting_collapse_warns_once_not_at_every_logged_step(tmp_path, capsys):
    """The warning was repeated whenever its printed numbers changed (a gap of 0.000 and then -0.000): once per
    change of state (healthy, collapse, uniform targets) is what the docs promise."""
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=100", "data.batch_size=8",
                      "train.collapse_gap=100", "train.log_every=1", "optim.warmup_epochs=0")
    train(cfg, loader=SyntheticLoader(num_samples=16, batch_size=8))
    out, err = capsys.readouterr()
    warned = [int(line.split("warning at step ", 1)[1].split(":", 1)[0]) for line in (out + err).splitlines()
              if "warning at step" in line]
    records = metric_records(tmp_path / "run")
    states = [collapse_state(r, cfg.ssl.num_prototypes, 100.0).split(":", 1)[0] for r in records]  # none healthy
    changes = [r["step"] for i, r in enumerate(records) if i == 0 or states[i] != states[i - 1]]
    assert warned == changes and len(warned) < len(records), (warned, states)
    assert all(type(r["teacher_prototypes"]) is int for r in records)  # a count, logged as one


def test_cli_reports_a_bad_key_with_the_valid_ones(capsys):
    assert main(["pretrain", "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_step'" in err and "max_steps" in err


def test_default_pretrain_on_the_sample_tiles_then_export_round_trip(tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    assert main(["pretrain", "--out", str(run_dir), "train.max_steps=2", "train.log_every=1"]) == 0
    assert (run_dir / "checkpoints" / "step_00000002" / ".metadata").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert "probe on held-out generated tiles" in capsys.readouterr().out
    assert json.loads((run_dir / "probe.json").read_text())["step"] == 2  # the step it probed
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")) and (run_dir / "curves.png").exists()
    # a second fresh run into the same folder is refused; --resume continues (here: already complete)
    assert main(["pretrain", "--out", str(run_dir), "train.max_steps=2"]) == 2
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run_dir), "--resume", "train.max_steps=2"]) == 0

    out = tmp_path / "tiny.safetensors"
    old_umask = os.umask(0o027)
    try:
        assert main(["export", str(run_dir), str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert out.stat().st_mode & 0o777 == 0o640  # the umask's mode, as open() would give (safetensors: 0600)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "terrafm_tiny" and meta["s1_scaling"] == "db" and meta["patch_size"] == "16"
    assert meta["fusion_heads"] == "16" and meta["fusion_norm"] == "values"  # how a --with-fusion file was built
    # the inputs training used, so a user can prepare theirs: bands and per-band statistics per modality
    config = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())["config"]
    assert meta["img_size"] == str(config["model"]["img_size"])
    assert json.loads(meta["bands"])["s1"] == ["VV", "VH"] and len(json.loads(meta["mean"])["s2_l2a"]) == 12
    assert load_checkpoint(out).input_metadata["std"] == json.loads(meta["std"])
    # resuming on shards that hold S1 in the other scaling is refused (the checkpoint records dB)
    shard_dir = ensure_sample_shards()
    linear = tmp_path / "linear_shards"
    convert([shard_dir.parent / "parquet"], linear, tile_size=ShardSet(shard_dir).tile_size, workers=0,
            progress=False, s1_scaling="linear")
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run_dir), "--resume", "train.max_steps=4", f"data.shard_dir={linear}"]) == 2
    assert "trained on S1 in db, data.shard_dir holds S1 in linear" in capsys.readouterr().err
    model = build_model("terrafm_tiny", img_size=64)
    model.load_state_dict(load_file(str(out)), strict=True)
    loaded = load_checkpoint(run_dir)  # the trainer checkpoint directly (teacher, with fusion parameters)
    x = torch.randn(2, 12, 64, 64)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x, "s2_l2a"), loaded(x, "s2_l2a"))
    pointer = load_checkpoint(run_dir / "checkpoints" / "latest").eval()  # the pointer file names the same one
    torch.testing.assert_close(pointer(x, "s2_l2a"), loaded(x, "s2_l2a"))
    # shards re-converted with other statistics: the resume goes on and says what moved
    moved = tmp_path / "moved_shards"
    shutil.copytree(shard_dir, moved)
    index = json.loads((moved / "index.json").read_text())
    s2 = index["modalities"]["s2_l2a"]
    shift = 0.25 * s2["std"][3]
    s2["mean"][3] += shift
    (moved / "index.json").write_text(json.dumps(index))
    for part in moved.glob("part-*.npz"):  # as a conversion of pixels shifted by `shift` records them (the reader
        arrays = dict(np.load(part))  # checks the means and stds against these sums)
        count = np.broadcast_to(arrays["s2_l2a.count"], arrays["s2_l2a.sum"].shape)
        band = np.eye(len(count))[3]
        arrays["s2_l2a.sumsq"] = arrays["s2_l2a.sumsq"] + band * (2 * shift * arrays["s2_l2a.sum"] + shift**2 * count)
        arrays["s2_l2a.sum"] = arrays["s2_l2a.sum"] + band * shift * count
        np.savez(part, **arrays)
    assert main(["pretrain", "--out", str(run_dir), "--resume", "train.max_steps=3", f"data.shard_dir={moved}"]) == 0
    printed = capsys.readouterr().out
    assert "normalises the bands otherwise" in printed and "s2_l2a B04: mean moved 0.25 std, std x1" in printed, printed


@pytest.mark.slow  # torch.compile on CPU: ~1-2 min
def test_activation_checkpointing_and_compile_per_block_keep_the_losses(tmp_path):
    plain = tiny_config(tmp_path / "plain", "train.max_steps=2", "train.checkpoint_every=100")
    wrapped = tiny_config(tmp_path / "wrapped", "train.max_steps=2", "train.checkpoint_every=100",
                          "train.activation_checkpointing=true", "train.compile=true")
    train(plain, loader=SyntheticLoader())
    train(wrapped, loader=SyntheticLoader())
    read = lambda d: [r["loss"] for r in metric_records(d / "run")]  # noqa: E731
    for a, b in zip(read(tmp_path / "plain"), read(tmp_path / "wrapped"), strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_resume_from_a_checkpoint_written_while_the_last_layer_is_frozen(tmp_path):
    """The frozen prototype layer has no AdamW state yet; resuming must not demand it (it did: missing key),
    and its state must start at its first update (step 4 here), as in a run without the interruption."""
    import torch.distributed.checkpoint as dcp

    overrides = TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=frozen", "train.steps_per_epoch=2",
                                  "ssl.freeze_last_layer_epochs=2", "train.checkpoint_every=2", "train.probe=false"]
    first = train(load_config(None, overrides + ["train.max_steps=2"]), loader=SyntheticLoader())
    assert first.step == 2 and first.checkpoint is not None
    resumed = train(load_config(None, overrides + ["train.max_steps=6"]), resume=True, loader=SyntheticLoader())
    assert resumed.step == 6
    steps = {name: torch.zeros(()) for name in ("head.last_layer.weight_v", "head.mlp.0.weight")}
    state = {"optimizer": {"state": {name: {"step": t} for name, t in steps.items()}}}
    dcp.load(state, checkpoint_id=resumed.checkpoint, no_dist=True)
    assert steps["head.mlp.0.weight"].item() == 6 and steps["head.last_layer.weight_v"].item() == 2


class SignalInSetupLoader(SyntheticLoader):
    """Sends this process SLURM's preemption warning (SIGUSR1) while the trainer is still setting up."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        os.kill(os.getpid(), signal.SIGUSR1)


def test_a_preemption_signal_during_setup_checkpoints_after_the_first_step(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=100")
    before = signal.getsignal(signal.SIGUSR1)
    result = train(cfg, loader=SignalInSetupLoader())  # SIGUSR1's default action would kill the test process
    assert result.preempted and result.step == 1 and result.checkpoint.name == "step_00000001"
    assert (tmp_path / "run" / "preempted").read_text().strip() == "1"
    assert signal.getsignal(signal.SIGUSR1) is before  # the handler is restored


def test_a_sample_cache_that_cannot_be_written_is_one_message(tmp_path, monkeypatch, capsys):
    """TERRAFM_DATA_DIR a file (or a read-only folder) was a NotADirectoryError/PermissionError traceback, exit 1."""
    (tmp_path / "data").write_text("not a folder")
    monkeypatch.setenv("TERRAFM_DATA_DIR", str(tmp_path / "data"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the bundled sample into" in err and "TERRAFM_DATA_DIR" in err and "Traceback" not in err


def test_a_probe_that_cannot_make_its_split_is_skipped_and_the_run_succeeds(tmp_path, monkeypatch, capsys):
    """A finished, checkpointed run exited 1 when its held-out split could not be written (a read-only cache)."""
    from terrafm.data.shards import ShardError
    from terrafm.eval import learning

    def read_only(*args, **kwargs):
        raise ShardError("cannot write the bundled sample into /ro (Permission denied)")

    monkeypatch.setattr(learning, "heldout_split", read_only)
    assert main(["pretrain", "--out", str(tmp_path / "run"), "train.max_steps=1", "data.batch_size=4"]) == 0
    assert "probe skipped: cannot write the bundled sample into /ro" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "latest").exists() and not (tmp_path / "run" / "probe.json").exists()


def test_a_stop_signal_during_a_periodic_save_stops_on_that_checkpoint(tmp_path, monkeypatch):
    """A SIGUSR1 that arrived while step 2's checkpoint was being written trained step 3 and wrote a second
    checkpoint before stopping: two saves inside SLURM's warning window where one was enough."""
    import os
    import signal

    from terrafm.train import checkpoint

    original = checkpoint.save

    def save_then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's warning, during the save
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run",
                                              "train.max_steps=10", "train.checkpoint_every=2"])
    result = train(cfg, loader=SyntheticLoader(batch_size=4))
    assert result.preempted and result.step == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize("cause", [FileNotFoundError, EOFError])
def test_a_checkpoint_whose_files_do_not_read_is_not_called_a_model_mismatch(tmp_path, monkeypatch, cause):
    """DCP wraps a failed read (a file gone mid-resume, a value the safe loader refuses, a .distcp cut short: EOFError)
    in CheckpointException, which the resume reported as 'does not fit this model and optimiser; resume with the
    model.* and ssl.* values'."""
    from torch.distributed.checkpoint.api import CheckpointException

    from terrafm.train import checkpoint
    from terrafm.train.trainer import SetupError

    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run",
                                              "train.max_steps=2", "train.checkpoint_every=1"])
    train(cfg, loader=SyntheticLoader(batch_size=4))

    def unreadable(path, *args, **kwargs):
        try:
            raise cause(f"{path}/__0_0.distcp")
        except cause as err:
            raise CheckpointException("load failed", {0: (err, [])}) from err

    monkeypatch.setattr(checkpoint, "load", unreadable)
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run", "train.max_steps=3"])
    with pytest.raises(SetupError, match=rf"step_00000002: its data does not read \({cause.__name__}: "
                                         r".*__0_0\.distcp\); the previous checkpoint is .*step_00000001"):
        train(cfg, resume=True, loader=SyntheticLoader(batch_size=4))


def test_a_corrupt_chunk_met_mid_run_keeps_the_steps_done_in_a_checkpoint(tmp_path):
    """Checksums are verified when a chunk is first read, often deep into a run: the run stopped with the right
    message but no checkpoint since the last periodic one (up to 1999 steps on the ViT presets)."""
    from terrafm.data.shards import ChecksumError
    from terrafm.train.trainer import SetupError

    class CorruptAtFourthBatch(SyntheticLoader):
        def __iter__(self):
            for n, batch in enumerate(super().__iter__()):
                if n == 3:
                    raise ChecksumError("part-00004.bin: record 130 s1 band 0: crc32 0x1 != stored 0x2")
                yield batch

    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path}", "train.run_name=run",
                                              "train.max_steps=10", "train.checkpoint_every=1000"])
    with pytest.raises(SetupError, match=r"crc32 .* \(checkpoint .*step_00000003 holds the 3 steps done; --resume "):
        train(cfg, loader=CorruptAtFourthBatch(batch_size=4))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"
    # the discarded step's batch is read again on resume (the loader had counted it: resume skipped it)
    rank_state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "rank_00000.json").read_text())
    assert rank_state["state"]["loader"]["position"] == 3


def test_ctrl_c_stays_an_interrupt_when_torchrun_follows_it_with_sigterm(capsys):
    """Under --nproc the ranks get the terminal's SIGINT and then torchrun's SIGTERM: the SIGTERM overwrote the
    Ctrl-C, so the run wrote a preemption marker and took the requeue path. A second Ctrl-C still stops at once."""
    import signal

    from terrafm.train.trainer import PreemptionFlag

    flag = PreemptionFlag()
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGTERM, None)
    assert flag.interrupted and flag.signum == signal.SIGINT
    # `scancel --signal=INT` signals every process of the step and torchrun forwards its own copy: the same stop
    # twice within a second, which stopped the ranks at once, without the checkpoint
    flag._handle(signal.SIGINT, None)
    assert flag.interrupted
    flag._stop_at -= PreemptionFlag.SAME_STOP_S  # a person's second Ctrl-C, a second later
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)
    preempted = PreemptionFlag()
    preempted._handle(signal.SIGUSR1, None)
    assert preempted.signum == signal.SIGUSR1 and not preempted.interrupted
    hung_up = PreemptionFlag()
    hung_up._handle(signal.SIGHUP, None)
    hung_up._handle(signal.SIGTERM, None)  # torchrun's answer to the hang-up it forwarded
    assert hung_up.interrupted and hung_up.signum == signal.SIGHUP


def test_a_stop_signal_before_nproc_becomes_torchrun_reaches_the_ranks(tmp_path, monkeypatch):
    """`terrafm pretrain --nproc N` records stop signals, then execs torchrun: exec dropped what it had recorded, and a
    preemption in those first seconds trained on to the end (exit 0, no checkpoint at the stop). The launcher hands
    them on in the environment; every rank's flag replays them."""
    import os
    import signal

    from terrafm import stop_signals
    from terrafm.train.trainer import PreemptionFlag

    execs = []

    def execv(path, argv):  # the process would become torchrun here: record what it would inherit, and end
        execs.append(dict(os.environ))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.delenv(stop_signals.PENDING_ENV, raising=False)
    before = {sig: signal.getsignal(sig) for sig in stop_signals.SIGNALS}
    try:
        stop_signals.record()
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit):
            main(["pretrain", "--nproc", "2", "--out", str(tmp_path / "run"), "train.max_steps=1"])
        assert execs and execs[0][stop_signals.PENDING_ENV] == str(int(signal.SIGUSR1))
        flag = PreemptionFlag()  # a rank: it inherits the environment
        flag.install()
        assert flag.signum == signal.SIGUSR1 and not flag.interrupted
        assert stop_signals.PENDING_ENV not in os.environ and stop_signals.take() == []  # replayed once
        flag.restore()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        os.environ.pop(stop_signals.PENDING_ENV, None)


def test_a_collective_that_fails_because_of_another_rank_is_one_message(tmp_path, monkeypatch, capsys):
    """gloo's "Connection closed by peer" (a killed rank) and its receive timeout (a stopped one) were a 40-line
    traceback on the surviving rank; other RuntimeErrors still surface as they are."""
    import terrafm.train.trainer as trainer_module
    from terrafm.train.cli import train_exit_code

    cfg = tiny_config(tmp_path)
    for text in ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7555",
                 "[../gloo/transport/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete"):
        def lost_peer(*args, text=text, **kwargs):
            raise RuntimeError(text)

        monkeypatch.setattr(trainer_module, "train", lost_peer)
        assert train_exit_code(cfg, False) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"terrafm pretrain: a collective with the other ranks failed ({text})") and \
            "train.collective_timeout_s=" in err and "no checkpoint was completed" in err and len(err.splitlines()) == 1

    def own_bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(trainer_module, "train", own_bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_exit_code(cfg, False)


def test_a_stop_signal_during_the_commands_imports_is_replayed_to_the_trainer():
    """A SLURM preemption in the seconds `terrafm pretrain` spends importing torch killed the process (exit 143,
    no checkpoint, no requeue): the command records stop signals from its first line, and the trainer's flag
    takes them over, and restores the handlers from before the recording when the run ends."""
    import os
    import signal

    from terrafm import stop_signals
    from terrafm.train.trainer import PreemptionFlag

    before = {sig: signal.getsignal(sig) for sig in stop_signals.SIGNALS}
    try:
        stop_signals.record()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process with the default handler
        flag = PreemptionFlag()
        flag.install()
        assert flag.signum == signal.SIGUSR1 and not flag.interrupted and stop_signals.take() == []
        flag.restore()
        assert {sig: signal.getsignal(sig) for sig in stop_signals.SIGNALS} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_run_under_nohup_keeps_ignoring_hang_ups():
    import signal

    from terrafm.train.trainer import PreemptionFlag

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    flag = PreemptionFlag()
    try:
        flag.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == flag._handle
    finally:
        flag.restore()
        signal.signal(signal.SIGHUP, previous)


def test_a_run_in_process_leaves_no_deterministic_mode_writer_thread_or_excepthook_behind(tmp_path, monkeypatch):
    """train.deterministic stayed on for every later run in the process (slower, or refused ops on a GPU), and a
    setup error after the metrics logger was made (here: the later checkpoints of a resume cannot be set aside)
    left its TensorBoard writer thread running and threading.excepthook pointing at it."""
    import threading

    from terrafm.train import checkpoint

    hook = threading.excepthook
    assert not torch.are_deterministic_algorithms_enabled()
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1", "train.deterministic=true")
    train(cfg, loader=SyntheticLoader(batch_size=4))
    assert not torch.are_deterministic_algorithms_enabled()
    threads = {t.ident for t in threading.enumerate()}

    def cannot_set_aside(root, step):
        raise checkpoint.CheckpointWriteError("cannot set aside the later checkpoints (test)")

    monkeypatch.setattr(checkpoint, "set_aside_later", cannot_set_aside)
    with pytest.raises(SetupError, match="cannot set aside"):
        train(cfg, resume=tmp_path / "run" / "checkpoints" / "step_00000001", loader=SyntheticLoader(batch_size=4))
    assert threading.excepthook is hook and not torch.are_deterministic_algorithms_enabled()
    time.sleep(0.5)  # a closed writer's thread ends as it drains
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= threads


ORPHAN_SCRIPT = r"""
import os, signal, subprocess, sys, time
if sys.argv[1] == "parent":  # stands for torchrun: starts the rank, then dies as kill -9 leaves it
    subprocess.Popen([sys.executable, "-c", sys.argv[3], "rank", sys.argv[2]])
    deadline = time.time() + 30
    while not os.path.exists(sys.argv[2] + ".ready") and time.time() < deadline:
        time.sleep(0.05)
    os._exit(0)
from terrafm import stop_signals
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[2], "w").write("stopped"), os._exit(0)))
stop_signals.stop_when_orphaned(poll_s=0.05)
open(sys.argv[2] + ".ready", "w").close()
time.sleep(30)
"""


def test_a_rank_whose_torchrun_is_gone_stops_as_on_sigterm(tmp_path):
    """kill -9 of `terrafm pretrain --nproc N` (torchrun) left the ranks training on as orphans to max_steps, holding
    the run folder's lock: a --resume was refused as 'in use by another run'."""
    import subprocess
    import sys

    marker = tmp_path / "stopped"
    subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, "parent", str(marker), ORPHAN_SCRIPT], timeout=60, check=True)
    deadline = time.time() + 20
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists() and marker.read_text() == "stopped"
