"""`terrafm export CKPT OUT.safetensors`: a checkpoint's backbone as one safetensors file.

The file holds the published TerraFM key layout (what `terrafm.models.load_checkpoint` and
`build_model(name)` load with strict=True) and string metadata (safetensors allows only strings):
model (constructor name), source (teacher | student), img_size, patch_size and, for checkpoints of runs
that recorded them, bands / mean / std (JSON {modality: [...]}: the per-band normalisation training
used) and s1_scaling (db | linear), so a user knows how to prepare inputs. The teacher is
exported by default (DINO evaluates the EMA teacher); --student picks the student. Fusion parameters
are dropped unless --with-fusion (they are not part of the published layout). The checkpoint's files are
checked against its checksum manifest first; the output gets the umask's mode (0644 under umask 022) and
replaces an existing file only with --force.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from terrafm.fileio import atomic_write, chmod_shared, folder_problem, os_error_message, path_arg, utf8_path
from terrafm.models import FUSION_PREFIX, check_weights, load_checkpoint, trained_inputs

INPUT_KEYS = ("bands", "mean", "std")  # JSON-encoded {modality: [per band]} entries of the metadata


def input_metadata(loader) -> dict:
    """What inputs the backbone was trained on: {bands, mean, std: {modality: [...]}, s1_scaling}, read from a
    terrafm Loader (its band choice and normalisation); {} for a loader without them (tests' fakes)."""
    mean = getattr(loader, "mean", None)
    if not isinstance(mean, dict) or not mean:
        return {}
    return {"bands": {m: list(loader.cfg.band_list(m)) for m in mean},
            "mean": {m: [float(v) for v in mean[m]] for m in mean},
            "std": {m: [float(v) for v in loader.std[m]] for m in mean},
            "s1_scaling": loader.shards.s1_scaling}


def export_metadata(name: str, which: str, meta: dict) -> dict[str, str]:
    """safetensors metadata (strings only) from a checkpoint's meta.json."""
    model, data = meta.get("model", {}), meta.get("data", {})
    out = {"model": name, "source": which}
    for key in ("img_size", "patch_size", "fusion_heads"):
        if key in model:
            if type(model[key]) is not int:  # int("abc") was the whole message, naming neither file nor key
                raise ValueError(f"model.{key} is {str(model[key])[:40]!r}, not an integer")
            out[key] = str(model[key])
    if "fusion_norm" in model:
        out["fusion_norm"] = str(model["fusion_norm"])
    for key in INPUT_KEYS:
        if key in data:
            out[key] = json.dumps(data[key])
    if "s1_scaling" in data:
        out["s1_scaling"] = str(data["s1_scaling"])
    return out


def export(checkpoint: str | Path, output: str | Path, which: str = "teacher", with_fusion: bool = False,
           force: bool = False) -> Path:
    """Write `output` atomically (temp file + rename), readable as the umask allows; returns its path.
    An existing `output` is replaced only with force (an earlier export is not lost by a typo)."""
    from safetensors import SafetensorError
    from safetensors.torch import save, save_file

    from terrafm.checkpoint_io import kept_while_read, load_backbone_state, read_meta, resolve

    output = Path(output)
    if output.name == ".safetensors":  # a dotfile: Path(".safetensors").suffix is ""
        raise ValueError(f"output {output} needs a file name before .safetensors (e.g. model.safetensors)")
    if output.suffix != ".safetensors":
        raise ValueError(f"output {output} must end in .safetensors")
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give a file name ending in .safetensors")
    if os.path.lexists(output) and not force:  # lexists: a symlink to nothing was refused only after the export
        what = "is a symlink to nothing" if not output.exists() else "exists"
        raise ValueError(f"output {output} {what}; pass --force to replace it, or choose another name")
    problem = folder_problem(output.parent)
    if problem:
        raise ValueError(f"cannot write {output}: {problem}")
    folder = resolve(checkpoint)  # once: a run that checkpoints meanwhile must not give the weights of one step and
    name, state = load_backbone_state(folder, which)  # the metadata of the next (each read says if it was removed)
    with kept_while_read(folder):
        meta = read_meta(folder)
    trained_inputs(meta, folder)  # an input metadata entry load_checkpoint would refuse in the file is refused here
    try:
        metadata = export_metadata(name, which, meta)
    except ValueError as err:
        raise ValueError(f"{folder / 'meta.json'}: {err}") from err
    if not with_fusion:
        state = {k: v for k, v in state.items() if not k.startswith(FUSION_PREFIX)}
    check_weights(state, f"checkpoint {folder}")  # NaN or integer weights: named as such, not blamed on meta.json
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tensors = {k: v.contiguous() for k, v in state.items()}
        try:
            if utf8_path(tmp):
                save_file(tensors, str(tmp), metadata=metadata)
            else:  # safetensors takes only UTF-8 paths: a Latin-1 folder name gets the bytes
                tmp.write_bytes(save(tensors, metadata=metadata))
        except SafetensorError as err:  # safetensors' Rust writer reports I/O failures as its own error
            raise OSError(str(err)) from err
        try:  # an edited meta.json (another model name, image or patch size) wrote files that never loaded
            load_checkpoint(tmp)
        except ValueError as err:
            raise ValueError(f"{folder / 'meta.json'} describes another model than its weights, so the export would "
                             f"not load: {str(err).replace(str(tmp), str(output))}") from err
        chmod_shared(tmp)

    try:  # without force, a file another export published meanwhile is not replaced either
        return atomic_write(output, write, replace=force)
    except FileExistsError as err:
        raise ValueError(f"output {output} exists (written meanwhile by another program); pass --force to replace "
                         "it, or choose another name") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=path_arg,
                        help="a checkpoint folder (step_N), a run's checkpoints/ folder or its latest pointer, or a "
                             "run folder")
    parser.add_argument("output", type=path_arg, help="OUT.safetensors")
    parser.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    parser.add_argument("--with-fusion", action="store_true", help="keep the Case N fusion parameters")
    parser.add_argument("--force", action="store_true", help="replace OUT.safetensors if it exists")


def run(args: argparse.Namespace) -> int:
    from terrafm.checkpoint_io import CheckpointError

    try:
        out = export(args.checkpoint, args.output, "student" if args.student else "teacher", args.with_fusion,
                     args.force)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"terrafm export: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable checkpoint file, or an output that cannot be written
        print(f"terrafm export: {os_error_message(err, [args.output])}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
