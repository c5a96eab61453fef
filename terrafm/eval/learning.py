"""Did pretraining learn? kNN on a held-out generated split: trained teacher vs random init vs band statistics.

The held-out split is the bundled synthetic sample generated with another seed (HELDOUT_SEED): places
never seen in training. Every tile has two labels:
    land_cover  its majority WorldCover class (per-band statistics reveal much of it);
    texture     the grain of its surface texture (`terrafm.data.sample.texture_class`), which per-band
                mean and std cannot reveal: only spatial structure tells fine from coarse.
kNN is DINO's (k=20, cosine, votes weighted exp(sim / 0.07)) over all tiles, each test tile leaving
out every tile of its own grid cell (the four tiles of a cell share biome and texture), so every
tile is a test tile. Baselines: the same backbone at random init, and per-band mean + std of the tile
(z-scored), which is what a model that learned nothing spatial could match. Each margin over random init
comes with its paired standard error, bootstrapped over the held-out cells: with 512 cells about 1 point
on land cover and 2 on texture (one value per cell). The teacher's collapse monitors are computed over
the held-out tiles too.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from terrafm.data.sample import DEFAULT_TILE_SIZE, cell_of_key, ensure_sample_shards, texture_class
from terrafm.data.shards import ShardSet
from terrafm.eval.probes import knn_decision, knn_scores
from terrafm.ssl.monitors import teacher_monitors

HELDOUT_SEED = 1  # the training sample uses seed 0
# 2048 tiles. With 128 cells (512 tiles) the land-cover margin over random init had a paired s.e. of ~2
# points, as large as the margins measured (docs/training.md); with 512 it is ~1.
HELDOUT_CELLS = 512
BOOTSTRAP_DRAWS = 1000
LABELS = ("land_cover", "texture")


@dataclass
class HeldOut:
    images: dict[str, np.ndarray]  # modality -> (N, C, T, T) float32, normalised as in training
    labels: dict[str, np.ndarray]  # label name -> (N,) int64
    cell: np.ndarray  # (N,) grid cell index: kNN never votes with tiles of the test tile's own cell


@dataclass
class ProbeResult:
    modality: str
    knn: dict[str, dict[str, float]] = field(default_factory=dict)  # features -> label -> accuracy (%)
    chance: dict[str, float] = field(default_factory=dict)  # label -> share of the most common class (%)
    monitors: dict[str, float] = field(default_factory=dict)  # teacher monitors over the held-out tiles
    margin_se: dict[str, float] = field(default_factory=dict)  # label -> s.e. of trained - random init (points)

    def summary(self) -> str:
        parts = []
        for label in LABELS:
            k = {f: self.knn[f][label] for f in self.knn}
            margin = k["trained"] - k["random_init"]
            parts.append(f"{label} {k['trained']:.1f}% ({margin:+.1f} ± {self.margin_se[label]:.1f} over random "
                         f"init {k['random_init']:.1f}%, band stats {k['band_stats']:.1f}%, chance "
                         f"{self.chance[label]:.1f}%)")
        m = self.monitors
        return (f"probe on held-out generated tiles ({self.modality}, kNN k=20): " + "; ".join(parts)
                + f". Teacher there: {m['teacher_prototypes']:.0f} distinct prototypes, batch entropy "
                f"{m['teacher_batch_entropy']:.2f} nats, gap {m['teacher_entropy_gap']:.2f} nats")

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_split(modalities: tuple[str, ...], normalisation: dict[str, tuple[np.ndarray, np.ndarray]],
                  cells: int = HELDOUT_CELLS, tile_size: int = DEFAULT_TILE_SIZE,
                  root: str | Path | None = None) -> HeldOut:
    """Generate (once, cached like the training sample) and read the held-out tiles.

    normalisation: modality -> (mean (C,), std (C,)) of the training data, applied as in training.
    """
    shards = ShardSet(ensure_sample_shards(root, seed=HELDOUT_SEED, cells=cells, tile_size=tile_size))
    images = {}
    for m in modalities:
        mean, std = normalisation[m]
        tiles = np.stack([shards.tile(i, m) for i in range(len(shards))]).astype(np.float32)
        images[m] = (tiles - mean[None, :, None, None]) / std[None, :, None, None]
    cell = np.array([cell_of_key(str(k)) for k in shards.keys])
    labels = {"land_cover": shards.class_counts.argmax(1).astype(np.int64),
              "texture": np.array([texture_class(c) for c in cell], np.int64)}
    return HeldOut(images, labels, cell)


def knn_accuracy(features: np.ndarray | torch.Tensor, labels: np.ndarray, groups: np.ndarray, k: int = 20,
                 temperature: float = 0.07) -> float:
    """DINO kNN accuracy (%) where every sample is a test sample and never votes with its own group."""
    return 100.0 * knn_correct(features, labels, groups, k, temperature).mean().item()


def knn_correct(features: np.ndarray | torch.Tensor, labels: np.ndarray, groups: np.ndarray, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
    """(N,) bool: whether DINO's kNN (terrafm.eval.probes.knn_scores, in float64) gets each sample right, every
    sample a test sample that leaves out every sample of its own group."""
    shares = knn_scores(features, labels, features, k, temperature, groups=(groups, groups), dtype=torch.float64)
    return knn_decision(shares, multilabel=False) == labels


def paired_se(correct_a: np.ndarray, correct_b: np.ndarray, groups: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
              seed: int = 0) -> float:
    """Standard error (points) of accuracy(a) - accuracy(b) on the same samples, bootstrapped over groups:
    samples of one group share their place, so they are resampled together."""
    diff = correct_a.astype(np.float64) - correct_b.astype(np.float64)
    _, group_index = np.unique(groups, return_inverse=True)
    per_group = np.bincount(group_index, weights=diff)
    picks = np.random.default_rng(seed).integers(0, len(per_group), size=(draws, len(per_group)))
    return float(np.std(100.0 * per_group[picks].sum(1) / len(diff)))


def band_statistics(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 2C) per-band mean and std, each column z-scored over the N tiles."""
    stats = np.concatenate([images.mean(axis=(2, 3)), images.std(axis=(2, 3))], axis=1)
    return (stats - stats.mean(0)) / (stats.std(0) + 1e-6)


@torch.no_grad()
def cls_features(backbone: torch.nn.Module, images: np.ndarray, modality: str, img_size: int,
                 batch_size: int = 64) -> torch.Tensor:
    """(N, D) cls tokens after the final norm (on the cpu), tiles resized to img_size as a global crop of the whole
    tile, computed on the backbone's device: its ops are the ones chosen for that device (compiled Triton kernels
    on cuda refuse cpu tensors)."""
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device)
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        out.append(backbone.forward_features(x, modality)["x_norm_clstoken"].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def probe(teacher_backbone: torch.nn.Module, teacher_head: torch.nn.Module, random_backbone: torch.nn.Module,
          heldout: HeldOut, modality: str, img_size: int, center: torch.Tensor, temperature: float) -> ProbeResult:
    """kNN of trained teacher, random-init backbone and band statistics on both labels, plus the teacher's
    monitors on the held-out tiles: probabilities softmax((logits - center) / temperature), center the
    effective (dual) centre alpha c + (1 - alpha) c_h of the run's loss."""
    images = heldout.images[modality]
    trained = cls_features(teacher_backbone, images, modality, img_size)
    features = {"trained": trained, "random_init": cls_features(random_backbone, images, modality, img_size),
                "band_stats": band_statistics(images)}
    result = ProbeResult(modality)
    correct = {name: {label: knn_correct(f, heldout.labels[label], heldout.cell) for label in LABELS}
               for name, f in features.items()}
    for name in features:
        result.knn[name] = {label: 100.0 * c.mean().item() for label, c in correct[name].items()}
    for label in LABELS:
        result.chance[label] = 100.0 * np.bincount(heldout.labels[label]).max() / len(heldout.labels[label])
        result.margin_se[label] = paired_se(correct["trained"][label], correct["random_init"][label], heldout.cell)
    teacher_head.eval()
    head_device = next(teacher_head.parameters()).device
    logits = teacher_head(trained.to(head_device)).float().cpu()
    probs = torch.softmax((logits - center.float().cpu()) / temperature, dim=-1)
    result.monitors = {k: v.item() for k, v in teacher_monitors(probs[None]).items()}
    return result
