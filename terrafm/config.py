"""Pretraining configuration: one dataclass tree, YAML presets, dotted command-line overrides.

    cfg = load_config("vitb_h100", ["train.max_steps=20", "optim.lr=1e-4"])

Resolution order: dataclass defaults (the paper's hyper-parameters) <- preset or YAML file <- dotted
overrides. Every key is checked: an unknown key names itself and lists the valid ones; a value of the
wrong type names the key, the expected type and what was given. Presets live in terrafm/configs/
(installed with the package); `tiny_cpu` is the default of `terrafm pretrain`.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from terrafm.data.config import DataConfig

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny_cpu"


@dataclass
class ModelConfig:
    name: str = "terrafm_base"  # a terrafm.models.build_model name
    img_size: int = 224  # position-embedding grid; other crop sizes interpolate it
    patch_size: int = 16
    fusion: bool = True  # Case N fusion parameters (modality augmentation fuses 2+ sensors)
    drop_path_rate: float = 0.1  # student only; the teacher has none


@dataclass
class SSLConfig:
    num_prototypes: int = 65536  # K
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    student_temperature: float = 0.1
    teacher_temperature: float = 0.06
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: float = 30.0
    center_momentum: float = 0.9  # DINO centre c
    center_high_momentum: float = 0.9  # high-frequency land-cover centre c_h
    center_alpha: float = 0.8  # t_hat = t - alpha c - (1 - alpha) c_h
    teacher_momentum: float = 0.996  # cosine to teacher_momentum_end
    teacher_momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    # prototype layers + teacher softmax + student CE in one dino_head_loss op: no (views x B, K) logits
    # in memory (the Triton kernel on GPU; the torch reference elsewhere); teacher entropy not logged
    fused_head_loss: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-4  # per 256 images: the peak lr is lr * global_batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04  # cosine to weight_decay_end
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 3.0  # max global grad norm; 0 disables clipping
    implementation: str = "auto"  # auto | apex | fused | foreach | plain


@dataclass
class TrainConfig:
    run_name: str = "terrafm"
    out_dir: str = "runs"  # the run lives in out_dir/run_name
    epochs: float = 150.0
    steps_per_epoch: int = 0  # optimiser steps per epoch; 0 = the loader's length
    max_steps: int = 0  # 0 = epochs * steps_per_epoch
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = True  # FSDP2 fully_shard per block (also with one rank: same code path everywhere)
    precision: str = "bf16"  # bf16 | fp32: FSDP2 param dtype in forward/backward
    reduce_precision: str = "fp32"  # gradient reduce-scatter dtype
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile per block
    checkpoint_every: int = 1000  # optimiser steps; the last step always checkpoints
    keep_checkpoints: int = 3
    log_every: int = 10
    profile: bool = False  # torch.profiler trace of profile_steps
    profile_steps: list[int] = field(default_factory=lambda: [10, 13])  # [first, last) step traced
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU)
    elastic_resume: bool = False  # allow resuming on another number of ranks (not bitwise; see docs/training.md)
    collective_timeout_s: int = 1800
    peak_tflops: float = 0.0  # per device for MFU; 0 = look up the GPU (H100/A100), none on CPU
    collapse_gap: float = 0.1  # nats: warn when the teacher's entropy gap stays below it (docs/training.md)
    stop_on_collapse: bool = False  # stop the run (exit 1) instead of only warning
    probe: bool = True  # on the bundled sample: end with kNN on held-out generated tiles vs random init


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ops: dict[str, str] = field(default_factory=dict)  # op -> backend preference (auto|torch|triton|cpp)


CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("bf16", "fp32"),
    "train.reduce_precision": ("bf16", "fp32"),
    "optim.implementation": ("auto", "apex", "fused", "foreach", "plain"),
}


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and what would be right."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; YAML strings such as "1e-4" become floats."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {_coerce(key, k, ktp): _coerce(f"{key}.{k}", v, vtp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance in place, validating every key and value."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give a mapping of its keys: "
                                  f"{', '.join(f.name for f in dataclasses.fields(current))}")
            _apply(current, value, prefix=f"{path}.")
            continue
        value = _coerce(path, value, hints[key])
        if path in CHOICES and value not in CHOICES[path]:
            raise ConfigError(f"config key {path!r}: {value!r} is not one of {', '.join(CHOICES[path])}")
        setattr(obj, key, value)


def parse_override(item: str) -> dict:
    """"train.max_steps=20" -> {"train": {"max_steps": 20}} (the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=20")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def preset_path(name_or_path: str) -> Path:
    """A preset name (terrafm/configs/NAME.yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    raise ConfigError(f"no config {name_or_path!r}: not a YAML file and not a preset; presets: {', '.join(presets())}")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | None = DEFAULT_PRESET, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset or YAML file (None: defaults only) <- dotted overrides, all validated."""
    cfg = Config()
    if preset is not None:
        path = preset_path(preset)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data)
    for item in overrides:
        _apply(cfg, parse_override(item))
    try:
        cfg.data.validate()  # the data path's own cross-field checks
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    t = cfg.train
    checks = [
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.max_steps >= 0 and t.steps_per_epoch >= 0, "train.max_steps and train.steps_per_epoch must be >= 0"),
        (len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] < t.profile_steps[1],
         "train.profile_steps must be [first, last) with 0 <= first < last"),
        (len(cfg.optim.betas) == 2, "optim.betas must have two values"),
        (cfg.ssl.num_prototypes >= 1, "ssl.num_prototypes must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
