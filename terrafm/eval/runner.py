"""One evaluation run: read splits, normalise with training statistics (nodata pixels become the band mean),
extract (cached) frozen features, run the probes at each label fraction, write results.json and
confusion-matrix PNGs."""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from terrafm.eval import metrics, probes
from terrafm.eval.data import (
    EvalSplit,
    MissingSplitError,
    geobench_label_subset,
    input_statistics,
    nodata_pixels,
    read_split,
    row_chunks,
    s1_units,
    shared_files,
    to_s1_scaling,
)
from terrafm.eval.features import cache_key, cached_features, checkpoint_identity, extract, images_digest
from terrafm.fileio import atomic_write_bytes

PROBES_BY_TASK = {"classification": ("knn", "linear"), "multilabel": ("knn", "linear"), "segmentation": ("seg",)}
PROBES = tuple(dict.fromkeys(p for probes in PROBES_BY_TASK.values() for p in probes))  # knn, linear, seg


@dataclass
class EvalConfig:
    checkpoint: str
    data: str
    format: str
    out: str
    probes: tuple[str, ...] = ("all",)
    modality: str = "auto"
    band_order: str = "auto"  # auto | esa | eurosat: the order of 12/13 S2 channels (eval/data.py)
    fractions: tuple[float, ...] = (1.0, 0.01)
    seed: int = 0
    batch_size: int = 64
    img_size: int | None = None
    normalize: str = "auto"  # auto | checkpoint | dataset: whose per-band statistics normalise the images
    device: str = "cpu"
    cache_dir: str | None = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    linear_epochs: int = 100
    seg_epochs: int = 50
    class_names: list[str] = field(default_factory=list)
    # features.checkpoint_identity of the checkpoint as loaded (the cli takes it before loading); None: taken here
    checkpoint_id: dict | None = None


def _load_splits(cfg: EvalConfig) -> dict[str, EvalSplit]:
    train = read_split(cfg.data, cfg.format, "train", cfg.modality, cfg.class_names or None, cfg.band_order)
    names, order = train.class_names or None, train.band_order  # every split is read as train was
    splits = {"train": train, "test": read_split(cfg.data, cfg.format, "test", train.modality, names, order)}
    try:
        splits["val"] = read_split(cfg.data, cfg.format, "val", train.modality, names, order)
    except MissingSplitError:
        pass  # the validation split is optional
    for name, split in splits.items():
        if split.images.shape[1:2] != train.images.shape[1:2] or split.task != train.task:
            raise ValueError(f"split {name!r} ({split.task}, {split.images.shape[1]} bands) does not match "
                             f"train ({train.task}, {train.images.shape[1]} bands)")
        if split.task == "multilabel" and split.labels.shape[1] != train.labels.shape[1]:
            raise ValueError(f"split {name!r} of {cfg.data} has multi-hot labels of {split.labels.shape[1]} entries, "
                             f"train of {train.labels.shape[1]}: every split's vectors must list the same labels")
    _check_labels(splits, cfg.data)
    return splits


def _check_labels(splits: dict[str, EvalSplit], data: str) -> None:
    """Class ids are >= 0 (masks: 255 = ignore), multi-hot vectors 0/1, and a test / val class occurs in train
    (no probe can predict a class it never saw: a label out of range is a dataset error)."""
    train = splits["train"]
    shared = shared_files(splits)
    if shared:  # a probe scored on images it was fitted on
        first, other, path, twin = shared[0]
        raise ValueError(f"{data}: {len(shared)} image file(s) are in two splits, e.g. {path} ({first}) is {twin} "
                         f"({other}); every image belongs to one split")
    for name, split in splits.items():
        y = split.labels
        if split.task == "multilabel":
            bad = ~np.isin(y, (0, 1))
            if bad.any():
                raise ValueError(f"split {name!r} of {data}: multi-label vectors must hold 0 or 1, got {y[bad][0]:g}")
            if name == "train" and not y.any():  # as a train split of one class: every score 0, nothing told apart
                raise ValueError(f"the train split of {data} has no positive label: every multi-hot vector is 0, "
                                 "so a probe has nothing to learn")
            continue
        ids = np.unique(y)
        ids = ids[ids != probes.IGNORE_INDEX] if split.task == "segmentation" else ids
        if len(ids) and ids.min() < 0:
            raise ValueError(f"split {name!r} of {data}: label {int(ids.min())} is negative; class ids are 0, 1, ..."
                             + (f" ({probes.IGNORE_INDEX} = ignore)" if split.task == "segmentation" else ""))
        if split.task == "classification" and name != "train":
            unseen = np.setdiff1d(ids, train.labels)
            if len(unseen):
                raise ValueError(f"split {name!r} of {data} has class id(s) {unseen[:10].tolist()} that the train "
                                 f"split lacks (train has {np.unique(train.labels)[:20].tolist()}): a label out of "
                                 "range?")


def _compact_classes(splits: dict[str, EvalSplit], data: str) -> list[int]:
    """Renumber the class ids that occur in the splits to 0..K-1 (in place, sorted; mask pixels at 255 stay
    ignored) and return the original ids, one per confusion-matrix row. With K = largest id + 1, sparse ids
    ({3, 7}, WorldCover's 10..100) gave the probes outputs for classes no sample has (which they could predict) and
    an id near MAX_CLASSES a K x K confusion matrix of many GiB. A train split of one class, or a split without
    a labelled pixel, is refused: every probe would score 100% (or 0) without telling anything apart."""
    train = splits["train"]
    seg = train.task == "segmentation"
    for name, split in splits.items():
        if seg and not (split.labels != probes.IGNORE_INDEX).any():
            raise ValueError(f"split {name!r} of {data}: every mask pixel is {probes.IGNORE_INDEX} (ignored or "
                             "nodata): no labelled pixel to fit or score")
    train_ids = np.unique(train.labels)
    train_ids = train_ids[train_ids != probes.IGNORE_INDEX] if seg else train_ids
    if len(train_ids) < 2:
        raise ValueError(f"the train split of {data} has one class (id {int(train_ids[0])}): a probe has nothing to "
                         "tell apart and would score 100%")
    ids = np.unique(np.concatenate([np.unique(s.labels) for s in splits.values()]))
    ids = ids[ids != probes.IGNORE_INDEX] if seg else ids
    if seg and len(ids) > probes.IGNORE_INDEX:
        raise ValueError(f"{data} has {len(ids)} mask classes; at most {probes.IGNORE_INDEX} fit beside the ignore "
                         f"value {probes.IGNORE_INDEX}")
    if np.array_equal(ids, np.arange(len(ids))):  # already 0..K-1 (most sets): no copy of the masks
        return ids.tolist()
    for split in splits.values():
        compact = np.searchsorted(ids, split.labels)
        split.labels = np.where(split.labels == probes.IGNORE_INDEX, split.labels, compact) if seg else compact
    return ids.tolist()


def _train_subset(cfg: EvalConfig, train: EvalSplit, fraction: float) -> tuple[np.ndarray, str]:
    """(indices into the train split, which subset) of one label fraction: the GEO-Bench dataset's own partition
    file for it where there is one (results compare with GEO-Bench's), else a stratified subset. evaluate resolves
    every fraction before extracting features, so a broken partition file of a later fraction is refused before the
    first fraction's probes run."""
    own = geobench_label_subset(cfg.data, fraction, train.files) if cfg.format == "hdf5" else None
    if own is not None:
        return own
    return probes.label_subset(train.labels, fraction, cfg.seed), f"stratified, seed {cfg.seed}"


def evaluate(cfg: EvalConfig, model) -> dict:
    """Run every requested probe at every label fraction; returns (and writes) the results dict."""
    out = Path(cfg.out)
    checkpoint_id = cfg.checkpoint_id or checkpoint_identity(cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    splits = _load_splits(cfg)
    train = splits["train"]
    task, modality = train.task, train.modality
    class_ids = _compact_classes(splits, cfg.data) if task != "multilabel" else list(range(train.labels.shape[1]))
    names = train.class_names
    class_names = [names[i] if i < len(names) else str(i) for i in class_ids]
    wanted = PROBES_BY_TASK[task] if "all" in cfg.probes else tuple(cfg.probes)
    unfit = [p for p in wanted if p not in PROBES_BY_TASK[task]]
    if unfit:
        raise ValueError(f"probe(s) {unfit} do not apply to a {task} dataset; use {list(PROBES_BY_TASK[task])}")
    subsets = [(fraction, *_train_subset(cfg, train, fraction)) for fraction in cfg.fractions]
    inputs = getattr(model, "input_metadata", {}) or {}
    s1 = {}
    if modality == "s1" and inputs.get("s1_scaling"):  # S1 in the units the backbone was trained on
        units = {name: s1_units(split.images) for name, split in splits.items()}
        if len(set(units.values())) > 1:  # one conversion for all: a split in other units would be scored wrongly
            found = ", ".join(f"{name}: {unit}" for name, unit in units.items())
            raise ValueError(f"{cfg.data}: the S1 splits are in different units ({found}); give every split in dB "
                             "or every split in linear power")
        s1 = {"s1_input_units": units["train"], "s1_scaling": inputs["s1_scaling"]}
        for split in splits.values():
            for chunk in row_chunks(split.images):  # in place: no second copy of the split
                chunk[...] = to_s1_scaling(chunk, inputs["s1_scaling"], units["train"])
    mean, std, stats_from = input_statistics(train, inputs, cfg.normalize)
    prep = f"{stats_from}:{mean.tolist()}:{std.tolist()}:{s1.get('s1_scaling')}:{train.band_order}"
    kind = "multiscale" if task == "segmentation" else "cls"
    cache_dir = cfg.cache_dir or out / "cache"
    feats = {}
    for name, split in splits.items():
        key = cache_key(checkpoint_id, cfg.data, name, modality, cfg.img_size, kind, prep, images_digest(split.images))
        feats[name] = cached_features(cache_dir, key, lambda s=split, n=name: extract(
            model, s.images, modality, kind, cfg.batch_size, cfg.img_size, cfg.device, desc=f"{n} features",
            stats=(mean, std)), rows=len(split.labels))
        finite = np.isfinite(feats[name].reshape(len(feats[name]), -1)).all(axis=1)
        if not finite.all():  # one NaN row made every kNN vote NaN (all predictions class 0) and the probe's mean NaN
            first = int(np.argmin(finite))
            where = split.files[first] if split.files else f"sample {first}"
            raise ValueError(f"{cfg.checkpoint} gives non-finite features for {int((~finite).sum())} {name} image(s), "
                             f"the first {where}: a pixel value far outside the statistics the model normalises with "
                             "(an untagged fill value?); mask it as nodata or remove the image")
    num_classes = len(class_ids)
    results = {"checkpoint": str(cfg.checkpoint), "data": str(cfg.data), "format": cfg.format, "task": task,
               "modality": modality, "band_order": train.band_order, "num_classes": num_classes,
               "class_ids": class_ids, "class_names": class_names, "seed": cfg.seed,
               "statistics": stats_from, **s1,
               "splits": {n: len(s.labels) for n, s in splits.items()},
               "nodata_pixels": {n: nodata_pixels(s.images) for n, s in splits.items()}, "runs": []}
    test_labels = splits["test"].labels
    figures = []  # (confusion matrix, file name, title): drawn once every probe has run
    for fraction, idx, subset in subsets:
        x_tr, y_tr = feats["train"][idx], train.labels[idx]
        for probe in wanted:
            start = time.perf_counter()
            extra = {}
            scores = None  # (M, K) per-label scores of the multi-label probes, for mAP
            if probe == "knn":
                shares = probes.knn_scores(x_tr, y_tr, feats["test"], cfg.knn_k, cfg.knn_temperature, num_classes)
                pred = probes.knn_decision(shares, multilabel=task == "multilabel")
                scores = shares if task == "multilabel" else None
                extra = {"k": min(cfg.knn_k, len(idx)), "temperature": cfg.knn_temperature}
            elif probe == "linear":
                val = splits.get("val")
                pred, lr, scores = probes.linear_probe(x_tr, y_tr, feats["test"], feats.get("val"),
                                                       val.labels if val is not None else None, cfg.linear_lrs,
                                                       cfg.linear_epochs, cfg.seed, num_classes)
                extra = {"lr": lr, "epochs": cfg.linear_epochs}
            else:
                pred = probes.segmentation_probe(x_tr, y_tr, feats["test"], num_classes, cfg.seg_epochs,
                                                 seed=cfg.seed, out_size=test_labels.shape[-2:])
                extra = {"epochs": cfg.seg_epochs}
            run = {"probe": probe, "fraction": fraction, "train_samples": int(len(idx)), "subset": subset, **extra}
            tag = f"{probe}_{fraction * 100:g}pct"
            if task == "multilabel":
                run.update(metrics.multilabel_f1(test_labels, pred), **metrics.multilabel_map(test_labels, scores))
            else:
                report = metrics.segmentation_report if task == "segmentation" else metrics.classification_report
                scores, cm = report(test_labels, pred, num_classes)
                run.update(scores)
                figures.append((cm, f"confusion_{tag}.png", f"{probe}, {fraction * 100:g}% labels"))
                run["confusion_png"] = f"confusion_{tag}.png"
                run["confusion_matrix"] = cm.tolist()
            run["seconds"] = round(time.perf_counter() - start, 3)
            results["runs"].append(run)
    publish_results(out, results, figures, class_names)
    return results


def publish_results(out: Path, results: dict, figures: list, class_names: list[str]) -> None:
    """Write results.json and its confusion PNGs as one set: the PNGs are drawn to staged names first, results.json
    replaces the old one, then the PNGs take their names (renames, which a full disk does not stop). A run that failed
    midway (a probe's error, a full disk) used to leave the last run's results.json beside PNGs of its own."""
    staged = []
    try:
        for cm, name, title in figures:
            staged.append((out / f".{name}.staged", out / name))
            metrics.save_confusion_png(cm, staged[-1][0], class_names, title=title)
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())  # a full disk keeps the last
    except BaseException:
        for path, _ in staged:
            path.unlink(missing_ok=True)
        raise
    for path, final in staged:
        os.replace(path, final)
