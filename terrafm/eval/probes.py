"""Probes on frozen features: kNN (DINO protocol), linear (logistic regression), segmentation (1x1 conv).

All take numpy features and labels and return predictions; metrics live in terrafm.eval.metrics.
Labels: (N,) class ids, (N, K) multi-hot (multi-label), or (N, H, W) masks (segmentation).
"""

import numpy as np
import torch
import torch.nn.functional as F

from terrafm.eval.metrics import multilabel_f1

IGNORE_INDEX = 255


def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a stratified `fraction` of the training labels, at least one per class (fixed seed).

    Multi-label and segmentation labels are subsampled uniformly (at least one sample).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    if fraction == 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels.ndim != 1:
        return np.sort(rng.permutation(n)[: max(1, round(fraction * n))])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(picked))


def _l2(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.normalize(torch.as_tensor(np.ascontiguousarray(x)).to(dtype), dim=1)


@torch.no_grad()
def knn_scores(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
               groups: tuple[np.ndarray, np.ndarray] | None = None, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """DINO kNN votes: cosine similarity of L2-normalised features, top-k votes weighted by exp(sim / T), as (M, K)
    shares of each test sample's vote weight per class (per label for multi-label).

    The weights are computed as exp((sim - max sim) / T), the same votes divided by one constant per test sample:
    exp(sim / T) overflows float32 for T below ~0.0113 (exp(1 / 0.01) > 3.4e38), and neighbours tied at inf
    would hand the vote to the lowest class id. k is capped at the number of training samples a test sample may
    vote with. groups (train groups (N,), test groups (M,)): a test sample never votes with a training sample of
    its own group (leave-one-group-out; the training and test features may then be the same array).
    dtype: of the similarities (float64 for the learning probe, whose margins are a few tiles).
    """
    train, test = _l2(train_feats, dtype), _l2(test_feats, dtype)
    multilabel = train_labels.ndim == 2
    targets = torch.from_numpy(train_labels).to(dtype) if multilabel else F.one_hot(
        torch.from_numpy(train_labels).long(), num_classes or int(train_labels.max()) + 1).to(dtype)
    if groups is not None:
        train_groups, test_groups = (torch.as_tensor(np.asarray(g)) for g in groups)
        if train_groups.shape != (len(train),) or test_groups.shape != (len(test),):
            raise ValueError(f"groups must be ({len(train)},) and ({len(test)},) arrays, got "
                             f"{tuple(train_groups.shape)} and {tuple(test_groups.shape)}")
        others = min(int((test_groups[start:start + chunk, None] != train_groups[None]).sum(1).min())
                     for start in range(0, len(test), chunk))
        if others == 0:
            raise ValueError("a test sample has no training sample outside its own group to vote with")
        k = min(k, others)
    k = min(k, len(train))
    shares = []
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        if groups is not None:
            sim.masked_fill_(test_groups[start:start + chunk, None] == train_groups[None], -torch.inf)
        sim, idx = sim.topk(k, dim=1)
        # topk sorts: column 0 is the largest. float64: a temperature under float32's range (1e-50) was 0 there, and
        # the top neighbour's 0 / 0 a NaN vote
        weights = ((sim - sim[:, :1]).double() / temperature).exp().to(dtype)
        shares.append((weights[..., None] * targets[idx]).sum(1) / weights.sum(1, keepdim=True))
    return torch.cat(shares).numpy()


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """knn_scores' decision (knn_decision)."""
    shares = knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)
    return knn_decision(shares, multilabel=train_labels.ndim == 2)


def knn_decision(shares: np.ndarray, multilabel: bool) -> np.ndarray:
    """(M,) class ids of knn_scores' shares (a tie goes to the lowest class id), or (M, K) multi-hot where a
    label wins when its share of the weighted vote exceeds half."""
    return (shares > 0.5).astype(np.float32) if multilabel else shares.argmax(1)


def absent_classes(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(K,) logit offsets: 0 for the classes the training labels hold, -inf for the others. A probe cannot learn a
    class it has no sample of (a 1% subset may lack some): their randomly initialised weights predicted them for
    test images unlike the training ones. As sklearn's LogisticRegression, which knows only the classes it was fit
    on, such a class gets no output (mask pixels at IGNORE_INDEX are no class). With no class at all (a subset of
    masks without a labelled pixel) nothing is masked: all -inf made the head NaN."""
    present = np.zeros(num_classes, dtype=bool)
    ids = np.unique(labels)
    present[ids[ids < num_classes]] = True
    return torch.from_numpy(np.where(present | ~present.any(), 0.0, -np.inf).astype(np.float32))


def _fit_linear(x: torch.Tensor, y: torch.Tensor, out_dim: int, lr: float, epochs: int, seed: int,
                multilabel: bool):
    """Train a linear head; returns the logits function (classes absent from y masked, absent_classes)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], out_dim)
    offset = torch.zeros(out_dim) if multilabel else absent_classes(y.numpy(), out_dim)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    batch = 256
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            loss_fn(head(x[idx]) + offset, y[idx]).backward()
            opt.step()
    return lambda features: head(features) + offset


def _linear_out(head, x: torch.Tensor, multilabel: bool) -> np.ndarray:
    with torch.no_grad():
        logits = head(x)
    return (logits > 0).float().numpy() if multilabel else logits.argmax(1).numpy()


def _linear_scores(head, x: torch.Tensor, multilabel: bool) -> np.ndarray:
    """(M, K) probabilities: a sigmoid per label, or the softmax over classes."""
    with torch.no_grad():
        logits = head(x)
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy()


def standardisation(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training features, in float64 (the squares of float32 features above ~1e19
    overflow). A feature (near-)constant in training keeps its scale (std 1, as sklearn's StandardScaler does):
    dividing by ~0 would blow tiny test-time differences up into the largest inputs of a weight that training
    never moved (its input was always 0)."""
    feats = np.asarray(feats, dtype=np.float64)
    mean, std = feats.mean(0), feats.std(0)
    return mean, np.where(std > 1e-6 * np.maximum(np.abs(mean), 1), std, 1.0)


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 val_feats: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1), epochs: int = 100, seed: int = 0,
                 num_classes: int | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """Logistic regression on standardised features; lr chosen on the validation split.

    Without a validation split the lr is chosen on a seeded 20% hold-out of the training features
    (when it leaves at least 5 samples), then refit on all of them. Returns (test predictions, lr, test scores:
    (M, K) probabilities, a sigmoid per label or the softmax over classes).
    """
    multilabel = train_labels.ndim == 2
    mean, std = standardisation(train_feats)
    prep = lambda f: torch.from_numpy(((f - mean) / std).astype(np.float32))  # noqa: E731
    out_dim = train_labels.shape[1] if multilabel else (num_classes or int(train_labels.max()) + 1)
    y_all = torch.from_numpy(train_labels).float() if multilabel else torch.from_numpy(train_labels).long()
    x_all = prep(train_feats)
    if val_feats is None and len(train_feats) >= 25:
        perm = np.random.default_rng(seed).permutation(len(train_feats))
        cut = len(perm) // 5
        fit_idx, val_idx = torch.from_numpy(perm[cut:]), torch.from_numpy(perm[:cut])
        x_fit, y_fit, x_val, y_val = x_all[fit_idx], y_all[fit_idx], x_all[val_idx], train_labels[perm[:cut]]
    elif val_feats is not None:
        x_fit, y_fit, x_val, y_val = x_all, y_all, prep(val_feats), val_labels
    else:
        x_fit = None
    best_lr = lrs[0]
    if x_fit is not None and len(lrs) > 1:
        scores = []
        for lr in lrs:
            pred = _linear_out(_fit_linear(x_fit, y_fit, out_dim, lr, epochs, seed, multilabel), x_val, multilabel)
            # the metric reported: micro F1 for multi-label (per-label accuracy rewards predicting "absent" on sparse
            # labels and chose an lr with half the F1), accuracy otherwise
            scores.append(multilabel_f1(y_val, pred)["f1_micro"] if multilabel else float((pred == y_val).mean()))
        best_lr = lrs[int(np.argmax(scores))]
    head = _fit_linear(x_all, y_all, out_dim, best_lr, epochs, seed, multilabel)
    x_test = prep(test_feats)
    return _linear_out(head, x_test, multilabel), best_lr, _linear_scores(head, x_test, multilabel)


def segmentation_probe(train_maps: np.ndarray, train_masks: np.ndarray, test_maps: np.ndarray,
                       num_classes: int, epochs: int = 50, lr: float = 1e-2, seed: int = 0,
                       batch_size: int = 16, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Per-pixel linear head: BatchNorm + 1x1 conv on multi-scale maps (N, L*D, h, w), upsampled
    bilinearly to the mask size (H, W) and trained with cross-entropy (pixels = 255 ignored).

    A batch of one image trains too (BatchNorm's statistics are over its pixels): a 1% subset of a small set is
    often one image, which a per-sample rule would leave as the untrained random head.
    Returns (M, H, W) predicted class ids, (H, W) = out_size or the training mask size.
    """
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.BatchNorm2d(train_maps.shape[1]),
                               torch.nn.Conv2d(train_maps.shape[1], num_classes, kernel_size=1))
    offset = absent_classes(train_masks, num_classes)[None, :, None, None]  # after the upsampling (0 x -inf = NaN)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    x, y = torch.from_numpy(train_maps), torch.from_numpy(train_masks).long()
    size = train_masks.shape[-2:]
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) * x.shape[-2] * x.shape[-1] < 2:  # BatchNorm needs two values per channel (pixels count)
                continue
            logits = F.interpolate(head(x[idx]), size=size, mode="bilinear", align_corners=False) + offset
            opt.zero_grad()
            F.cross_entropy(logits, y[idx], ignore_index=IGNORE_INDEX).backward()
            opt.step()
    head.eval()
    preds = []
    with torch.no_grad():
        for chunk in torch.from_numpy(test_maps).split(batch_size):
            logits = F.interpolate(head(chunk), size=out_size or size, mode="bilinear", align_corners=False) + offset
            preds.append(logits.argmax(1))
    return torch.cat(preds).numpy()
