"""Land-cover-aware sampling, sharded across ranks, deterministic for (seed, epoch), resumable.

weight_i = sum_k h_ik / f_k^beta (method.md): h_i the tile's WorldCover class fractions, f_k the global
class frequency; beta = 0 is uniform, beta = 1 fully balanced. Tiles without a land-cover map get the
mean weight. Each epoch draws len(dataset) indices with replacement from the normalised weights
(one generator seeded by (seed, epoch)), pads to a multiple of world_size by wrapping, and gives rank r
the positions r, r + world_size, ...: the ranks partition the epoch's draws, none is duplicated.
"""

import numpy as np


def land_cover_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """(N,) float64 sampling probabilities from (N, K) per-tile class pixel counts."""
    counts = np.asarray(class_counts, np.float64)
    total = counts.sum(axis=1, keepdims=True)
    hist = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    freq = counts.sum(axis=0) / max(counts.sum(), 1.0)
    inv = np.where(freq > 0, np.power(np.maximum(freq, 1e-12), -beta), 0.0)
    w = hist @ inv
    known = total[:, 0] > 0
    if not known.any():
        return np.full(len(counts), 1.0 / max(len(counts), 1))
    w[~known] = w[known].mean()
    return w / w.sum()


class LandCoverSampler:
    """Indices for one rank: iterate, or `epoch_indices(epoch)`; `state_dict` resumes mid-epoch."""

    def __init__(self, class_counts: np.ndarray, beta: float = 0.5, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_samples: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.weights = land_cover_weights(class_counts, beta)
        if len(self.weights) == 0:
            raise ValueError("LandCoverSampler: the dataset has no records")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        total = num_samples or len(self.weights)
        self.per_rank = -(-total // world_size)
        self.epoch, self.position = 0, 0
        self._drawn: tuple[int, np.ndarray] | None = None  # (epoch, epoch_indices(epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's draws of `epoch`, read-only. The last epoch's are kept: the loader asks for them once per batch,
        and drawing an epoch of millions of locations takes a second."""
        drawn = self._drawn
        if drawn is None or drawn[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5A3])
            draws = rng.choice(len(self.weights), size=self.per_rank * self.world_size, replace=True, p=self.weights)
            drawn = (epoch, np.ascontiguousarray(draws[self.rank::self.world_size]))
            drawn[1].flags.writeable = False
            self._drawn = drawn
        return drawn[1]

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            i = indices[self.position]
            self.position += 1
            yield int(i)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(f"sampler state is for seed {state['seed']} / world_size {state['world_size']}, "
                             f"this sampler has {self.seed} / {self.world_size}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
