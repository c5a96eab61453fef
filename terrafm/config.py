"""Pretraining configuration: one dataclass tree, YAML presets, dotted command-line overrides.

    cfg = load_config("vitb_h100", ["train.max_steps=20", "optim.lr=1e-4"])

Resolution order: dataclass defaults (the paper's hyper-parameters) <- preset or YAML file <- dotted
overrides. Every key is checked: an unknown key names itself and lists the valid ones; a value of the
wrong type names the key, the expected type and what was given. Presets live in terrafm/configs/
(installed with the package); `tiny_cpu` is the default of `terrafm pretrain`.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from terrafm.data.config import DataConfig
from terrafm.fileio import read_small

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny_cpu"


@dataclass
class ModelConfig:
    name: str = "terrafm_base"  # a terrafm.models.build_model name
    img_size: int = 224  # position-embedding grid; other crop sizes interpolate it
    patch_size: int = 16
    fusion: bool = True  # Case N fusion parameters (modality augmentation fuses 2+ sensors)
    fusion_queries: int = 5  # shared learned queries (the method's ablation: 5 beat 1)
    fusion_heads: int = 16  # unpublished: Panopticon's 16; must divide 3 x the model's width
    fusion_norm: str = "values"  # unpublished: "values" (norm_input after proj1, method.md) or "pooled"
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
    # DINOv2's KoLeo regulariser on the student's global-view cls tokens (DINOv2: 0.1); 0 = off, TerraFM's
    # recipe (DINO loss only). tiny_cpu needs it to learn within minutes (docs/training.md, "Does it learn?")
    koleo_weight: float = 0.0
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
    clip_grad: float = 3.0  # max gradient norm; 0 disables clipping
    clip_mode: str = "per_parameter"  # per_parameter: each tensor's norm (DINO) | global: one total norm
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
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU; refused on CUDA)
    elastic_resume: bool = False  # allow resuming on another number of ranks (not bitwise; see docs/training.md)
    collective_timeout_s: int = 1800
    max_nonfinite_grad_steps: int = 5  # a non-finite gradient norm skips the step; this many in a row stop the run
    peak_tflops: float = 0.0  # per device for MFU; 0 = look up the GPU (H100/A100), none on CPU
    collapse_gap: float = 0.1  # nats: warn when the teacher's entropy gap stays below it (docs/training.md)
    stop_on_collapse: bool = False  # stop the run (exit 1) instead of only warning
    probe: bool = True  # on the bundled sample: end with kNN on held-out generated tiles vs random init


@dataclass
class ParallelConfig:
    """The 2-D data-parallel mesh (dp_replicate x dp_shard = world size) and FSDP2 overlap (docs/training.md).

    dp_shard > 1 shards parameters, gradients and optimiser state over that many ranks (FSDP); dp_replicate > 1
    keeps that many copies of the shards, whose gradients are all-reduced (HSDP when both are > 1). The default
    shards within a node (NVLink) and replicates across nodes (InfiniBand carries one all-reduce of a shard).
    """

    dp_replicate: int = 0  # copies of the sharded model; -1 = the rest; 0 = one per node (the rest if dp_shard set)
    dp_shard: int = -1  # ranks one copy is sharded over; -1 = the rest (the ranks of a node by default)
    forward_prefetch: int = 1  # blocks whose all-gather a block issues ahead in forward; 0 = FSDP2's implicit
    backward_prefetch: int = 1  # the same in backward (the preceding blocks); 0 = FSDP2's implicit
    # False: the teacher (no backward) keeps its gathered weights from its first forward of a step until the
    # EMA update (one all-gather per step, whatever grad_accum_steps); True saves its full weights' memory
    teacher_reshard_after_forward: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ops: dict[str, str] = field(default_factory=dict)  # op -> backend or "auto" (terrafm.ops; docs/ops.md)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("bf16", "fp32"),
    "train.reduce_precision": ("bf16", "fp32"),
    "optim.implementation": ("auto", "apex", "fused", "foreach", "plain"),
    "optim.clip_mode": ("per_parameter", "global"),
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
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, list | tuple):
            wanted = f"a list of {_type_name(args[0])}" if variadic else f"a list of {len(args)} values"
            raise ConfigError(f"config key {key!r}: expected {wanted}, got {value!r}")
        if variadic:
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
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str):  # YAML reads 1e3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is not None and abs(number) >= 2**63:  # torch takes sizes and counts as int64
            raise ConfigError(f"config key {key!r}: {value!r} does not fit in a 64-bit integer")
        if number is not None:
            return number
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # NaN slips through every `x > 0` range check below and inf poisons the schedules
        raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # run_name=2024: a name YAML read as a number
            return str(value)
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
        if isinstance(current, dict):  # a mapping merges key by key like a section: ops.attention=sdpa keeps the rest
            value = {**current, **value}
        if path in CHOICES and value not in CHOICES[path]:
            raise ConfigError(f"config key {path!r}: {value!r} is not one of {', '.join(CHOICES[path])}")
        setattr(obj, key, value)


def parse_override(item: str) -> dict:
    """"train.max_steps=20" -> {"train": {"max_steps": 20}} (the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=20")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}), e.g. "
                          "optim.betas=[0.9,0.95]") from err
    except RecursionError as err:
        raise ConfigError(f"override {key!r}: the value is nested too deeply") from err
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
    yaml_name = path.suffix.lower() in (".yaml", ".yml")
    if yaml_name and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    if yaml_name:
        raise ConfigError(f"no config file {name_or_path!r}: it does not exist")
    raise ConfigError(f"no config {name_or_path!r}: not a YAML file and not a preset; presets: {', '.join(presets())}")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The first line of a YAML error and where it is, without PyYAML's multi-line excerpt."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (plain data only) that refuses a key given twice in one mapping: PyYAML keeps the last one, so
    a second `model:` section would silently drop the first one's settings. Merge keys (`<<: *defaults`) are
    YAML's own way to share settings; the keys given beside one override it, as YAML says.

    Plain scalars follow YAML 1.2's core schema, not PyYAML's YAML 1.1: `train.max_steps=010` read 8 (octal),
    `12:30` 750 (base 60), `yes` true, `2024_01` 202401 and 2024-01-31 a date, so a value silently became
    another. Now only true/false are booleans, integers are decimal without a leading zero (or 0o / 0x), floats
    have a dot or an exponent, and the rest stays text, which a number key still reads as a number ("010" -> 10)
    and a text key keeps as typed (run_name 010)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                               "tag:yaml.org,2002:timestamp")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError as err:  # Python refuses over 4300 digits (int_max_str_digits)
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(digits)} digits is too long",
                                                    node.start_mark) from err

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # SafeLoader merges it in super().construct_mapping
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a name, not a list or "
                                                        "a mapping", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|"
                                                                        r"0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+|"
               r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def read_yaml(path: Path) -> Any:
    """A config file's YAML as plain data (a `!!python/...` tag is refused, never run; no key twice)."""
    try:
        text = read_small(path).decode("utf-8")  # a FIFO or /dev/zero is refused, not waited on or read forever
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        tag = isinstance(err, yaml.constructor.ConstructorError) and "tag" in str(err.problem)
        tags = "; tags that build objects (!!python/...) are refused" if tag else ""
        raise ConfigError(f"{path}: not a valid YAML config ({_yaml_problem(err)}){tags}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: not a valid YAML config (nested too deeply)") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from err
    except ValueError as err:  # read_small's size limit
        raise ConfigError(f"{path}: not a config file: it {err}") from err


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | None = DEFAULT_PRESET, overrides: list[str] | tuple[str, ...] = (),
                nproc: int = 1) -> Config:
    """Defaults <- preset or YAML file (None: defaults only) <- dotted overrides, all validated
    (nproc: the processes `terrafm pretrain --nproc` will start, checked with the rest)."""
    cfg = Config()
    if preset is not None:
        path = preset_path(preset)
        data = read_yaml(path)
        if data is None:
            raise ConfigError(f"{path}: the config file is empty; give the sections to change, e.g. train: "
                              "{max_steps: 20}")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data)
    for item in overrides:
        _apply(cfg, parse_override(item))
    try:
        cfg.data.validate()  # the data path's own cross-field checks
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    validate(cfg, nproc)
    return cfg


MAX_EPOCHS = 1e6  # of any epoch-valued setting
MAX_LR = 1e6  # per 256 images: far above any usable rate, far below float32's limit for AdamW's step
# Below, each bound is far outside any recipe and stops a value that trained to "loss is nan ... lower optim.lr"
# (the wrong key) at the config instead:
# AdamW divides by sqrt(v) + eps in float32: 1e-300 rounds to 0 and a zero gradient's step is 0/0. Recipes use
# 1e-8 (DINO, DINOv2, every preset) or a few orders lower; 1e-30 stays far above float32's smallest normal number
# (1.2e-38; a GPU flushes smaller ones to 0).
MIN_EPS = 1e-30
# AdamW multiplies the weights by 1 - lr x weight_decay each step: 1e300 overflowed float32 there. Recipes use
# 0.04 -> 0.4 (DINO, DINOv2, every preset); 1e3 is 2500 times the largest.
MAX_WEIGHT_DECAY = 1e3
# The head's logits are cosines (|logit| <= 1) divided by the temperature: 1e-300 overflowed to inf - inf = nan.
# Recipes use 0.02-0.1 (DINO, DINOv2; tiny_cpu 0.03); at 1e-4 the scaled logits stay within 1e4, finite even
# in fp16.
MIN_TEMPERATURE = 1e-4


def validate(cfg: Config, nproc: int = 1) -> None:
    """Every value check that a single key's type cannot express, run before anything is built."""
    from terrafm.modalities import MODALITIES
    from terrafm.models import MODELS
    from terrafm.models.patch_embed import FUSION_NORMS
    from terrafm_kernels._common import FUSION_MAX_QUERIES as MAX_QUERIES  # no triton import

    t, o, s, m, p = cfg.train, cfg.optim, cfg.ssl, cfg.model, cfg.parallel
    for k, bands in cfg.data.bands.items():  # the loader takes subsets; the model's patch embeddings take every band
        if tuple(bands) != MODALITIES[k].bands:
            raise ConfigError(f"data.bands.{k}={list(bands)}: the model's {k} patch embedding takes all of "
                              f"{list(MODALITIES[k].bands)} in this order; pretraining on a band subset or another "
                              "order is not supported, leave data.bands unset")
    checks = [
        (nproc >= 1, f"--nproc must be >= 1, got {nproc}"),
        (t.fsdp or nproc <= 1, f"train.fsdp=false supports a single process only, got --nproc {nproc}; set "
                               "train.fsdp=true or --nproc 1"),
        (m.name in MODELS, f"model.name {m.name!r} is not a model; choose one of {', '.join(MODELS)}"),
        (m.img_size >= 1 and m.patch_size >= 1, "model.img_size and model.patch_size must be >= 1"),
        (1 <= m.fusion_queries <= MAX_QUERIES, f"model.fusion_queries must be 1..{MAX_QUERIES} (the fusion "
                                                f"kernel's limit, so a config that runs on CPU runs on the GPU), got "
                                                f"{m.fusion_queries}"),
        (m.fusion_heads >= 1 and (m.name not in MODELS or 3 * MODELS[m.name].embed_dim % m.fusion_heads == 0),
         f"model.fusion_heads={m.fusion_heads} must divide the fusion width 3 x "
         f"{MODELS[m.name].embed_dim if m.name in MODELS else 'D'}"),
        (m.fusion_norm in FUSION_NORMS, f"model.fusion_norm must be one of {', '.join(FUSION_NORMS)}, got "
                                        f"{m.fusion_norm!r}"),
        (all(n % max(m.patch_size, 1) == 0 for n in (m.img_size, cfg.data.global_size, cfg.data.local_size)),
         f"model.img_size={m.img_size}, data.global_size={cfg.data.global_size} and data.local_size="
         f"{cfg.data.local_size} must be multiples of model.patch_size={m.patch_size} (no backend crops)"),
        (0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}"),
        (m.fusion or cfg.data.p_fused == 0.0,
         f"model.fusion=false has no fusion parameters, but data.p_fused={cfg.data.p_fused} draws fused (Case N) "
         "views; set data.p_fused=0 or model.fusion=true"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}"),
        # 1e300 passed and stopped the first AdamW step with a traceback (its step size overflowed float32)
        (max(o.lr, o.min_lr) <= MAX_LR, f"optim.lr and optim.min_lr must be at most {MAX_LR:g} per 256 images, got "
                                        f"{o.lr:g} and {o.min_lr:g}"),
        (o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}"),
        (o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay and optim.weight_decay_end must be >= 0"),
        (o.eps >= MIN_EPS, f"optim.eps must be at least {MIN_EPS:g} (float32 rounds smaller ones to 0), got {o.eps:g}"),
        (o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables clipping), got {o.clip_grad}"),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}"),
        (all(0 <= v <= 1 for v in (s.center_momentum, s.center_high_momentum, s.center_alpha, s.teacher_momentum,
                                   s.teacher_momentum_end)),
         "ssl.center_momentum, center_high_momentum, center_alpha, teacher_momentum(_end) must be in [0, 1]"),
        (t.max_steps > 0 or t.epochs > 0, f"train.epochs must be > 0 when train.max_steps=0, got {t.epochs}"),
        (_is_folder_name(t.run_name), f"train.run_name must name a folder inside train.out_dir (not empty, '.', "
         f"'..', absolute or climbing out with '..'), got {t.run_name!r}"),
        (t.collapse_gap >= 0, f"train.collapse_gap must be >= 0 nats, got {t.collapse_gap}"),
        (s.freeze_last_layer_epochs >= 0, f"ssl.freeze_last_layer_epochs must be >= 0, got "
         f"{s.freeze_last_layer_epochs}"),
        (t.max_nonfinite_grad_steps >= 1, "train.max_nonfinite_grad_steps must be >= 1"),
        (1 <= t.collective_timeout_s < 2**31, f"train.collective_timeout_s must be in [1, 2**31) seconds, got "
         f"{t.collective_timeout_s}"),
        (0 <= t.seed < 2**32, f"train.seed must be in [0, 2**32) (numpy's seed range), got {t.seed}"),
        (t.peak_tflops >= 0, "train.peak_tflops must be >= 0 (0 = look up the GPU)"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.max_steps >= 0 and t.steps_per_epoch >= 0, "train.max_steps and train.steps_per_epoch must be >= 0"),
        (len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] < t.profile_steps[1],
         "train.profile_steps must be [first, last) with 0 <= first < last"),
        (len(o.betas) == 2, "optim.betas must have two values"),
        (cfg.ssl.num_prototypes >= 1, "ssl.num_prototypes must be >= 1"),
        (min(s.head_layers, s.head_hidden_dim, s.head_bottleneck_dim) >= 1,
         f"ssl.head_layers, ssl.head_hidden_dim and ssl.head_bottleneck_dim must be >= 1, got {s.head_layers}, "
         f"{s.head_hidden_dim}, {s.head_bottleneck_dim}"),
        (s.warmup_teacher_temperature_epochs >= 0,
         f"ssl.warmup_teacher_temperature_epochs must be >= 0, got {s.warmup_teacher_temperature_epochs}"),
        (s.koleo_weight >= 0, f"ssl.koleo_weight must be >= 0 (0 disables KoLeo), got {s.koleo_weight}"),
        (s.koleo_weight == 0 or cfg.data.batch_size >= 2,
         f"ssl.koleo_weight={s.koleo_weight} needs data.batch_size >= 2 (KoLeo compares each image with its nearest "
         f"neighbour in the rank's batch), got {cfg.data.batch_size}; raise the batch or set ssl.koleo_weight=0"),
        (p.dp_replicate >= -1 and (p.dp_shard >= 1 or p.dp_shard == -1),
         "parallel.dp_replicate must be -1, 0 or a count, parallel.dp_shard -1 or a count"),
        (not p.dp_replicate == p.dp_shard == -1, "parallel.dp_replicate and parallel.dp_shard cannot both be -1 "
         "(the rest); give one of them"),
        (p.forward_prefetch >= 0 and p.backward_prefetch >= 0, "parallel.*_prefetch must be >= 0"),
    ]
    for name, epochs in (("train.epochs", t.epochs), ("optim.warmup_epochs", o.warmup_epochs),
                         ("ssl.freeze_last_layer_epochs", s.freeze_last_layer_epochs),
                         ("ssl.warmup_teacher_temperature_epochs", s.warmup_teacher_temperature_epochs)):
        # converted to steps as epochs x steps per epoch: 1e307 overflowed there, after the model was built
        checks.append((epochs <= MAX_EPOCHS, f"{name} must be at most {MAX_EPOCHS:g} epochs, got {epochs:g}"))
    for name, decay in (("optim.weight_decay", o.weight_decay), ("optim.weight_decay_end", o.weight_decay_end)):
        checks.append((decay <= MAX_WEIGHT_DECAY, f"{name} must be at most {MAX_WEIGHT_DECAY:g}, got {decay:g}"))
    for name, temperature in (("ssl.student_temperature", s.student_temperature),
                              ("ssl.teacher_temperature", s.teacher_temperature),
                              ("ssl.warmup_teacher_temperature", s.warmup_teacher_temperature)):
        checks.append((temperature >= MIN_TEMPERATURE, f"{name} must be at least {MIN_TEMPERATURE:g}, got "
                                                       f"{temperature:g}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_ops(cfg.ops)


def _is_folder_name(name: str) -> bool:
    """A run name that keeps the run inside out_dir: a relative path of real folder names (no '', '.', '..')."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and all(p not in ("", ".", "..") for p in parts)


def _validate_ops(prefs: dict[str, str]) -> None:
    """Every `ops.<op>=<backend>` names a registered op and one of its backends (or auto)."""
    from terrafm import ops

    for op, backend in prefs.items():
        if op == "view_rendering":
            raise ConfigError("the view_rendering backend is set by data.backend (auto | numpy | cpp | dali), "
                              "not ops.view_rendering")
        if op == "shard_decode":
            raise ConfigError("ops.shard_decode is not a choice: the DALI loader inflates LZ4 chunks on the GPU "
                              "whenever it runs on CUDA (data.backend=dali), on the host otherwise")
        if op not in ops.REGISTRY:
            raise ConfigError(f"config key 'ops.{op}': unknown op; ops are {', '.join(ops.REGISTRY)}")
        names = list(ops.REGISTRY[op].backends) + ["auto"]
        if backend not in names:
            raise ConfigError(f"config key 'ops.{op}': {backend!r} is not one of {', '.join(names)}")


def check_epoch(cfg: Config, batches_per_rank: int, world_size: int, coverage: str = "",
                samples_per_rank: int | None = None) -> None:
    """The dataset must give at least one batch per epoch (also with train.steps_per_epoch, which sets only the
    schedules' epoch: an empty loader epoch has no batch to give) and one optimiser step unless
    train.steps_per_epoch is set; names the key to change. coverage: the loader's note on locations it leaves out.
    With data.drop_last=false an epoch's last batch holds samples_per_rank % batch_size samples: one is refused
    under KoLeo, which needs two (it ended the run in a traceback at the epoch's end, without a checkpoint)."""
    b = cfg.data.batch_size
    if (samples_per_rank is not None and not cfg.data.drop_last and cfg.ssl.koleo_weight > 0
            and samples_per_rank % b == 1 and b > 1):
        raise ConfigError(f"data.drop_last=false leaves each epoch's last batch with 1 of a rank's {samples_per_rank} "
                          f"samples, and ssl.koleo_weight={cfg.ssl.koleo_weight} needs 2 (KoLeo compares each image "
                          "with its nearest neighbour in the batch); set data.drop_last=true, ssl.koleo_weight=0, or "
                          f"a data.batch_size that does not leave one sample over ({samples_per_rank} % {b} = 1)")
    if batches_per_rank < 1:
        gets = f" ({samples_per_rank} samples)" if samples_per_rank is not None else ""
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is more than each of the {world_size} rank(s) gets "
                          f"from the dataset in an epoch{gets}" + (f" ({coverage})" if coverage else "")
                          + "; lower data.batch_size (or use more data)")
    if cfg.train.steps_per_epoch:
        return
    if batches_per_rank < cfg.train.grad_accum_steps:
        raise ConfigError(f"an epoch has {batches_per_rank} batches per rank, fewer than train.grad_accum_steps="
                          f"{cfg.train.grad_accum_steps}; lower train.grad_accum_steps or set train.steps_per_epoch")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a text value that YAML 1.2 (how read_yaml reads) or YAML 1.1 (PyYAML, other tools)
    would read as something else: run_name 1e3 was written bare, and read back as the float 1000.0."""

    yaml_implicit_resolvers = {first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []),
                                       *_StrictLoader.yaml_implicit_resolvers.get(first, [])]
                               for first in {*yaml.SafeDumper.yaml_implicit_resolvers,
                                             *_StrictLoader.yaml_implicit_resolvers}}


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML that load_config reads back to the same values."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Written whole or not at all: a full disk leaves the previous config.yaml, not an empty one."""
    from terrafm.fileio import atomic_write_bytes

    atomic_write_bytes(Path(path), dump_yaml(cfg).encode())
