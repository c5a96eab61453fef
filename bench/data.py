"""Data paths' throughput and the host-core budget of a GPU node.

Measures every read path (terrafm.data.throughput.measure_paths) on a shard set: `--data-dir`, or the bundled
synthetic sample shards. Full runs use real sizes: 2 global 224 px + 8 local 96 px views per tile, views drawn from
every modality the shards hold (Major-TOM shards: 534 px tiles, 12-band S2 L2A / L1C and 2-band S1).

Budget: the tiles/s one GPU consumes at the ViT-B step rate the roofline predicts (comm.step_flops of the H100
preset's per-GPU batch at the bf16 dense peak x --mfu; --mfu 1.0 is the fastest the GPU can go, so the most cores),
divided by each path's tiles per CPU-second, is the host cores per GPU; x --gpus-per-node for a node. Goal: at
most CORES_PER_GPU_GOAL.
"""

from . import comm
from .common import GPUS

MODEL = "ViT-B"
CORES_PER_GPU_GOAL = 4
PRODUCTION_TILE = 534  # px of a Major-TOM location (terrafm prepare's default --tile-size)


def gpu_demand(mfu: float = 1.0) -> dict:
    """Tiles/s one GPU trains on at MODEL's roofline step time (x 1/mfu)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    backbone, batch = comm.MODELS[MODEL]
    step_s = comm.step_flops(comm.param_counts(backbone), batch) / (GPUS[comm.GPU]["tflops_bf16"] * 1e12 * mfu)
    return {"model": MODEL, "gpu": comm.GPU, "mfu": mfu, "batch_per_gpu": batch, "step_s": step_s,
            "tiles_per_s": batch / step_s}


def budget(rows: list[dict], demand: dict, gpus_per_node: int = 8) -> list[dict]:
    """Per measured path: host cores per GPU and per node at `demand`, and whether it meets the goal."""
    out = []
    for r in rows:
        if not r.get("tiles_per_core_s"):
            continue
        per_gpu = demand["tiles_per_s"] / r["tiles_per_core_s"]
        out.append({"path": r["path"], "tiles_per_core_s": r["tiles_per_core_s"], "cores_per_gpu": per_gpu,
                    "cores_per_node": per_gpu * gpus_per_node, "gpus_per_node": gpus_per_node,
                    "within_goal": per_gpu <= CORES_PER_GPU_GOAL,
                    # what crosses PCIe per GPU at that rate, where the path knows its bytes (stored chunks)
                    "h2d_gb_s": demand["tiles_per_s"] * r["bytes_per_tile"] / 1e9 if "bytes_per_tile" in r else None})
    return out


def batch_size(quick: bool) -> int:
    """Locations per batch the data section times (--quick: 8)."""
    return 8 if quick else 16


def run(quick: bool, log, data_dir: str | None = None, mfu: float = 1.0, gpus_per_node: int = 8,
        device: str | None = None) -> dict:
    from terrafm.data.sample import ensure_sample_shards
    from terrafm.data.shards import ShardSet
    from terrafm.data.throughput import measure_paths

    shard_dir = data_dir or ensure_sample_shards()
    shards = ShardSet(shard_dir, verify_checksums=False)
    rows = measure_paths(shard_dir, seconds=1.0 if quick else 5.0, batch_size=batch_size(quick),
                         n_local=4 if quick else 8, global_size=96 if quick else 224,
                         local_size=48 if quick else 96, num_workers=1 if quick else 2, device=device)
    demand = gpu_demand(mfu)
    plan = budget(rows, demand, gpus_per_node)
    log(f"  shards {shard_dir}: {shards.tile_size} px tiles, "
        + ", ".join(f"{m} ({len(i.bands)} bands)" for m, i in shards.modalities.items()))
    for r in rows:
        if "skipped" in r:
            log(f"  {r['path']:18s} skipped: {r['skipped']}")
        else:
            log(f"  {r['path']:18s} {r['tiles_per_s']:8.1f} tiles/s  {r['views_per_s']:8.1f} views/s  "
                f"{r['tiles_per_core_s']:8.1f} tiles/s per core")
    caveats = []  # a budget of production demand over a smaller supply reads too low (0.2 cores per GPU for 3.1)
    if shards.tile_size < PRODUCTION_TILE:
        caveats.append(f"{shards.tile_size} px tiles, not Major-TOM's {PRODUCTION_TILE}: reading and copying a tile "
                       "costs less than a real one, so the cores per GPU and GB/s below are too low; pass --data-dir "
                       "with shards of real products")
    if quick:
        caveats.append("--quick renders 96 / 48 px crops with 4 local views, not the presets' 224 / 96 with 8")
    for c in caveats:
        log(f"  not the production budget: {c}")
    log(f"  {MODEL} on one {demand['gpu']} at {demand['mfu']:.0%} of the bf16 peak: {demand['step_s'] * 1e3:.0f} ms "
        f"per step of {demand['batch_per_gpu']} tiles = {demand['tiles_per_s']:.0f} tiles/s per GPU")
    for b in plan:
        h2d = f", {b['h2d_gb_s']:.1f} GB/s host to device per GPU" if b["h2d_gb_s"] is not None else ""
        log(f"  {b['path']:18s} {b['cores_per_gpu']:6.1f} host cores per GPU, {b['cores_per_node']:6.1f} per "
            f"{gpus_per_node}-GPU node ({'within' if b['within_goal'] else 'over'} the goal of "
            f"{CORES_PER_GPU_GOAL} per GPU){h2d}")
    return {"shard_dir": str(shard_dir), "tile_size": shards.tile_size,
            "modalities": {m: len(i.bands) for m, i in shards.modalities.items()}, "rows": rows,
            "demand": demand, "budget": plan, "cores_per_gpu_goal": CORES_PER_GPU_GOAL, "caveats": caveats}
