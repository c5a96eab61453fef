import shutil

import numpy as np
import pytest
import torch

from terrafm import backends
from terrafm.data.config import DataConfig
from terrafm.data.loader import build_loader
from terrafm.data.views import ViewBatch, make_plan


def _cfg(shards, **kw):
    base = dict(shard_dir=str(shards), batch_size=4, global_size=40, local_size=16, n_local=3, num_workers=0,
                backend="numpy", seed=5)
    return DataConfig(**{**base, **kw})


def _views(batch: ViewBatch):
    return batch.global_views + batch.local_views


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="p_fused"):
        DataConfig(p_fused=1.5)
    with pytest.raises(ValueError, match="unknown modality 's3'"):
        DataConfig(modalities=("s2_l2a", "s3"))
    with pytest.raises(ValueError, match="local_scale"):
        DataConfig(local_scale=(0.3, 0.1))
    with pytest.raises(ValueError, match="backend"):
        DataConfig(backend="cuda")


def test_plan_crops_modalities_and_flips():
    cfg = DataConfig(batch_size=64, n_local=6, p_fused=0.5)
    plans = [make_plan(cfg, np.arange(64), 534, 0, step, 0) for step in range(20)]
    fused = [len(v.modalities) >= 2 for p in plans for v in p.views]
    assert 0.3 < np.mean(fused) < 0.7
    for p in plans:
        for v, scale in [(v, cfg.global_scale) for v in p.global_views] + [(v, cfg.local_scale) for v in p.local_views]:
            t, left, h, w = v.boxes.T
            assert (t >= 0).all() and (left >= 0).all() and (t + h <= 534).all() and (left + w <= 534).all()
            area = h * w / 534 ** 2
            assert (area > scale[0] * 0.9).all() and (area < scale[1] * 1.1).all()
            assert set(v.modalities) <= set(cfg.modalities) and len(set(v.modalities)) == len(v.modalities)
    one = make_plan(DataConfig(p_fused=0.0), np.arange(4), 534, 1, 2, 0)
    assert all(len(v.modalities) == 1 for v in one.views)
    again = make_plan(DataConfig(p_fused=0.0), np.arange(4), 534, 1, 2, 0)
    np.testing.assert_array_equal(one.views[3].boxes, again.views[3].boxes)
    assert not np.array_equal(one.views[0].boxes, make_plan(DataConfig(p_fused=0.0), np.arange(4), 534, 1, 2, 1)
                              .views[0].boxes)


def test_loader_yields_the_contract(sample_shards):
    loader = build_loader(_cfg(sample_shards, p_fused=1.0))
    assert loader.num_classes == 11 and loader.class_frequency.shape == (11,)
    torch.testing.assert_close(loader.class_frequency.sum(), torch.tensor(1.0))
    batch = next(iter(loader))
    assert len(batch.global_views) == 2 and len(batch.local_views) == 3
    assert batch.index.dtype == torch.long and batch.majority_class.dtype == torch.long
    counts = loader.shards.class_counts[batch.index.numpy()]
    np.testing.assert_array_equal(batch.majority_class.numpy(), counts.argmax(1))
    for v, size in zip(_views(batch), [40, 40, 16, 16, 16], strict=True):
        assert len(v) >= 2  # p_fused = 1: every view is Case N
        for m, t in v.items():
            assert t.shape == (4, 2 if m == "s1" else 12, size, size) and t.dtype == torch.float32
            assert torch.isfinite(t).all()


def test_same_box_for_all_modalities_of_a_view(sample_shards):
    """Co-registered crop: the flipped/cropped S2 L2A and L1C views of one place are strongly correlated."""
    loader = build_loader(_cfg(sample_shards, p_fused=1.0, modalities=("s2_l2a", "s2_l1c")))
    v = next(iter(loader)).global_views[0]
    a, b = v["s2_l2a"][:, 7].flatten(1), v["s2_l1c"][:, 7].flatten(1)
    corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))
    assert (corr > 0.9).all()


def test_band_subset(sample_shards):
    loader = build_loader(_cfg(sample_shards, modalities=("s2_l2a",), bands={"s2_l2a": ("B04", "B03", "B02")}))
    assert next(iter(loader)).global_views[0]["s2_l2a"].shape[1] == 3


def test_mid_epoch_resume_and_ranks(sample_shards):
    cfg = _cfg(sample_shards)
    full = list(build_loader(cfg))
    loader = build_loader(cfg)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest, strict=True):
        torch.testing.assert_close(a.index, b.index)
        for va, vb in zip(_views(a), _views(b), strict=True):
            assert list(va) == list(vb)
            for m in va:
                torch.testing.assert_close(va[m], vb[m], rtol=0, atol=0)
    assert resumed.state_dict()["epoch"] == 1
    r0, r1 = build_loader(cfg, rank=0, world_size=2), build_loader(cfg, rank=1, world_size=2)
    draws = build_loader(cfg).sampler.epoch_indices(0)
    assert len(r0.sampler) == len(r1.sampler) == len(draws) // 2
    assert sorted(np.concatenate([r0.sampler.epoch_indices(0), r1.sampler.epoch_indices(0)]).tolist()) == \
        sorted(np.random.default_rng([cfg.seed * 1_000_003, 0, 0x5A3]).choice(
            len(draws), size=len(draws), p=r0.sampler.weights).tolist())


@pytest.mark.skipif(not backends.csrc().usable, reason="terrafm._C not built")
def test_numpy_and_cpp_paths_agree(sample_shards, assert_same_host_views):
    assert_same_host_views(build_loader(_cfg(sample_shards)), build_loader(_cfg(sample_shards, backend="cpp",
                                                                                    cpp_threads=2)), steps=3)


def test_crops_flips_and_sensors_follow_the_run_seed(sample_shards):
    """Loader.plan drew its crops, flips and sensors from data.seed alone: runs that differed only in train.seed saw
    the same views at every step. The combined seed of data.seed 0 and train.seed 0 is 0: the default run is
    unchanged."""
    a, b = (build_loader(_cfg(sample_shards, seed=0), seed=s).plan(0, 0) for s in (0, 1))
    assert not all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a.views, b.views, strict=True))
    default = make_plan(_cfg(sample_shards, seed=0), a.indices, 60, 0, 0, 0)
    assert all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a.views, default.views, strict=True))


@pytest.mark.skipif(not backends.dali().usable, reason="nvidia-dali not installed (pip install terrafm[dali])")
def test_dali_path_agrees(sample_shards, assert_same_host_views):
    cfg = dict(n_local=2, batch_size=4)
    assert_same_host_views(build_loader(_cfg(sample_shards, **cfg)), build_loader(_cfg(sample_shards, backend="dali",
                                                                                         **cfg)))


def test_reshard_resume_continues_the_global_draw_stream(sample_shards):
    """2 ranks x batch 2 stopped after 3 steps -> 1 rank x batch 4 continues at the same global sample."""
    two = [build_loader(_cfg(sample_shards, batch_size=2), rank=r, world_size=2) for r in range(2)]
    one = build_loader(_cfg(sample_shards, batch_size=4))
    for step in range(3):  # what the 2 ranks drew together at a step is what 1 rank draws at that step
        both = np.concatenate([ld.batch_indices(0, step) for ld in two])
        assert sorted(both.tolist()) == sorted(one.batch_indices(0, step).tolist())
    for ld in two:
        ld.step = 3
    state = two[1].state_dict()
    resumed = build_loader(_cfg(sample_shards, batch_size=4))
    with pytest.raises(ValueError, match="world_size/rank 2/1"):
        resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="batch size 2, this loader has 4; set train.elastic_resume"):
        build_loader(_cfg(sample_shards, batch_size=4), rank=1, world_size=2).load_state_dict(state)
    assert resumed.load_state_dict(state, reshard=True) == 0
    assert (resumed.epoch, resumed.step) == (0, 3)
    odd = build_loader(_cfg(sample_shards, batch_size=5))  # 12 samples consumed = 2 steps of 5, 2 drawn again
    assert odd.load_state_dict(state, reshard=True) == 2 and odd.step == 2
    with pytest.raises(ValueError, match="predates resharding"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "batch_size"}, reshard=True)


def test_modality_mix_is_the_distribution_views_draw_from():
    """modality_mix (what the bench's cost models average over) against 20000 draws of the sampler."""
    from terrafm.data.views import choose_modalities, modality_mix

    mods = ("s1", "s2_l1c", "s2_l2a")
    mix = dict((subset, p) for p, subset in modality_mix(mods, 0.5))
    assert sum(mix.values()) == pytest.approx(1.0) and len(mix) == 7
    rng = np.random.default_rng(0)
    draws = [choose_modalities(rng, mods, 0.5) for _ in range(20000)]
    for subset, p in mix.items():
        assert draws.count(subset) / len(draws) == pytest.approx(p, abs=0.012), subset
    assert modality_mix(("s1",), 0.5) == [(1.0, ("s1",))]
    assert dict((s, p) for p, s in modality_mix(mods, 0.0))[("s1",)] == pytest.approx(1 / 3)


def test_a_resume_on_other_sampling_says_the_order_is_not_the_runs(sample_shards, tmp_path):
    """A state resumed with another data.beta (or other shards) said nothing and returned 0 (exact) for an order that
    is not the run's; the same settings, after the JSON round trip of a checkpoint, resume silently."""
    import json
    import warnings

    loader = build_loader(_cfg(sample_shards))
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_loader(_cfg(sample_shards)).load_state_dict(state) == 0
    for reshard in (False, True):
        other = build_loader(_cfg(sample_shards, beta=1.0))
        with pytest.warns(UserWarning, match=r"another sampling than this loader's \(beta 0.5 -> 1.0\).*data.beta"):
            other.load_state_dict(state, reshard=reshard)
        assert (other.epoch, other.step) == (0, 1)
    rewritten = tmp_path / "rewritten"  # the same folder re-prepared with other land-cover maps
    shutil.copytree(sample_shards, rewritten)
    with np.load(rewritten / "part-00000.npz") as z:
        part = {k: z[k] for k in z.files}
    part["class_counts"][0] = part["class_counts"][0][::-1]
    np.savez(rewritten / "part-00000.npz", **part)
    with pytest.warns(UserWarning, match=r"another sampling than this loader's \(crc32 \d+ -> \d+\).*rewritten"):
        build_loader(_cfg(rewritten)).load_state_dict(state)


def test_a_state_from_before_region_and_water_weights_resumes_as_it_sampled(sample_shards):
    """States written before data.region_beta and data.ocean_keep sampled as region_beta 0 and ocean_keep 1 do: those
    resume silently, the new defaults with a warning naming both."""
    import warnings

    old_settings = dict(region_beta=0.0, ocean_keep=1.0)
    loader = build_loader(_cfg(sample_shards, **old_settings))
    next(iter(loader))
    state = loader.state_dict()
    state["sampling"] = {k: v for k, v in state["sampling"].items() if k not in old_settings}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_loader(_cfg(sample_shards, **old_settings)).load_state_dict(state) == 0
    with pytest.warns(UserWarning, match=r"\(region_beta 0.0 -> 0.5, ocean_keep 1.0 -> 0.02\)"):
        build_loader(_cfg(sample_shards)).load_state_dict(state)


def test_the_loader_says_how_region_balancing_samples_its_locations(sample_shards, tmp_path):
    """The sample's keys are Major-TOM grid cell names: their strata are named; keys of another source are not placed
    on the grid, and the loader says that region_beta does nothing there."""
    note = build_loader(_cfg(sample_shards)).sampling_note
    assert note.startswith("region balancing (data.region_beta 0.5) over ") and "strata" in note, note
    assert "outside" not in note and "open water" not in note
    assert build_loader(_cfg(sample_shards, region_beta=0.0)).sampling_note == ""
    other = tmp_path / "other"  # the same tiles under keys of another source
    shutil.copytree(sample_shards, other)
    with np.load(other / "part-00000.npz") as z:
        part = {k: z[k] for k in z.files}
    part["keys"] = np.array([f"tile_{i}" for i in range(len(part["keys"]))])
    np.savez(other / "part-00000.npz", **part)
    note = build_loader(_cfg(other, allow_index_mismatch=True)).sampling_note
    assert note.startswith("data.region_beta 0.5 has no effect: no location key is a Major-TOM grid cell name"), note


@pytest.mark.skipif(not backends.csrc().usable, reason="terrafm._C not built")
@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_cpp_path_agrees_on_odd_tiles_band_subsets_and_extreme_crops(tmp_path_factory, codec, assert_same_host_views):
    """The agreement test above covers raw 60 px tiles with every band; here an odd tile size (39 px), LZ4 chunks,
    band subsets out of order, odd view sizes, crops down to a few pixels and aspect ratios up to 1:3."""
    from terrafm.data.prepare import convert
    from terrafm.data.sample import write_sample_parquet

    root = tmp_path_factory.mktemp("odd")
    write_sample_parquet(root / "parquet", seed=1, cells=2, tile_size=39)
    convert([root / "parquet"], root / "shards", tile_size=39, codec=codec, workers=0, progress=False)
    kw = dict(batch_size=3, global_size=33, local_size=15, p_fused=0.7, global_scale=(0.1, 1.0),
              local_scale=(0.005, 0.2), ratio=(1 / 3, 3.0), bands={"s2_l1c": ("B12", "B01", "B08"), "s1": ("VH",)})
    ref = build_loader(_cfg(root / "shards", **kw))
    assert ref.shards.tile_size == 39 and ref.shards.codec == codec and len(ref) == 2
    assert_same_host_views(ref, build_loader(_cfg(root / "shards", backend="cpp", cpp_threads=2, **kw)), steps=len(ref))


@pytest.mark.parametrize("ratio", [(2.0, 3.0), (0.25, 0.5)])
def test_a_crop_that_cannot_be_drawn_falls_back_to_a_central_crop_in_the_ratio_range(ratio):
    """After 10 misses the box was the full (square) tile, aspect 1 outside a range like (2, 3), on every view of a
    scale near 1; torchvision's fallback, the largest central crop of an aspect in the range, is what is documented."""
    tile = 61
    plan = make_plan(DataConfig(global_scale=(0.95, 1.0), ratio=ratio, n_local=0), np.arange(32), tile, 0, 0, 0)
    for view in plan.global_views:
        top, left, h, w = view.boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= tile).all() and (left + w <= tile).all()
        assert ((w / h >= ratio[0] * 0.97) & (w / h <= ratio[1] * 1.03)).all(), (w / h).tolist()
        assert (np.maximum(h, w) == tile).all()  # the largest such crop
        assert (np.abs(2 * top + h - tile) <= 1).all() and (np.abs(2 * left + w - tile) <= 1).all()  # central
