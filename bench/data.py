"""Data paths' throughput (tiles/s, views/s) on the bundled synthetic sample set, via measure_paths."""


def run(quick: bool, log) -> dict:
    from terrafm.data.sample import ensure_sample_shards
    from terrafm.data.throughput import measure_paths

    shard_dir = ensure_sample_shards()
    rows = measure_paths(shard_dir, seconds=1.0 if quick else 5.0, batch_size=8 if quick else 16,
                         n_local=4 if quick else 8, global_size=96 if quick else 224,
                         local_size=48 if quick else 96, num_workers=1 if quick else 2)
    for r in rows:
        if "skipped" in r:
            log(f"  {r['path']:18s} skipped: {r['skipped']}")
        else:
            log(f"  {r['path']:18s} {r['tiles_per_s']:8.1f} tiles/s  {r['views_per_s']:8.1f} views/s")
    return {"shard_dir": str(shard_dir), "rows": rows}
