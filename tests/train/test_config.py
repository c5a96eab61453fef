import re
import subprocess
import sys

import pytest
import yaml

from terrafm.config import ConfigError, check_epoch, load_config, parse_override, presets


def test_presets_all_load_and_tiny_cpu_is_the_default():
    assert {"tiny_cpu", "vitb_h100", "vitl_h100", "vitb_a100", "vitl_a100"} <= set(presets())
    for name in presets():
        load_config(name)
    cfg = load_config()
    assert cfg.model.name == "terrafm_tiny" and cfg.train.device == "cpu"
    assert load_config("vitl_h100").model.name == "terrafm_large"


def test_dotted_overrides_are_typed_and_yaml_style_floats_work():
    cfg = load_config("tiny_cpu", ["train.max_steps=20", "optim.lr=1e-4", "train.compile=true",
                                   "ops.teacher_softmax=torch", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.max_steps == 20 and cfg.optim.lr == 1e-4 and cfg.train.compile is True
    assert cfg.ops == {"teacher_softmax": "torch"} and cfg.optim.betas == [0.9, 0.95]
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


def test_unknown_key_names_itself_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", ["train.max_step=20"])
    assert "'train.max_step'" in str(err.value) and "max_steps" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*model, data, ssl, optim, train, ops"):
        load_config("tiny_cpu", ["trian.max_steps=20"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=ten", "'train.max_steps': expected an integer, got 'ten'"),
    ("train.compile=1", "'train.compile': expected true or false"),
    ("optim.lr=fast", "'optim.lr': expected a finite number"),
    ("train.precision=fp8", "'train.precision': 'fp8' is not one of bf16, fp32"),
    ("train=3", "'train' is a section"),
    ("train.max_steps", "must look like section.key=value"),
    ("train.grad_accum_steps=0", "grad_accum_steps must be >= 1"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0"),
    ("ssl.student_temperature=0", "ssl.student_temperature must be at least 0.0001, got 0"),
    ("ssl.teacher_momentum=1.5", "teacher_momentum(_end) must be in"),
    ("train.max_nonfinite_grad_steps=0", "train.max_nonfinite_grad_steps must be >= 1"),
    ("model.name=vit_g", "model.name 'vit_g' is not a model"),
    ("model.fusion=false", "model.fusion=false has no fusion parameters, but data.p_fused=0.5"),
    ("ops.shard_decode=host", "ops.shard_decode is not a choice"),
    ("train.seed=-1", "train.seed must be in [0, 2**32)"),
    ("train.seed=5000000000", "train.seed must be in [0, 2**32)"),
    ("data.seed=-1", "DataConfig: seed must be in [0, 2**32)"),
    ("ssl.head_layers=0", "ssl.head_layers, ssl.head_hidden_dim and ssl.head_bottleneck_dim must be >= 1"),
    ("ssl.head_bottleneck_dim=-1", "ssl.head_layers, ssl.head_hidden_dim and ssl.head_bottleneck_dim must be >= 1"),
    ("ssl.warmup_teacher_temperature_epochs=-5", "ssl.warmup_teacher_temperature_epochs must be >= 0"),
    ("train.collective_timeout_s=1000000000000000", "train.collective_timeout_s must be in [1, 2**31)"),
    ("train.max_steps=" + "[" * 5000 + "]" * 5000, "the value is nested too deeply"),
    ("train.run_name=..", "train.run_name must name a folder inside train.out_dir"),
    ("train.run_name=a/../..", "train.run_name must name a folder inside train.out_dir"),
    ("train.run_name=''", "train.run_name must name a folder inside train.out_dir"),
    ("train.run_name=/tmp/x", "train.run_name must name a folder inside train.out_dir"),
    ("train.collapse_gap=-1", "train.collapse_gap must be >= 0"),
    ("ssl.freeze_last_layer_epochs=-1", "ssl.freeze_last_layer_epochs must be >= 0"),
    ("model.fusion_queries=65", "model.fusion_queries must be 1..64 (the fusion kernel's limit"),  # GPU: 1st step
    ("model.fusion_queries=0", "model.fusion_queries must be 1..64"),
])
def test_bad_values_are_reported_clearly(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny_cpu", [override])


def test_fusion_off_is_accepted_without_fused_views_and_nproc_is_checked():
    assert load_config("tiny_cpu", ["model.fusion=false", "data.p_fused=0"]).model.fusion is False
    with pytest.raises(ConfigError, match="--nproc must be >= 1, got 0"):
        load_config("tiny_cpu", nproc=0)


def test_the_dataset_size_check_names_the_key_to_change():
    cfg = load_config("tiny_cpu", ["train.grad_accum_steps=3"])
    batch = cfg.data.batch_size
    with pytest.raises(ConfigError, match=rf"data.batch_size={batch} is more than each of the 2 rank\(s\) gets"):
        check_epoch(cfg, 0, 2)
    with pytest.raises(ConfigError, match="2 batches per rank, fewer than train.grad_accum_steps=3"):
        check_epoch(cfg, 2, 1)
    check_epoch(cfg, 3, 1)


def test_a_last_batch_of_one_under_koleo_is_refused_before_training(tmp_path, capsys):
    """data.drop_last=false with 256 samples per rank in batches of 5 left a last batch of 1, which KoLeo cannot
    use: a traceback (exit 1, the code for a diverged run) at the epoch's end, after the steps before it, unsaved."""
    from terrafm.cli import main

    cfg = load_config("tiny_cpu", ["data.drop_last=false", "data.batch_size=5"])
    with pytest.raises(ConfigError, match=r"leaves each epoch's last batch with 1 of a rank's 256 samples, and "
                                          r"ssl.koleo_weight=0.2 needs 2 .* \(256 % 5 = 1\)"):
        check_epoch(cfg, 52, 1, samples_per_rank=256)
    check_epoch(cfg, 52, 1, samples_per_rank=257)  # a last batch of 2
    check_epoch(load_config("tiny_cpu", ["data.drop_last=false", "data.batch_size=5", "ssl.koleo_weight=0"]), 52, 1,
                samples_per_rank=256)
    check_epoch(load_config("tiny_cpu", ["data.batch_size=5"]), 51, 1, samples_per_rank=256)  # drop_last drops it
    assert main(["pretrain", "--out", str(tmp_path / "run"), "data.drop_last=false", "data.batch_size=5",
                 "train.max_steps=2", "train.probe=false"]) == 2
    assert "leaves each epoch's last batch with 1 of a rank's" in capsys.readouterr().err


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny_cpu"):
        load_config("vitz_h100")


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=inf", "ssl.koleo_weight=-.inf", "optim.eps=nan"])
def test_non_finite_numbers_are_refused_by_name(override):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}': expected a finite number"):
        load_config("tiny_cpu", [override])


def test_a_bad_config_file_is_one_config_error_and_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    files = {
        "tag.yaml": f"model: !!python/object/apply:os.system ['touch {marker}']\n".encode(),
        "broken.yaml": b"model: [unclosed\n",
        "binary.yaml": b"\xff\xfe\x00model",
        "twice.yaml": b"model:\n  name: terrafm_tiny\nmodel:\n  img_size: 32\n",  # PyYAML would keep the last
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.yaml").mkdir()
    for name, message in [("tag.yaml", "(!!python/...) are refused"), ("broken.yaml", "not a valid YAML config"),
                          ("binary.yaml", "not a UTF-8 text file"), ("folder.yaml", "cannot read config"),
                          ("twice.yaml", "key 'model' given twice, line 3")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(str(tmp_path / name))
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"override 'optim.betas=\[0.9': the value is not valid YAML"):
        load_config("tiny_cpu", ["optim.betas=[0.9"])


def test_yaml_merge_keys_share_settings_and_the_keys_beside_them_override(tmp_path):
    """`<<: *defaults` was refused as an object-building tag (the duplicate-key check built the merge key)."""
    path = tmp_path / "merge.yaml"
    path.write_text("ssl:\n  <<: &d {num_prototypes: 64, koleo_weight: 0.1}\n  koleo_weight: 0.3\n"
                    "model:\n  name: terrafm_tiny\n")
    cfg = load_config(str(path))
    assert cfg.ssl.num_prototypes == 64 and cfg.ssl.koleo_weight == 0.3
    path.write_text("ssl:\n  <<: {num_prototypes: 64}\n  koleo_weight: 0.3\n  koleo_weight: 0.2\n")
    with pytest.raises(ConfigError, match="key 'koleo_weight' given twice"):
        load_config(str(path))


def test_an_override_of_one_op_keeps_the_ops_the_config_file_sets(tmp_path):
    """ops.teacher_softmax=torch replaced the file's whole ops mapping: its other backends went back to auto."""
    path = tmp_path / "run.yaml"  # as a run's config.yaml records them, every op resolved
    path.write_text("ops:\n  attention: sdpa\n  patch_embed: torch\n")
    cfg = load_config(str(path), ["ops.teacher_softmax=torch", "ops.patch_embed=triton"])
    assert cfg.ops == {"attention": "sdpa", "patch_embed": "triton", "teacher_softmax": "torch"}


@pytest.mark.parametrize("key", ["optim.warmup_epochs", "train.epochs", "ssl.freeze_last_layer_epochs",
                                 "ssl.warmup_teacher_temperature_epochs"])
def test_an_epoch_count_too_large_to_be_steps_is_a_config_error(key):
    """1e307 epochs passed validation and overflowed when converted to steps, a traceback after the build."""
    with pytest.raises(ConfigError, match=f"{key} must be at most 1e\\+06 epochs, got 1e\\+307"):
        load_config("tiny_cpu", [f"{key}=1e307"])


@pytest.mark.parametrize("key", ["optim.lr", "optim.min_lr"])
def test_a_learning_rate_too_large_for_the_optimiser_is_a_config_error(key):
    """1e300 passed validation and overflowed AdamW's float32 step size: a traceback at the first step."""
    with pytest.raises(ConfigError, match="optim.lr and optim.min_lr must be at most 1e\\+06 per 256 images"):
        load_config("tiny_cpu", [f"{key}=1e300"])
    assert load_config("tiny_cpu", [f"{key}=1e6"])


@pytest.mark.parametrize("override, message", [
    ("optim.eps=1e-300", "optim.eps must be at least 1e-30 (float32 rounds smaller ones to 0), got 1e-300"),
    ("optim.weight_decay=1e300", "optim.weight_decay must be at most 1000, got 1e+300"),
    ("optim.weight_decay_end=1e300", "optim.weight_decay_end must be at most 1000, got 1e+300"),
    ("ssl.student_temperature=1e-300", "ssl.student_temperature must be at least 0.0001, got 1e-300"),
    ("ssl.teacher_temperature=1e-300", "ssl.teacher_temperature must be at least 0.0001, got 1e-300"),
    ("ssl.warmup_teacher_temperature=1e-300", "ssl.warmup_teacher_temperature must be at least 0.0001, got 1e-300"),
])
def test_a_value_that_makes_the_loss_nan_is_a_config_error_naming_its_key(override, message):
    """Each passed validation and stopped the run with "loss is nan ... lower optim.lr" (exit 1), the wrong key;
    the bound itself and DINO/DINOv2's values are accepted."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny_cpu", [override])
    bound = {"optim.eps": "1e-30", "optim.weight_decay": "1e3", "optim.weight_decay_end": "1e3"}
    key = override.split("=")[0]
    for value in (bound.get(key, "1e-4"), "1e-8" if key == "optim.eps" else "0.04"):
        assert load_config("tiny_cpu", [f"{key}={value}"])


def test_integers_in_scientific_notation_are_integers():
    assert load_config("tiny_cpu", ["train.max_steps=1e3"]).train.max_steps == 1000
    with pytest.raises(ConfigError, match="'train.max_steps': expected an integer, got 1500.5"):
        load_config("tiny_cpu", ["train.max_steps=1.5005e3"])


def test_one_view_and_no_pair_is_refused_before_training():
    with pytest.raises(ConfigError, match="no pair of different views; set n_global >= 2 or n_local >= 1"):
        load_config("tiny_cpu", ["data.n_global=1", "data.n_local=0"])
    assert load_config("tiny_cpu", ["data.n_global=1", "data.n_local=2"]).data.n_global == 1


def test_config_files_that_would_crash_the_loader_are_config_errors(tmp_path):
    files = {"unhashable.yaml": "? [1, 2]\n: 3\n", "deep.yaml": "[" * 20000 + "]" * 20000, "empty.yaml": ""}
    messages = {"unhashable.yaml": "a mapping key must be a name", "deep.yaml": "nested too deeply",
                "empty.yaml": "the config file is empty"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=messages[name]):
            load_config(str(tmp_path / name))
    with pytest.raises(ConfigError, match="it does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_an_empty_out_is_refused(capsys):
    from terrafm.cli import main

    assert main(["pretrain", "--out", "", "--print-config"]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_a_run_name_with_subfolders_stays_allowed():
    assert load_config("tiny_cpu", ["train.run_name=sweep/lr_1e-4"]).train.run_name == "sweep/lr_1e-4"


@pytest.mark.parametrize("name", ["2024", "yes", "#1", "x: y"])
def test_out_is_a_path_taken_verbatim(tmp_path, name, capsys):
    import yaml

    from terrafm.cli import main

    assert main(["pretrain", "--out", str(tmp_path / name), "--print-config"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert (train["out_dir"], train["run_name"]) == (str(tmp_path), name)


@pytest.mark.parametrize(("device_name", "key"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 SXM5 80GB", "H100 SXM"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA A100-PCIE-40GB", None), ("NVIDIA GH200 480GB", None),
    ("NVIDIA L40S", None)])
def test_a_gpu_gets_the_figures_of_its_own_variant_or_none(device_name, key):
    """MFU divides by the device's peak: an H100 PCIe (756 dense bf16 TFLOP/s) must not get the SXM's 989."""
    from terrafm.train.metrics import gpu_name

    assert gpu_name(device_name) == key


def test_a_mesh_that_does_not_fit_nproc_is_one_message_before_torchrun():
    """`--nproc 2 parallel.dp_shard=3` printed the message on every rank, then torchrun's ChildFailedError
    traceback, exit 1."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "pretrain", "--nproc", "2", "parallel.dp_shard=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("terrafm pretrain: configuration error: --nproc 2: parallel.dp_shard=3 does not "
                                   "divide the 2 ranks")


def test_fsdp_off_with_several_processes_is_one_message_before_torchrun():
    """`--nproc 2 train.fsdp=false` was refused by every rank after torchrun started them: the message twice, then
    torchrun's ChildFailedError traceback, exit 1."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "pretrain", "--nproc", "2", "train.fsdp=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("terrafm pretrain: configuration error: train.fsdp=false supports a single "
                                   "process only, got --nproc 2; set train.fsdp=true or --nproc 1")
    assert load_config("tiny_cpu", ["train.fsdp=false"]).train.fsdp is False  # one process: allowed


def test_configs_load_without_triton():
    """The fusion_queries check imported the Triton kernel module: every command failed where triton is not
    installed (macOS, Windows: pyproject installs it on Linux only)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from terrafm.config import load_config\n"
            "load_config('vitb_h100', []); print('loaded')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("override, key, value", [
    ("train.max_steps=010", "max_steps", 10),  # YAML 1.1: octal 8
    ("train.max_steps=12:30", None, "expected an integer, got '12:30'"),  # YAML 1.1: base 60, 750
    ("train.max_steps=1_000", "max_steps", 1000),
    ("train.max_steps=0x10", "max_steps", 16),
    ("train.run_name=010", "run_name", "010"),  # YAML 1.1: 8, then "expected a string, got 8"
    ("train.run_name=2024_01", "run_name", "2024_01"),  # YAML 1.1: 202401
    ("train.run_name=2024-01-31", "run_name", "2024-01-31"),  # YAML 1.1: a date
    ("train.run_name=yes", "run_name", "yes"),  # YAML 1.1: true
    ("train.run_name=2024", "run_name", "2024"),
    ("train.fsdp=yes", None, "expected true or false, got 'yes'"),
    ("train.fsdp=False", "fsdp", False),
])
def test_plain_values_follow_yaml_1_2_so_none_silently_becomes_another(override, key, value):
    if key is None:
        with pytest.raises(ConfigError, match=value):
            load_config("tiny_cpu", [override])
        return
    assert getattr(load_config("tiny_cpu", [override]).train, key) == value


def test_a_config_file_reads_yaml_1_2_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  run_name: 2024-01-31\n  max_steps: 010\noptim:\n  lr: 5e-4\n  weight_decay: .04\n")
    cfg = load_config(str(path))
    assert (cfg.train.run_name, cfg.train.max_steps, cfg.optim.lr, cfg.optim.weight_decay) == ("2024-01-31", 10, 5e-4,
                                                                                               0.04)


@pytest.mark.parametrize("name", ["1e3", "010", "2024_01", "yes", "12:30", "2024-01-31", "0x10", ".5", "null"])
def test_a_saved_config_reads_back_the_same_text(tmp_path, name):
    from terrafm.config import save_config

    cfg = load_config("tiny_cpu", [f"train.run_name='{name}'"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).train.run_name == name
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["run_name"] == name  # other YAML readers


def test_a_config_that_is_a_fifo_a_device_or_an_endless_integer_is_one_config_error(tmp_path):
    """A FIFO as --config hung the run in open() (SIGTERM only recorded), a link to /dev/zero read until memory ran
    out, and an integer over 4300 digits was Python's ValueError traceback, in a file or an override alike."""
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"cannot read config .*fifo\.yaml: is a FIFO \(named pipe\), not a regular"):
        load_config(str(fifo))
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"cannot read config .*zero\.yaml: is a device, not a regular file"):
        load_config(str(zero))
    long = tmp_path / "long.yaml"
    long.write_text(f"train:\n  max_steps: {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=r"long\.yaml: not a valid YAML config \(an integer of 5000 digits is too "
                                          "long"):
        load_config(str(long))
    with pytest.raises(ConfigError, match="an integer of 5000 digits is too long"):
        load_config("tiny_cpu", [f"train.max_steps={'9' * 5000}"])
