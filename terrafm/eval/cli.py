"""`terrafm eval`: frozen-feature kNN / linear / segmentation probes of a checkpoint on a benchmark."""

import argparse
import dataclasses
import pickle
import sys
from pathlib import Path

from terrafm.eval.data import BAND_ORDERS, FORMATS, NORMALIZATIONS
from terrafm.eval.runner import PROBES, EvalConfig, evaluate
from terrafm.fileio import folder_problem, os_error_message, out_of_memory, path_arg, shown
from terrafm.modalities import MODALITY_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=path_arg,
                        help="published .pth, exported .safetensors, or a `terrafm pretrain` run/checkpoint folder")
    parser.add_argument("--data", required=True, type=path_arg,
                        help="dataset root (GEO-Bench HDF5 folder or class folders)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hdf5: GEO-Bench (one .hdf5 per sample, task metadata and partitions); folder: "
                             "SPLIT/CLASS/*.tif (image files in one folder per class), or SPLIT/images/ + "
                             "SPLIT/masks/ for segmentation (docs/eval.md)")
    parser.add_argument("--probe", nargs="+", default=["all"], choices=(*PROBES, "all"),
                        help="probes to run (default: all); 'all' = knn+linear for classification, seg for "
                             "segmentation")
    parser.add_argument("--modality", default="auto", choices=("auto", *MODALITY_NAMES),
                        help="which patch embedding reads the bands (auto: 13 bands -> s2_l1c, 12 -> s2_l2a)")
    parser.add_argument("--band-order", default="auto", choices=BAND_ORDERS,
                        help="order of 12/13 S2 bands: esa (B8A after B08), eurosat (B8A last, as EuroSAT-MS files "
                             "and m-eurosat's data), or auto: told from the cirrus band B10's place in 13-band data, "
                             "else esa")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.01],
                        help="fractions of training labels (default: 1.0 0.01): a GEO-Bench dataset's own "
                             "{fraction:.2f}x_train_partition.json where it has one, else a stratified subset "
                             "(--seed)")
    parser.add_argument("--out", required=True, type=path_arg,
                        help="folder for results.json, confusion PNGs and the cache")
    parser.add_argument("--seed", type=int, default=0,
                        help="label subsets and probe training, 0 to 2**63 - 1 (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="resize images to this size (px) first (default: their own size); a multiple of the "
                             "patch size (e.g. 120 -> 128)")
    parser.add_argument("--normalize", default="auto", choices=NORMALIZATIONS,
                        help="per-band statistics: the checkpoint's training statistics (exports carry them), the "
                             "train split's own, or auto = the checkpoint's when it has them")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--cache-dir", default=None, type=path_arg, help="feature cache (default: OUT/cache)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN vote (default: 20, DINO's)")
    parser.add_argument("--knn-temperature", type=float, default=0.07,
                        help="temperature of the kNN vote weights exp(sim / T) (default: 0.07, DINO's)")
    parser.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs (default: 100)")
    parser.add_argument("--seg-epochs", type=int, default=50, help="segmentation probe epochs (default: 50)")
    parser.add_argument("--model", default=None, help="model name when the checkpoint cannot tell (e.g. terrafm_base)")


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers, the device or the output folders, before anything is read."""
    import math

    import torch

    counts = {"--batch-size": args.batch_size, "--knn-k": args.knn_k, "--linear-epochs": args.linear_epochs,
              "--seg-epochs": args.seg_epochs, "--img-size": 1 if args.img_size is None else args.img_size}
    for flag, value in counts.items():
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    bad = [f for f in args.fractions if not 0 < f <= 1]  # NaN fails both comparisons
    if bad:
        return f"--fractions must be in (0, 1], got {bad[0]}"
    if not (math.isfinite(args.knn_temperature) and args.knn_temperature > 0):
        return f"--knn-temperature must be a positive number, got {args.knn_temperature}"
    if not 0 <= args.seed < 2**63:  # numpy refuses a negative seed, torch one past 64 bits: after the features
        return f"--seed must be in 0 .. 2**63 - 1, got {args.seed}"
    if args.device is not None:
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            return f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N"
        if kind not in ("cpu", "cuda"):
            return f"--device {args.device!r}: the probes run on cpu or cuda"
        if kind == "cuda" and not torch.cuda.is_available():
            return f"--device {args.device}: CUDA is not available here; use --device cpu (or leave it out)"
        count = torch.cuda.device_count() if kind == "cuda" else 0
        if kind == "cuda" and (torch.device(args.device).index or 0) >= count:  # was a traceback moving the model
            return f"--device {args.device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    for flag, folder in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            return f"{flag} {folder} is a file; give a folder (it is created if missing)"
        problem = folder_problem(Path(folder)) if folder is not None else None
        if problem:  # found after every split was read and its features computed, which were lost
            return f"{flag} {folder}: {problem}"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from terrafm import checkpoint_io
    from terrafm.eval.features import checkpoint_identity
    from terrafm.models import checkpoint_folder, load_checkpoint

    problem = _argument_problem(args)
    if problem:
        print(f"terrafm eval: error: {problem}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EvalConfig(checkpoint=args.checkpoint, data=args.data, format=args.format, out=args.out,
                     probes=tuple(args.probe), modality=args.modality, band_order=args.band_order,
                     fractions=tuple(args.fractions), seed=args.seed, batch_size=args.batch_size,
                     img_size=args.img_size, normalize=args.normalize, device=device,
                     cache_dir=args.cache_dir, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                     linear_epochs=args.linear_epochs, seg_epochs=args.seg_epochs)
    try:
        checkpoint = Path(args.checkpoint)
        if checkpoint.is_dir() or checkpoint.name == checkpoint_io.LATEST:
            # once: the weights, the feature cache's key and results.json name one step
            checkpoint = checkpoint_folder(checkpoint)
        cfg = dataclasses.replace(cfg, checkpoint=str(checkpoint), checkpoint_id=checkpoint_identity(checkpoint))
        model = load_checkpoint(checkpoint, name=args.model)
        results = evaluate(cfg, model)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
        print(f"terrafm eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable input, --out / --cache-dir not writable, a full disk
        outputs = [args.out, args.cache_dir or Path(args.out) / "cache"]
        print(f"terrafm eval: error: {os_error_message(err, outputs)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"terrafm eval: error: out of memory ({detail}); lower --batch-size or --img-size", file=sys.stderr)
        return 2
    for r in results["runs"]:
        scores = {k: r[k] for k in ("top1", "f1_macro", "f1_micro", "map_macro", "map_micro", "miou", "pixel_acc")
                  if k in r}
        print(f"{r['probe']:>6} {r['fraction'] * 100:>5g}% labels ({r['train_samples']} samples): "
              + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    masked = {n: c for n, c in results["nodata_pixels"].items() if c}
    if masked:
        print("nodata pixel values filled with the band mean: " + ", ".join(f"{n} {c}" for n, c in masked.items()))
    if results["band_order"] == "eurosat":
        print("S2 bands read in EuroSAT's order (B8A last; --band-order esa to override)")
    print(f"normalised with the {results['statistics']} statistics; results: {shown(args.out)}/results.json")
    return 0
