"""Training semantics against DINO / DINOv2: gradient accumulation, parameter groups, resume, logged metrics."""

import json
import time
import types

import pytest
import torch
from synthetic import TINY_OVERRIDES, SyntheticLoader
from train_harness import metric_records

from terrafm.config import load_config
from terrafm.data.views import View, ViewBatch
from terrafm.models import load_checkpoint
from terrafm.ssl.meta_arch import SSLMetaArch
from terrafm.train import checkpoint, metrics, trainer
from terrafm.train.trainer import NonFiniteGradError, build_optimizer, train


def config(out, *overrides):
    return load_config(None, TINY_OVERRIDES + [f"train.out_dir={out}", "train.run_name=run", "train.probe=false",
                                               *overrides])


class MicroBatches(SyntheticLoader):
    """SyntheticLoader's batches of batch_size * parts served as `parts` micro-batches of batch_size, in order."""

    def __init__(self, parts: int, batch_size: int, **kwargs):
        super().__init__(batch_size=batch_size * parts, **kwargs)
        self.parts = parts

    def __len__(self) -> int:
        return super().__len__() * self.parts

    def __iter__(self):
        for batch in super().__iter__():
            b = batch.majority_class.shape[0] // self.parts
            for i in range(self.parts):
                rows = slice(i * b, (i + 1) * b)
                cut = lambda v, rows=rows: View({m: t[rows] for m, t in v.items()})  # noqa: E731
                yield ViewBatch([cut(v) for v in batch.global_views], [cut(v) for v in batch.local_views],
                                batch.majority_class[rows], batch.index[rows])


def test_two_micro_batches_of_four_make_the_update_of_one_batch_of_eight(tmp_path):
    """Loss scaling, clipping, the last-layer freeze, schedules, both centres and the EMA advance once per
    optimiser step on the statistics of all its micro-batches: every logged value and the final teacher agree.

    AdamW's eps is 1e-5 here, not 1e-8: zero-initialised vectors whose gradient is float noise (the key bias, which
    the softmax ignores; the fusion pool) took +-lr steps from that noise, so the two summation orders left them
    11-15 % apart after 4 steps on some CPUs (1.6e-6 where the teacher moved 1.1e-5); with eps 1e-5 every tensor
    agrees to 1e-8, and an accumulation bug still moves the logged loss and gradient norm and most weights."""
    runs = {}
    for parts in (1, 2):
        out = tmp_path / f"accum{parts}"
        cfg = config(out, f"data.batch_size={8 // parts}", f"train.grad_accum_steps={parts}", "train.max_steps=4",
                     "train.deterministic=true", "ssl.freeze_last_layer_epochs=0.5", "optim.clip_grad=3.0",
                     "optim.eps=1e-5")
        train(cfg, loader=MicroBatches(parts, 8 // parts, num_samples=32))
        runs[parts] = metric_records(out / "run"), load_checkpoint(out / "run").state_dict()
    (one, teacher_one), (two, teacher_two) = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("lr", "weight_decay", "teacher_momentum", "teacher_temperature", "epoch"):
            assert a[key] == b[key], key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                     rel=1e-4)
    for key, value in teacher_one.items():
        torch.testing.assert_close(teacher_two[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_weight_decay_spares_biases_norms_tokens_and_the_sensor_and_fusion_vectors():
    """Only weight matrices decay; the per-sensor vectors added to every patch token ((1, attn_dim)) and the
    fusion queries are learned vectors like the cls token and position embedding, and must not."""
    cfg = config("unused", "model.fusion=true")
    arch = SSLMetaArch.from_config(cfg, 11, [0])
    optimizer = build_optimizer(arch.student, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in arch.student.named_parameters()}
    groups = {g["decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    vectors = {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.s2_l2a_embed",
               "backbone.patch_embed.s2_l1c_embed", "backbone.patch_embed.s1_embed",
               "backbone.patch_embed.fusion.queries", "backbone.patch_embed.fusion.pool"}
    assert vectors <= groups[False] and not vectors & groups[True]
    assert all(n.endswith(("weight", "weight_v")) for n in groups[True])
    assert all(n.endswith(("bias", "norm_input.weight", "norm1.weight", "norm2.weight", "norm.weight"))
               for n in groups[False] - vectors)
    assert "backbone.patch_embed.conv2d_s1.weight" in groups[True] and "head.last_layer.weight_v" in groups[True]
    assert len(groups[True]) + len(groups[False]) == len(list(arch.student.parameters()))


def test_resume_keeps_this_runs_parameter_groups_and_the_saved_adamw_moments(tmp_path, monkeypatch):
    """A checkpoint written under another weight-decay rule (here: the older ndim <= 1 rule, which decayed the
    sensor vectors) resumes into this run's groups and settings (optim.betas changed too) with every
    parameter's AdamW state; before, DCP's group mapping left a group without its keys (KeyError 'decay')."""
    old_rule = lambda name, p: not (p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")))  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(trainer, "decays", old_rule)
        train(config(tmp_path, "train.max_steps=2"), loader=SyntheticLoader(batch_size=4))
    saved = tmp_path / "run" / "checkpoints" / "step_00000002"
    seen = {}
    original = checkpoint.load

    def load(path, arch, optimizer, reshard=False):
        result = original(path, arch, optimizer, reshard)
        names = {p: n for n, p in arch.student.named_parameters()}
        seen["groups"] = {g["decay"]: ({names[p] for p in g["params"]}, g["betas"]) for g in optimizer.param_groups}
        seen["moments"] = {names[p]: s["exp_avg"].full_tensor().clone() for p, s in optimizer.state.items()}
        return result

    monkeypatch.setattr(checkpoint, "load", load)
    cfg = config(tmp_path, "train.max_steps=3", "optim.betas=[0.8, 0.99]")
    assert train(cfg, resume=True, loader=SyntheticLoader(batch_size=4)).step == 3
    (decay, decay_betas), (no_decay, no_decay_betas) = seen["groups"][True], seen["groups"][False]
    assert "backbone.patch_embed.s1_embed" in no_decay and "backbone.patch_embed.s1_embed" not in decay
    assert decay_betas == no_decay_betas == (0.8, 0.99)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(saved, tmp_path / "saved.pt")
    written = torch.load(tmp_path / "saved.pt", weights_only=False)["optimizer"]["state"]
    assert set(seen["moments"]) == set(written)
    for name, moment in seen["moments"].items():
        torch.testing.assert_close(moment, written[name]["exp_avg"], rtol=0, atol=0, msg=name)


def test_step_time_and_images_per_second_count_the_steps_of_each_log_interval(tmp_path):
    """img_per_s x step_time_s is the images of one optimiser step for every record, also for the last interval
    of a run (shorter than train.log_every) and the first after a resume between two log steps."""
    overrides = ["train.max_steps=4", "train.log_every=3", "train.checkpoint_every=2", "train.grad_accum_steps=2",
                 "data.batch_size=2"]
    train(config(tmp_path / "a", *overrides), loader=SyntheticLoader(batch_size=2))
    train(config(tmp_path / "b", *overrides), resume=tmp_path / "a" / "run" / "checkpoints" / "step_00000002",
          loader=SyntheticLoader(batch_size=2))
    for run, steps in (("a", [3, 4]), ("b", [3, 4])):
        records = metric_records(tmp_path / run / "run")
        assert [r["step"] for r in records] == steps
        for r in records:
            assert r["img_per_s"] * r["step_time_s"] == pytest.approx(4.0, rel=1e-6), (run, r["step"])


def test_checkpoint_seconds_are_logged_and_left_out_of_the_rates(tmp_path, monkeypatch):
    """A checkpoint written after a log step used to land in the next interval's step time: a slow disk read as
    a slow step. Its seconds are logged as checkpoint_s and the rates still count training only."""
    save = checkpoint.save

    def slow_save(*args, **kwargs):
        time.sleep(3.0)
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    overrides = ["train.max_steps=4", "train.log_every=2", "train.checkpoint_every=2", "data.batch_size=2"]
    train(config(tmp_path, *overrides), loader=SyntheticLoader(batch_size=2))
    first, second = metric_records(tmp_path / "run")
    assert first["checkpoint_s"] == 0.0  # step 2's save comes after its record
    assert second["checkpoint_s"] >= 3.0 and second["step_time_s"] < 3.0 / 2
    assert second["img_per_s"] * second["step_time_s"] == pytest.approx(2.0, rel=1e-6)


class SlowLoader(SyntheticLoader):
    """Each batch arrives 0.2 s after it is asked for: a loader the trainer waits on."""

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(0.2)
            yield batch


def test_data_wait_counts_the_seconds_each_step_waited_for_its_batches(tmp_path):
    overrides = ["train.max_steps=2", "train.log_every=2", "train.grad_accum_steps=2", "data.batch_size=2"]
    train(config(tmp_path, *overrides), loader=SlowLoader(batch_size=2))
    (record,) = metric_records(tmp_path / "run")
    assert 0.4 <= record["data_wait_s"] < record["step_time_s"]  # two micro-batches of 0.2 s per step
    train(config(tmp_path / "fast", *overrides), loader=SyntheticLoader(batch_size=2))
    assert metric_records(tmp_path / "fast" / "run")[0]["data_wait_s"] < 0.2


def test_cpu_peak_memory_is_in_gigabytes(monkeypatch):
    """Linux reports ru_maxrss in KiB: 10^6 KiB is 1.024 GB."""
    monkeypatch.setattr(trainer.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=1_000_000))
    assert trainer._memory_gb(torch.device("cpu")) == pytest.approx(1.024)


def test_mfu_peak_is_that_of_the_units_the_matmuls_run_on(monkeypatch):
    """fp32 matmuls use TF32 tensor cores only when torch allows it; by default they run at the fp32 peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert metrics.peak_flops(cuda, "fp32", 0.0) == pytest.approx(66.9e12)
        torch.set_float32_matmul_precision("high")
        assert metrics.peak_flops(cuda, "fp32", 0.0) == pytest.approx(494.5e12)
        assert metrics.peak_flops(cuda, "bf16", 0.0) == pytest.approx(989.5e12)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert metrics.peak_flops(cuda, "fp32", 123.0) == pytest.approx(123e12)
    assert metrics.peak_flops(torch.device("cpu"), "fp32", 0.0) is None


def test_the_non_finite_gradient_streak_survives_a_resume(tmp_path, monkeypatch):
    """Non-finite gradient norms at steps 1, 2, 3 with train.max_nonfinite_grad_steps=3 stop the run at step 3;
    resumed from the checkpoint of step 2 (streak 1), the run stops at the same step."""
    calls = []

    def clip_with_inf(params, max_norm, per_parameter, inf_at):
        if len(calls) in inf_at:
            next(p for p in params if p.grad is not None).grad.fill_(float("inf"))
        calls.append(1)
        return original_clip(params, max_norm, per_parameter)

    original_clip = trainer.clip_gradients
    overrides = ["train.max_steps=6", "train.checkpoint_every=2", "train.max_nonfinite_grad_steps=3"]
    monkeypatch.setattr(trainer, "clip_gradients", lambda p, n, per: clip_with_inf(p, n, per, {1, 2, 3}))
    with pytest.raises(NonFiniteGradError, match="3 steps in a row, the last at step 3"):
        train(config(tmp_path, *overrides), loader=SyntheticLoader(batch_size=4))
    calls.clear()  # the resumed run's calls 0 and 1 are steps 2 and 3
    monkeypatch.setattr(trainer, "clip_gradients", lambda p, n, per: clip_with_inf(p, n, per, {0, 1}))
    with pytest.raises(NonFiniteGradError, match="3 steps in a row, the last at step 3"):
        train(config(tmp_path / "resumed", *overrides), resume=tmp_path / "run" / "checkpoints" / "step_00000002",
              loader=SyntheticLoader(batch_size=4))


def test_metrics_jsonl_is_strict_json_with_null_for_nan(tmp_path):
    """teacher_cosine is NaN at batch 1: a bare NaN in metrics.jsonl is not JSON (jq, JavaScript refuse it)."""
    import json
    import math

    from terrafm.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, 0, 1, 0)
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-4, "teacher_cosine": math.nan, "grad_norm": math.inf, "mfu": None,
                "mem_gb": 0.1, "img_per_s": 3.0})
    logger.close()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "loss": 2.5, "lr": 1e-4, "teacher_cosine": None, "grad_norm": None, "mfu": None,
                      "mem_gb": 0.1, "img_per_s": 3.0}


def test_a_full_disk_stops_tensorboard_with_one_warning_and_training_logs_on(tmp_path, capfd):
    """TensorBoard's writer thread died on ENOSPC with a traceback, and the next add_scalar raised it in the
    training loop: the run stopped at once instead of going on to its next checkpoint like metrics.jsonl."""
    import errno
    import json
    import time

    from terrafm.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, 0, 3, 0)
    record = {"step": 1, "loss": 2.5, "lr": 1e-4, "mfu": None, "mem_gb": 0.1, "img_per_s": 3.0}
    logger.log(record)
    records = logger.tb._get_file_writer().event_writer._async_writer._writer  # tensorboard's RecordWriter

    def full(_data):
        raise OSError(errno.ENOSPC, "No space left on device")

    records.write = full
    for step in (2, 3):
        logger.log({**record, "step": step})
        time.sleep(0.2)  # the writer thread takes the events off its queue and meets the full disk
    logger.log({**record, "step": 4})
    logger.close()
    captured = capfd.readouterr()
    out = captured.out + captured.err
    assert "Traceback" not in out, out
    assert out.count("warning: cannot write TensorBoard events (No space left on device)") == 1, out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_line_cut_short_by_a_full_disk_is_not_glued_to_the_next_record(tmp_path, monkeypatch, capfd):
    """A full disk takes the first bytes of a record into the file's last block; the next record, appended once
    there was space again, went onto the same line, and both were lost to every reader of metrics.jsonl."""
    import builtins
    import errno
    import json

    from terrafm.train import metrics
    from terrafm.train.metrics import MetricsLogger

    class FillsUp:
        """metrics.jsonl on a disk that fills halfway through the next write."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    logger = MetricsLogger(tmp_path, 0, 3, 0)
    record = {"step": 1, "loss": 2.5, "lr": 1e-4, "mfu": None, "mem_gb": 0.1, "img_per_s": 3.0}
    logger.log(record)
    monkeypatch.setattr(metrics, "open", lambda *args, **kwargs: FillsUp(builtins.open(*args, **kwargs)),
                        raising=False)
    logger.log({**record, "step": 2})
    monkeypatch.undo()
    logger.log({**record, "step": 3})
    logger.close()
    assert "warning: cannot append to" in capfd.readouterr().out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 3]


@pytest.mark.parametrize("steps, traced", [(3, True), (2, True), (1, False)])
def test_profile_writes_a_trace_or_says_why_not(tmp_path, capfd, steps, traced):
    """train.profile_steps=[1, 3]: a run of 3 steps traces 1-2; one of 2 ended inside the window and wrote nothing
    (the trace was exported only at its last step), one of 1 never starts it and now says so."""
    train(config(tmp_path, "train.profile=true", "train.profile_steps=[1,3]", f"train.max_steps={steps}",
                 "data.batch_size=2"), loader=SyntheticLoader(batch_size=2))
    trace = tmp_path / "run" / "profile" / "trace_rank0.json"
    out = capfd.readouterr()
    assert trace.exists() == traced
    if traced:
        assert json.loads(trace.read_text())["traceEvents"]
    if steps == 2:
        assert "the run ended at step 2, inside train.profile_steps=[1, 3]; the trace holds steps 1 to 2" in out.out
    if steps == 1:
        assert "trains steps 0 to 1, so it never reaches train.profile_steps=[1, 3]" in out.out + out.err
