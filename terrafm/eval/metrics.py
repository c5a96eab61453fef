"""Metrics for the probes (top-1, macro F1, multi-label F1, mIoU) and the confusion-matrix PNG."""

from pathlib import Path

import numpy as np

from terrafm.fileio import atomic_write, shown


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted; pixels equal to ignore_index (None: none) skipped."""
    target, pred = np.asarray(target).ravel(), np.asarray(pred).ravel()
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def top1(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(cm.sum(), 1))


def macro_f1(cm: np.ndarray) -> float:
    """Mean over classes present in target or prediction of 2 TP / (2 TP + FP + FN)."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present])) if present.any() else 0.0


def mean_iou(cm: np.ndarray) -> float:
    """Mean over classes present in target or prediction of TP / (TP + FP + FN)."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return float(np.mean(tp[present] / union[present])) if present.any() else 0.0


def multilabel_f1(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of multi-hot (N, K) predictions. Macro is over all K labels, a label with no positive in
    truth or prediction scoring 0, as sklearn's f1_score(average="macro", zero_division=0) and torchmetrics'
    MultilabelF1Score(average="macro") do, so the numbers compare with results computed by either."""
    target, pred = np.asarray(target).astype(bool), np.asarray(pred).astype(bool)
    tp = (target & pred).sum(0).astype(np.float64)
    fp, fn = (~target & pred).sum(0), (target & ~pred).sum(0)
    denom = 2 * tp + fp + fn
    micro = 2 * tp.sum() / max(denom.sum(), 1)
    macro = float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))) if denom.size else 0.0
    return {"f1_micro": float(micro), "f1_macro": macro}


def _average_precision(target: np.ndarray, scores: np.ndarray) -> float:
    """Sum over score thresholds of (recall step) x precision, ties at one threshold (sklearn's
    average_precision_score: no interpolation); target holds at least one positive."""
    order = np.argsort(-scores, kind="mergesort")
    target, scores = target[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last sample of each distinct score
    tp = np.cumsum(target)[last]
    precision, recall = tp / (last + 1), tp / target.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_map(target: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Mean average precision of (N, K) label scores: macro over all K labels, a label with no positive in target
    scoring 0, as sklearn's average_precision_score(average="macro") and torchmetrics'
    MultilabelAveragePrecision(average="macro") do (both warn that its recall is undefined, set it to 1 and get AP
    0), so a test split that lacks a label reads lower, as multilabel_f1's macro does; micro over all (sample, label)
    pairs. The ranking metric of the BigEarthNet linear-probe literature, which thresholded F1 does not compare
    with."""
    target, scores = np.asarray(target).astype(bool), np.asarray(scores, dtype=np.float64)
    per_label = [_average_precision(target[:, j], scores[:, j]) if target[:, j].any() else 0.0
                 for j in range(target.shape[1])]
    macro = float(np.mean(per_label)) if per_label else 0.0
    micro = _average_precision(target.ravel(), scores.ravel()) if target.any() else 0.0
    return {"map_macro": macro, "map_micro": micro}


def classification_report(target: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[dict, np.ndarray]:
    cm = confusion_matrix(target, pred, num_classes, ignore_index=None)  # 255 is a class here, not segmentation's void
    return {"top1": top1(cm), "f1_macro": macro_f1(cm)}, cm


def segmentation_report(target: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[dict, np.ndarray]:
    cm = confusion_matrix(target, pred, num_classes)
    return {"miou": mean_iou(cm), "pixel_acc": top1(cm)}, cm


def save_confusion_png(cm: np.ndarray, path: str | Path, class_names: list[str] | None = None,
                       title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib Agg: no display needed). Class names are folder names,
    which may hold bytes that are not UTF-8: they are drawn escaped (fileio.shown), which the font can encode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cm.shape[0]
    names = [shown(n) for n in class_names] if class_names and len(class_names) == k else [str(i) for i in range(k)]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + 0.4 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    try:
        fig.tight_layout()
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
