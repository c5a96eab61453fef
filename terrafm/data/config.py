"""DataConfig: every knob of the data path as plain, validated values (embedded in the trainer's config tree)."""

from dataclasses import dataclass, field

from terrafm.modalities import MODALITIES, MODALITY_NAMES

BACKENDS = ("auto", "numpy", "cpp", "dali")


@dataclass
class DataConfig:
    shard_dir: str | None = None          # None = the synthetic sample set (ensure_sample_shards)
    batch_size: int = 32                  # per rank
    global_size: int = 224                # px of the global crops
    local_size: int = 96                  # px of the local crops
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.25, 1.0)  # crop area / tile area
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)      # crop aspect ratio range (log-uniform)
    hflip: float = 0.5                    # probability of a horizontal flip per sample and view
    vflip: float = 0.5                    # vertical flip (nadir imagery has no preferred up)
    p_fused: float = 0.5                  # probability that a view is Case N (2+ modalities fused)
    modalities: tuple[str, ...] = MODALITY_NAMES   # locations lacking one of these are not sampled
    bands: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per-modality subset; {} = all
    beta: float = 0.5                     # land-cover balancing: 0 = uniform, 1 = fully balanced
    region_beta: float = 0.5              # balancing over latitude band x 30 deg longitude sector (grid cell names)
    ocean_keep: float = 0.02              # open-water locations drawn as if this share were kept (method.md: 2%)
    num_workers: int = 2                  # threads preparing batches ahead (C++ / DALI release the GIL)
    cpp_threads: int = 0                  # threads inside the C++ twin (0 = hardware concurrency)
    timeout_s: float = 600.0              # a batch the worker threads have not rendered by then: ShardError (0 = wait)
    backend: str = "auto"                 # auto | numpy | cpp | dali
    drop_last: bool = True
    verify_checksums: bool = True         # crc32 of every chunk, once per process
    allow_index_mismatch: bool = False    # index.json vs part files on disk differ: warn with counts, don't stop
    pin_memory: bool = True               # pinned host tensors when CUDA is present
    seed: int = 0

    def __post_init__(self):
        self.global_scale, self.local_scale = tuple(self.global_scale), tuple(self.local_scale)
        self.ratio, self.modalities = tuple(self.ratio), tuple(self.modalities)
        self.bands = {m: tuple(b) for m, b in self.bands.items()}
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"DataConfig: {what}")

        need(self.shard_dir is None or str(self.shard_dir).strip() != "",
             "shard_dir is empty (an unset variable?); give the --out folder of `terrafm prepare`, or leave "
             "data.shard_dir unset (null) for the bundled sample tiles")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.global_size >= 8 and self.local_size >= 8, "global_size and local_size must be >= 8 px")
        need(self.n_global >= 1 and self.n_local >= 0, f"need n_global >= 1, n_local >= 0; got "
             f"{self.n_global}, {self.n_local}")
        need(self.n_global >= 2 or self.n_local >= 1, "one global view and no local view leave the loss no pair of "
             "different views; set n_global >= 2 or n_local >= 1")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("global_scale", "local_scale", "ratio"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi and (name == "ratio" or hi <= 1), f"{name} must be (lo, hi) with 0 < lo <= hi"
                 f"{'' if name == 'ratio' else ' <= 1'}; got {(lo, hi)}")
        for name in ("hflip", "vflip", "p_fused"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be a probability, got {getattr(self, name)}")
        need(len(self.modalities) >= 1 and len(set(self.modalities)) == len(self.modalities),
             f"modalities must be distinct and non-empty, got {self.modalities}")
        for m in self.modalities:
            need(m in MODALITIES, f"unknown modality {m!r}; expected a subset of {list(MODALITY_NAMES)}")
        for m, bands in self.bands.items():
            need(m in self.modalities, f"bands given for {m!r}, which is not in modalities {self.modalities}")
            unknown = [b for b in bands if b not in MODALITIES[m].bands]
            need(bands and not unknown, f"bands[{m!r}] must be a non-empty subset of {MODALITIES[m].bands}")
        need(0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}")
        need(0.0 <= self.region_beta <= 1.0, f"region_beta must be in [0, 1], got {self.region_beta}")
        need(0.0 <= self.ocean_keep <= 1.0, f"ocean_keep must be in [0, 1], got {self.ocean_keep}")
        need(self.num_workers >= 0 and self.cpp_threads >= 0, "num_workers and cpp_threads must be >= 0")
        need(0 <= self.timeout_s < float("inf"), f"timeout_s must be a finite number of seconds >= 0 (0 = wait for "
             f"ever), got {self.timeout_s}")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def band_list(self, modality: str) -> tuple[str, ...]:
        return self.bands.get(modality, MODALITIES[modality].bands)
