"""Model constructors (one registry), published-layout helpers and checkpoint loading."""

import argparse
import inspect
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from terrafm.fileio import file_format, format_from_magic, utf8_path
from terrafm.models.terrafm import TerraFM


@dataclass(frozen=True)
class ModelSpec:
    embed_dim: int
    depth: int
    num_heads: int
    out_indices: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    "terrafm_tiny": ModelSpec(192, 4, 3, (0, 1, 2, 3)),  # CPU tests and the tiny_cpu preset
    "terrafm_small": ModelSpec(384, 12, 6, (3, 5, 7, 11)),
    "terrafm_base": ModelSpec(768, 12, 12, (3, 5, 7, 11)),  # TerraFM-B
    "terrafm_large": ModelSpec(1024, 24, 16, (7, 11, 15, 23)),  # TerraFM-L
}
FUSION_PREFIX = "patch_embed.fusion."
# How a checkpoint's fusion was built, beyond its tensors' shapes (the head count and the norm's place do not show
# in them); files written before these were recorded used the values of LEGACY_FUSION.
FUSION_SETTINGS = ("fusion_heads", "fusion_norm")
LEGACY_FUSION = {"fusion_heads": 16, "fusion_norm": "pooled"}


def _fusion_defaults() -> dict:
    """FUSION_SETTINGS as TerraFM builds them when not told (16 heads, the norm on the values)."""
    params = inspect.signature(TerraFM).parameters
    return {k: params[k].default for k in FUSION_SETTINGS}


def build_model(name: str, **overrides) -> TerraFM:
    """Build a TerraFM backbone by name; overrides go to TerraFM (img_size, fusion, drop_path_rate, ops...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    spec = MODELS[name]
    kwargs = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                  out_indices=spec.out_indices)
    kwargs.update(overrides)
    return TerraFM(name=name, **kwargs)


def published_state_dict(model: TerraFM) -> dict[str, torch.Tensor]:
    """The model's weights restricted to the published TerraFM checkpoint layout (no fusion keys)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(FUSION_PREFIX)}


def infer_model_name(state_dict: dict[str, torch.Tensor]) -> str:
    """Recognise the constructor from the embedding width and depth of a state_dict."""
    dim = state_dict["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for name, spec in MODELS.items():
        if (spec.embed_dim, spec.depth) == (dim, depth):
            return name
    raise ValueError(f"no registered model has embed_dim={dim} and depth={depth}; known: {sorted(MODELS)}")


INPUT_METADATA_KEYS = ("bands", "mean", "std", "s1_scaling", "img_size", "patch_size")


INPUT_METADATA_FORMS = {"bands": "a JSON object {modality: [band names]}",
                        "mean": "a JSON object {modality: [finite numbers]}",
                        "std": "a JSON object {modality: [positive finite numbers]}",
                        "s1_scaling": "db or linear", "img_size": "a positive integer",
                        "patch_size": "a positive integer"}


def _metadata_fits(key: str, value) -> bool:
    """Whether a decoded input_metadata entry has the form eval relies on (INPUT_METADATA_FORMS); statistics are
    finite and a std positive (a NaN mean normalised every image to NaN: chance-level scores with exit 0)."""
    if key == "s1_scaling":
        return value in ("db", "linear")
    if key in ("img_size", "patch_size"):
        return type(value) is int and value > 0
    kinds = (str,) if key == "bands" else (int, float)
    return isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(x, kinds) and not isinstance(x, bool) for x in v)
        and (key == "bands" or all(_finite(x) and (key == "mean" or x > 0) for x in v))
        for v in value.values())


def _finite(x: int | float) -> bool:
    """math.isfinite, False for an int too large for a float (math.isfinite raised OverflowError on 10**400)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _input_metadata(meta: dict, path: Path) -> dict:
    """The input_metadata of an export's string metadata (JSON values decoded); {} for older exports. An entry of
    another form (edited or written by another tool) is refused by name rather than misread (a list of bands where
    eval looks a modality up, an S1 scaling it would take for linear)."""
    out = {}
    for key in INPUT_METADATA_KEYS:
        if key in meta:
            try:
                out[key] = json.loads(meta[key]) if key != "s1_scaling" else meta[key]
            except ValueError as err:
                raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err}): {meta[key][:80]!r}") from err
            except RecursionError as err:
                raise ValueError(f"{path}: metadata {key!r} is nested too deeply: {meta[key][:80]!r}") from err
            if not _metadata_fits(key, out[key]):
                raise ValueError(f"{path}: metadata {key!r} is {meta[key][:80]!r}; expected "
                                 f"{INPUT_METADATA_FORMS[key]}")
    return out


def trained_inputs(meta: dict, path: Path) -> dict:
    """The input metadata a trainer checkpoint's meta.json records under `data` (bands, mean, std, s1_scaling), each
    of the form an export's must have (INPUT_METADATA_FORMS): an edited one is refused by name, not passed on to
    eval's normalisation or into an export that load_checkpoint then refuses."""
    data = meta.get("data", {})
    for key in INPUT_METADATA_KEYS:
        if key in data and not _metadata_fits(key, data[key]):
            raise ValueError(f"{path}: meta.json's data {key!r} is {str(data[key])[:80]!r}; expected "
                             f"{INPUT_METADATA_FORMS[key]}")
    return data


def fusion_settings(meta: dict, path: Path) -> dict:
    """FUSION_SETTINGS of a checkpoint's metadata (safetensors strings or meta.json's model section; LEGACY_FUSION
    where absent); a malformed one (edited, or written by another tool) is refused by name."""
    from terrafm.models.patch_embed import FUSION_NORMS

    out = dict(LEGACY_FUSION)
    if "fusion_heads" in meta:
        heads = meta["fusion_heads"]  # an int in meta.json, a string in safetensors metadata
        whole = type(heads) is int or (isinstance(heads, str) and heads.isascii() and heads.isdecimal()
                                       and len(heads) < 10)  # int() refuses over 4300 digits, in its own words
        if not whole or int(heads) < 1:
            raise ValueError(f"{path}: metadata 'fusion_heads' is {str(heads)[:80]!r}; expected a positive integer")
        out["fusion_heads"] = int(heads)
    if "fusion_norm" in meta:
        if meta["fusion_norm"] not in FUSION_NORMS:
            raise ValueError(f"{path}: metadata 'fusion_norm' is {str(meta['fusion_norm'])[:80]!r}; expected one of "
                             f"{', '.join(FUSION_NORMS)}")
        out["fusion_norm"] = meta["fusion_norm"]
    return out


def _file_kind(path: Path) -> str | None:
    """What a file that torch.load cannot read is, from its first bytes: 'safetensors' (read as such whatever its
    name), a Git LFS pointer or an HTML page (a download gone wrong), another known format, an empty or a text
    file; None if unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if len(head) > 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return "safetensors"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that saved a web page instead of the file)"
    if head[257:262] == b"ustar":
        return "a tar archive: unpack it and pass the checkpoint inside (torch.save's oldest, tar format is not read)"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    known = format_from_magic(head, expected="a ZIP archive")  # torch.save's own container
    if known:
        return known
    text = head.decode(errors="ignore")  # up to 3 bytes lost: a multi-byte character cut at byte 512
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file (it starts {text[:40]!r})"
    return None


def _zip_kind(path: Path) -> str | None:
    """What a ZIP archive that torch.load cannot read holds: a TorchScript model or NumPy arrays; None for anything
    else (a damaged torch.save file: torch's own error names what is wrong with it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(n.endswith("/constants.pkl") for n in names):
        return ("a TorchScript archive (torch.jit.save), whose code terrafm does not run: save the model's "
                "state_dict() with torch.save instead")
    if names and all(n.endswith(".npy") for n in names):
        return "a NumPy .npz archive"
    return None


MAX_INFLATED_BYTES = 2**30  # a .pth zip that expands past this at over 100:1 is refused (_check_expansion)


def _check_expansion(path: Path) -> None:
    """Refuse a .pth zip whose entries expand over 1 GiB at over 100:1: torch.save writes them uncompressed, and
    torch.load would inflate a crafted one into memory without a limit."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load names what is wrong with it
    packed, unpacked = sum(i.compress_size for i in infos), sum(i.file_size for i in infos)
    if unpacked > MAX_INFLATED_BYTES and unpacked > 100 * max(packed, 1):
        raise ValueError(f"{path}: its zip entries expand to {unpacked / 2**30:.1f} GiB from {packed / 2**20:.1f} MiB "
                         "(torch.save does not compress); not a checkpoint terrafm loads")


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor a dense, finite float one: a checkpoint of NaN weights gave chance-level features with exit 0,
    integer or float8 weights garbage, an FSDP2 (DTensor), meta, sparse or quantized one a traceback."""
    for key, value in state.items():
        kind = ("a sharded DTensor (an FSDP2 state_dict: save it gathered, e.g. get_model_state_dict with "
                "full_state_dict=True)" if type(value).__name__ == "DTensor" else
                "on the meta device (no values)" if value.is_meta else
                f"a {value.layout} tensor" if value.layout != torch.strided else
                "quantized" if value.is_quantized else
                f"{value.dtype}, not float16/bfloat16/float32/float64" if value.dtype not in WEIGHT_DTYPES else None)
        if kind is None and not torch.isfinite(value).all():
            kind = f"not finite: {int((~torch.isfinite(value)).sum())} NaN or inf values"
        if kind is not None:
            raise ValueError(f"{source}: weight {key} {tuple(value.shape)} is {kind}")


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")  # weight files a downloaded folder may hold


def checkpoint_folder(path: Path) -> Path:
    """The `terrafm pretrain` checkpoint `path` resolves to; a folder that is none but holds weight files (a Hugging
    Face snapshot with TerraFM-B.pth) names them."""
    from terrafm.checkpoint_io import CheckpointError, resolve

    try:
        return resolve(path)
    except CheckpointError as err:
        files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
                       ) if path.is_dir() else []
        if not files:
            raise
        raise ValueError(f"{path} is not a `terrafm pretrain` checkpoint folder; it holds {', '.join(files[:5])}: "
                         "pass the file") from err


def _read_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(string metadata, tensors) of a safetensors file. safe_open (memory-mapped) takes a str path and refuses one
    that is not UTF-8 (a folder named in Latin-1), which everything else here reads: such a file is read from its
    bytes instead."""
    from safetensors import safe_open
    from safetensors.torch import load

    open(path, "rb").close()  # safetensors reports any open failure as "No such file": a permission error was named so
    if not utf8_path(path):
        data = Path(path).read_bytes()
        tensors = load(data)  # checks the header and every tensor's extent first
        return json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}, tensors
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def _read_state_dict(path: Path) -> tuple[str | None, dict[str, torch.Tensor], dict]:
    """(model name, state_dict, input metadata) of a checkpoint file or folder; ValueError for anything else."""
    from terrafm.checkpoint_io import LATEST

    if path.is_dir() or (path.name == LATEST and path.is_file()):  # resolve() takes a run's checkpoints/latest too
        from terrafm.checkpoint_io import load_backbone_state, read_meta

        checkpoint = checkpoint_folder(path)
        name, state = load_backbone_state(checkpoint)
        meta = read_meta(checkpoint)
        model = meta.get("model", {})
        sizes = {k: model[k] for k in ("img_size", "patch_size") if k in model}
        return name, state, {**trained_inputs(meta, checkpoint), **sizes, **fusion_settings(model, path)}
    if path.exists() and not path.is_file():  # /dev/zero filled memory until killed, a FIFO waited forever
        raise ValueError(f"{path} is not a regular file (a device, a pipe or a socket); pass a checkpoint file or a "
                         "`terrafm pretrain` checkpoint folder")
    if path.suffix == ".safetensors" or _file_kind(path) == "safetensors":
        try:
            meta, tensors = _read_safetensors(path)
        except OSError as err:
            raise ValueError(f"cannot read {path} ({err.strerror or err})") from err
        except Exception as err:  # safetensors' own error types vary by version; all mean "not readable"
            kind = _file_kind(path) or file_format(path, "safetensors")
            if kind == "a ZIP archive":
                kind = "a ZIP archive, as torch.save writes (a .pth named .safetensors?)"
            if kind and kind != "safetensors":  # a Git LFS pointer or a web page saved as model.safetensors
                raise ValueError(f"{path} is not a safetensors file: it is {kind}") from err
            raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err
        # fusion settings where terrafm wrote the file (LEGACY_FUSION for one written before they were recorded);
        # a file without terrafm's metadata says nothing: the defaults, as for a .pth
        ours = any(k in meta for k in ("model", "source", *FUSION_SETTINGS))
        return (meta.get("model"), backbone_entries(tensors, str(path)),
                {**_input_metadata(meta, path), **(fusion_settings(meta, path) if ours else {})})
    _check_expansion(path)
    try:  # weights_only: a pickle that would run code is refused, never executed; DINO's checkpoints keep
        # their argparse.Namespace under 'args' (a plain attribute bag: allowed, it runs nothing)
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        kind = _file_kind(path)
        if kind:
            raise ValueError(f"{path} is not a PyTorch checkpoint: it is {kind}") from err
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise ValueError(f"{path} is a pickle PyTorch's weights-only loader refuses (it names "
                         f"{named.group(1) if named else 'classes other than tensors and containers'}, or was not "
                         "written by torch.save); terrafm never runs code from a file: save a plain state_dict of "
                         "tensors instead") from err
    except Exception as err:
        kind = _file_kind(path)
        if kind:
            raise ValueError(f"{path} is not a PyTorch checkpoint: it is {kind}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path} is not a PyTorch checkpoint terrafm can read ({type(err).__name__}: {first}); "
                         "expected a published .pth, an exported .safetensors or a `terrafm pretrain` "
                         "checkpoint folder") from err
    for key in ("teacher", "model", "state_dict", "student"):  # a student alone only when nothing else is there
        inner = state.get(key) if isinstance(state, dict) else None
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            state = inner  # {"model": {"arch": ...}, "state_dict": weights}: the one that holds tensors
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    other = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:  # e.g. {"model_ema": {...}, "epoch": 3}: say where the tensors are not
        raise ValueError(f"{path} holds a dict whose entries {', '.join(other[:5])} are not tensors; a checkpoint is a "
                         "state_dict of tensors, alone or under 'teacher', 'model', 'state_dict' or 'student'")
    return None, backbone_entries(state, str(path)), {}


HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")  # classifier / DINO projection heads: not the backbone
TRAINING_ONLY = ("mask_token",)  # iBOT's masked-patch token, which DINOv2's ViT holds: never used at inference
# what torch.compile, FSDP1 and activation checkpointing insert into the keys of a wrapped model's state_dict
WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped(key: str) -> str:
    """A state_dict key without the wrappers' parts and DDP's leading 'module.'."""
    for part in WRAPPER_PARTS:
        key = key.replace(part, "")
    return key.removeprefix("module.")


BACKBONE_ANCHOR = "patch_embed.conv2d_s1.weight"  # a key every TerraFM backbone has, under whatever prefix


def backbone_entries(state: dict[str, torch.Tensor], source: str = "the state_dict") -> dict[str, torch.Tensor]:
    """The backbone's tensors of a state_dict, keyed as published. DDP's 'module.' and the parts torch.compile, FSDP1
    and activation checkpointing add are dropped. The backbone is found under whatever prefix its keys carry
    ('backbone.' beside DINO heads, Lightning's 'model.', 'encoder.', ...); of a checkpoint holding a teacher and a
    student (DINO, DINOv2 training checkpoints) the teacher is taken, as DINO evaluates. Heads and the training-only
    mask token of DINOv2's ViT are not part of it."""
    unwrapped = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{source} holds a key {key!r} that is not a string; a state_dict is keyed by parameter "
                             "names")
        bare = _unwrapped(key)
        if bare in unwrapped:  # `cls_token` beside `module.cls_token`: which one is the model's?
            raise ValueError(f"{source} holds two tensors for {bare!r} (one under a wrapper's prefix, such as "
                             f"{key!r}); save the one model on its own")
        unwrapped[bare] = value
    state = unwrapped
    prefixes = sorted({k[:-len(BACKBONE_ANCHOR)] for k in state if k.endswith(BACKBONE_ANCHOR)})
    # 'teacher.' (DINO), 'model.teacher.backbone.' (a Lightning module around it), 'teacher_backbone.' (lightly)
    teacher = [p for p in prefixes if any(part == "teacher" or part.startswith("teacher_") for part in p.split("."))]
    if len(prefixes) > 1 and len(teacher) == 1:
        prefixes = teacher
    if len(prefixes) > 1:
        raise ValueError(f"{source} holds {len(prefixes)} backbones (under {', '.join(map(repr, prefixes))}) "
                         "and none is a teacher's; save the one to load on its own")
    prefix = prefixes[0] if prefixes else ""
    return {k.removeprefix(prefix): v for k, v in state.items()
            if k.startswith(prefix) and not k.removeprefix(prefix).startswith(HEAD_PREFIXES)
            and k.removeprefix(prefix) not in TRAINING_ONLY}


def load_checkpoint(path: str | Path, name: str | None = None, **overrides) -> TerraFM:
    """Load a backbone from a published .pth, an exported .safetensors or a trainer checkpoint dir.

    The state_dict must match the model exactly (strict=True); fusion parameters are kept when the
    checkpoint has them. The model name comes from `name`, the file's metadata, or its shapes.
    The returned model carries `input_metadata`: what its inputs must be, as far as the checkpoint says
    (exports and trainer checkpoints: bands, mean, std per modality, s1_scaling, img_size, patch_size;
    a published .pth: {}).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    stored_name, state, inputs = _read_state_dict(path)
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.conv2d_s1.weight") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a TerraFM backbone: its state_dict has no {', '.join(missing)} "
                         f"(its keys begin {sorted(state)[:3]})")
    check_weights(state, str(path))
    for key, ndim in (("cls_token", 3), ("pos_embed", 3), ("patch_embed.conv2d_s1.weight", 4)):
        shape = tuple(state[key].shape)
        if len(shape) != ndim or 0 in shape or (key == "pos_embed" and shape[1] < 2):
            raise ValueError(f"{path}: {key} has shape {shape}; a TerraFM backbone's is {ndim}-D "
                             "(pos_embed (1, 1 + patches, D), cls_token (1, 1, D), conv weight (D, C, p, p))")
    requested = name  # --model, when given
    try:
        name = name or stored_name or infer_model_name(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}; if it is a model of this shape under another name, pass it (--model)") \
            from err
    n_pos = state["pos_embed"].shape[1] - 1
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise ValueError(f"{path}: pos_embed holds {n_pos} patch positions, not a square grid; TerraFM's is square")
    patch = state["patch_embed.conv2d_s1.weight"].shape[-1]
    fusion = {k: inputs.pop(k) for k in FUSION_SETTINGS if k in inputs}  # not input metadata: how it was built
    fixed = {"fusion": any(k.startswith(FUSION_PREFIX) for k in state), "img_size": side * patch, "patch_size": patch}
    if fixed["fusion"]:  # a published .pth has no fusion; a plain state_dict with one says nothing: the defaults
        unsaid = [k for k in FUSION_SETTINGS if k not in fusion and k not in overrides]
        if unsaid:  # the head count and the norm's place do not show in the tensors: another setting is other outputs
            warnings.warn(f"{path} holds fusion weights but does not record {' or '.join(unsaid)} (a plain state_dict, "
                          f"or a safetensors file saved again without its metadata): building the fusion with "
                          f"{', '.join(f'{k}={_fusion_defaults()[k]!r}' for k in unsaid)}, the defaults. A model "
                          "trained with others gives other outputs: pass them (load_checkpoint(..., fusion_heads=, "
                          "fusion_norm=)), or load the `terrafm export --with-fusion` file or the checkpoint folder, "
                          "which record them", stacklevel=2)
        queries = state.get(FUSION_PREFIX + "queries")
        fixed.update(fusion, **({"fusion_queries": queries.shape[0]} if queries is not None and queries.ndim == 2
                                else {}))
    if inputs.get("patch_size", patch) != patch or inputs.get("img_size", fixed["img_size"]) != fixed["img_size"]:
        raise ValueError(f"{path}: metadata says img_size {inputs.get('img_size')} / patch_size "
                         f"{inputs.get('patch_size')}, its weights are {fixed['img_size']} / {patch}; the file is "
                         "inconsistent")
    clash = [f"{k}={overrides[k]!r} (the checkpoint's {v!r})" for k, v in fixed.items()
             if k in overrides and overrides[k] != v]
    if clash:
        raise ValueError(f"{path}: {', '.join(clash)}: these follow from the checkpoint's weights; leave them out "
                         "(forward() takes any image size that is a multiple of the patch, interpolating pos_embed)")
    try:
        model = build_model(name, **{**overrides, **fixed})
    except ValueError as err:  # a model name or fusion head count from the file's metadata: name the file
        from_metadata = stored_name is not None and name == stored_name
        hint = (f" (the name {stored_name!r} comes from the file's metadata, perhaps another tool's: pass the model "
                "to read the weights as, --model)") if from_metadata else ""
        raise ValueError(f"{path}: {err}{hint}") from err
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        try:  # the name came from --model, or from the file's metadata (another tool's, or edited)
            fits = infer_model_name(state)
        except ValueError:
            fits = None
        given = f"--model {name} was given" if requested else f"the name {name!r} comes from the file's metadata"
        raise ValueError(f"{path} does not match {name}: {len(wrong)} tensors have other shapes, e.g. "
                         f"{'; '.join(wrong[:3])}; {given}: "
                         + (f"pass --model {fits}, the model of these weights" if fits and fits != name else
                            "pass the checkpoint's own model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        def listed(keys: list[str]) -> str:
            return f"{len(keys)} {sorted(keys)[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ValueError(f"{path} does not match {name}: missing {listed(missing)}, unexpected {listed(unexpected)}")
    model.input_metadata = inputs
    return model
