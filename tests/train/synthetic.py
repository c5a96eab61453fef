"""A tiny deterministic stand-in for terrafm.data.loader (same ViewBatch shape and loader protocol).

The dataset is fixed by the seed; each global batch (crops and modality choices included) depends only
on (seed, epoch, batch index), and rank r takes its slice of it, so one rank with batch 2B sees
exactly what two ranks with batch B see together. Modality augmentation: view 0 is S2-L2A, view 1 S1,
local views alternate S2-L1C and a fused {S2-L2A, S1} view (Case N).
"""

import torch

from terrafm.data.views import View, ViewBatch

CHANNELS = {"s2_l2a": 12, "s2_l1c": 12, "s1": 2}


class SyntheticLoader:
    num_classes = 11

    def __init__(self, num_samples: int = 16, batch_size: int = 4, rank: int = 0, world_size: int = 1,
                 tile: int = 48, global_size: int = 32, local_size: int = 16, num_local: int = 2, seed: int = 0):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_size, self.local_size, self.num_local, self.seed = global_size, local_size, num_local, seed
        g = torch.Generator().manual_seed(seed)
        # every modality is a fixed linear mix of one smooth latent field per place (plus noise), so
        # views from different sensors of one place share content the model can learn to agree on
        latent = torch.nn.functional.interpolate(torch.randn(num_samples, 4, tile // 8, tile // 8, generator=g),
                                                 size=(tile, tile), mode="bilinear")
        self.tiles = {m: torch.einsum("ck,nkhw->nchw", torch.randn(c, 4, generator=g), latent)
                      + 0.1 * torch.randn(num_samples, c, tile, tile, generator=g) for m, c in CHANNELS.items()}
        self.classes = torch.randint(0, self.num_classes, (num_samples,), generator=g)
        self.num_samples, self.tile = num_samples, tile
        self.epoch, self.position = 0, 0

    def class_frequency(self) -> list[float]:
        counts = torch.bincount(self.classes, minlength=self.num_classes).float()
        return (counts / counts.sum()).tolist()

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    @property
    def step(self) -> int:
        return self.position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict, reshard: bool = False) -> int:
        """reshard=True: continue a state written on another world size (rounded down to a whole step of
        this world's global batch); returns how many samples are drawn again."""
        self.epoch, self.position = state["epoch"], state["position"]
        if not reshard:
            return 0
        consumed = state["position"] * state["batch_size"] * state["world_size"]
        per_step = self.batch_size * self.world_size
        self.position = consumed // per_step
        return consumed - self.position * per_step

    def _crop(self, g: torch.Generator, idx: torch.Tensor, modalities: tuple[str, ...], size: int) -> View:
        y, x = (int(v) for v in torch.randint(0, self.tile - size + 1, (2,), generator=g))
        return View({m: self.tiles[m][idx, :, y:y + size, x:x + size].clone() for m in modalities})

    def _batch(self, b: int) -> ViewBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + b)
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        idx = perm[b * global_batch:(b + 1) * global_batch]
        global_views = [self._crop(g, idx, (m,), self.global_size) for m in ("s2_l2a", "s1")]
        local_mods = [("s2_l1c",), ("s1", "s2_l2a")]
        local_views = [self._crop(g, idx, local_mods[i % 2], self.local_size) for i in range(self.num_local)]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        cut = lambda v: View({m: t[mine] for m, t in v.items()})
        return ViewBatch([cut(v) for v in global_views], [cut(v) for v in local_views], self.classes[idx][mine],
                         idx[mine])

    def __iter__(self):
        while self.position < len(self):
            batch = self._batch(self.position)
            self.position += 1
            yield batch


# A model and objective small enough for CPU tests (seconds per run): tiny backbone, 32/16 px crops.
TINY_OVERRIDES = [
    "model.name=terrafm_tiny", "model.img_size=32", "model.drop_path_rate=0.0",
    "ssl.num_prototypes=256", "ssl.head_hidden_dim=64", "ssl.head_bottleneck_dim=32",
    "ssl.warmup_teacher_temperature_epochs=1", "ssl.freeze_last_layer_epochs=0",
    "optim.lr=0.05", "optim.warmup_epochs=1", "train.precision=fp32", "train.log_every=1",
    "train.device=cpu",
]
