import math

import numpy as np
import pytest

from terrafm.data.sampler import (
    WATER,
    LandCoverSampler,
    grid_cell_latlon,
    land_cover_weights,
    open_water,
    region_strata,
    sampling_weights,
)


def _counts():
    # 3 common-class tiles, 1 rare-class tile, 1 mixed tile, 1 tile without a map
    return np.array([[100, 0, 0], [100, 0, 0], [100, 0, 0], [0, 0, 100], [50, 50, 0], [0, 0, 0]])


def test_weights_follow_the_formula():
    c = _counts()
    for beta in (0.0, 0.5, 1.0):
        w = land_cover_weights(c, beta)
        f = c.sum(0) / c.sum()
        h = c[:5] / c[:5].sum(1, keepdims=True)
        raw = h @ (f ** -beta)
        raw = np.append(raw, raw.mean())  # no map -> mean weight
        np.testing.assert_allclose(w, raw / raw.sum())
    assert np.allclose(land_cover_weights(c, 0.0), 1 / 6)
    w1 = land_cover_weights(c, 1.0)
    assert w1[3] > w1[0] * 3  # rare class up-weighted


def test_rank_shards_partition_the_epoch_without_duplicates():
    c = np.random.default_rng(0).integers(0, 100, (101, 11))
    full = LandCoverSampler(c, 0.5, 0, 1, seed=3).epoch_indices(2)
    shards = [LandCoverSampler(c, 0.5, r, 4, seed=3, num_samples=101) for r in range(4)]
    draws = np.random.default_rng([3, 2, 0x5A3]).choice(101, size=104, p=land_cover_weights(c, 0.5))
    assert all(len(s) == 26 for s in shards)
    positions = [set(range(r, 104, 4)) for r in range(4)]
    assert set().union(*positions) == set(range(104)) and sum(map(len, positions)) == 104
    for r, s in enumerate(shards):
        np.testing.assert_array_equal(s.epoch_indices(2), draws[r::4])
    np.testing.assert_array_equal(full, draws[:101])


def test_deterministic_per_seed_and_epoch_and_resumable():
    c = np.random.default_rng(1).integers(0, 100, (50, 11))
    a, b = LandCoverSampler(c, 0.5, seed=7), LandCoverSampler(c, 0.5, seed=7)
    np.testing.assert_array_equal(a.epoch_indices(0), b.epoch_indices(0))
    assert not np.array_equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not np.array_equal(a.epoch_indices(0), LandCoverSampler(c, 0.5, seed=8).epoch_indices(0))
    a.set_epoch(3)
    it = iter(a)
    head = [next(it) for _ in range(17)]
    state = a.state_dict()
    rest = list(it)
    b.load_state_dict(state)
    assert head + list(b) == list(a.epoch_indices(3))
    assert rest == list(a.epoch_indices(3))[17:]
    with pytest.raises(ValueError, match="world_size"):
        LandCoverSampler(c, 0.5, rank=0, world_size=2, seed=7).load_state_dict(state)


def test_balancing_raises_rare_class_share():
    c = np.zeros((1000, 11), int)
    c[:950, 0] = 1
    c[950:, 9] = 1  # 5 % mangrove tiles
    share = [np.isin(LandCoverSampler(c, beta, seed=0).epoch_indices(0), np.arange(950, 1000)).mean()
             for beta in (0.0, 1.0)]
    assert share[0] < 0.1 and share[1] > 0.4


def test_an_epoch_is_drawn_once_not_once_per_batch(sample_shards, monkeypatch):
    """The loader asks for the epoch's draws at every batch, and each call drew the whole epoch again: 1.3 s per
    batch in the training thread for 2M locations on 64 ranks."""
    from terrafm.data.config import DataConfig
    from terrafm.data.loader import build_loader

    real, epochs = np.random.default_rng, []

    def default_rng(seed):
        if len(seed) == 3 and seed[2] == 0x5A3:  # the sampler's (seed, epoch, tag)
            epochs.append(seed[1])
        return real(seed)

    c = np.random.default_rng(4).integers(0, 100, (1000, 11))
    fresh = [LandCoverSampler(c, 0.5, 1, 4, seed=2).epoch_indices(e) for e in (0, 1)]
    monkeypatch.setattr(np.random, "default_rng", default_rng)
    s = LandCoverSampler(c, 0.5, 1, 4, seed=2)
    first = s.epoch_indices(0)
    assert all(s.epoch_indices(0) is first for _ in range(5)) and epochs == [0]
    np.testing.assert_array_equal(first, fresh[0])
    np.testing.assert_array_equal(s.epoch_indices(1), fresh[1])
    assert epochs == [0, 1] and not first.flags.writeable  # a caller cannot change the kept draws
    epochs.clear()
    loader = build_loader(DataConfig(shard_dir=str(sample_shards), batch_size=2, global_size=32, local_size=16,
                                     n_local=1, num_workers=1, backend="numpy"))
    assert len(list(loader)) == len(loader) == 6 and epochs == [0]


def test_grid_cell_names_decode_to_major_toms_grid():
    """Major-TOM's grid.py: rows every 180 / ceil(pi R / 10 km) degrees from the equator (U north, D south); in each
    row ceil(2 pi R cos(lat) / 10 km) columns from Greenwich (R east, L west)."""
    lat_step = 180 / math.ceil(math.pi * 6378.137 / 10)
    assert grid_cell_latlon("0U_0R") == (0.0, 0.0)
    lat, lon = grid_cell_latlon("433U_1203R")
    assert lat == pytest.approx(433 * lat_step) and 38.8 < lat < 39.0  # Honshu
    assert lon == pytest.approx(1203 * 360 / math.ceil(2 * math.pi * 6378.137 * math.cos(math.radians(lat)) / 10))
    assert grid_cell_latlon("433D_1203L") == (-lat, -lon)
    for name in ("433U_1203", "433N_1203R", "x/433U_1203R", "433U_1203R_", "1002U_0R", "10U_99999R"):
        assert grid_cell_latlon(name) is None, name


def test_region_strata_are_latitude_band_by_longitude_sector():
    keys = ["0U_0R/0_0", "0U_1R/1_1", "433U_1203R/0_0", "433D_1203L/0_0", "800U_10R/0_0", "tile_17/0_0"]
    strata = region_strata(keys)
    assert strata[0] == strata[1] >= 0  # the same cell's neighbours share a stratum
    assert len(set(strata[:5].tolist())) == 4 and strata[5] == -1  # hemispheres, bands and sectors differ
    assert region_strata(np.array(keys)[[2, 2, 5]]).tolist() == [strata[2], strata[2], -1]


def test_region_balancing_gives_each_stratum_its_share():
    strata = region_strata(["0U_0R/0_0"] * 90 + ["433U_1203R/0_0"] * 10 + ["tile/0_0"] * 5)
    c = np.ones((len(strata), 11), int)
    share = lambda w: (w[:90].sum(), w[90:100].sum())  # noqa: E731
    np.testing.assert_allclose(sampling_weights(c, 0.5, strata, 0.0), land_cover_weights(c, 0.5))
    w = sampling_weights(c, 0.0, strata, 1.0)
    np.testing.assert_allclose(share(w)[0], share(w)[1])  # region_beta 1: each stratum the same share
    # keys of no grid cell: the mean factor of the located locations, (90 / 90 + 10 / 10) / 100, against 1 / 90
    np.testing.assert_allclose(w[100:] / w[0], 0.02 * 90)
    w = sampling_weights(c, 0.0, strata, 0.5)
    np.testing.assert_allclose(w[90] / w[0], 3.0)  # (90 / 10) ** 0.5
    assert np.isclose(w.sum(), 1.0)


def test_open_water_is_drawn_at_ocean_keep():
    c = np.zeros((6, 11), int)
    c[:, 0] = 100
    c[0] = 0
    c[0, WATER] = 100  # all water
    c[1, WATER], c[1, 0] = 995, 5  # 99.5% water: open water still
    c[2, WATER], c[2, 0] = 900, 100  # a coast
    c[3] = 0  # no map: land
    assert open_water(c).tolist() == [True, True, False, False, False, False]
    w = sampling_weights(c, 0.0, ocean_keep=0.02)
    np.testing.assert_allclose(w[:2] / w[4], 0.02)
    np.testing.assert_allclose(w[2:] / w[4], 1.0)
    draws = LandCoverSampler(np.repeat(c[:1], 50, 0).tolist() + np.repeat(c[4:5], 50, 0).tolist(), 0.0,
                             seed=0, ocean_keep=0.02).epoch_indices(0)
    assert (draws < 50).mean() < 0.05  # ~2% of the draws, where half the locations are open water
    with pytest.raises(ValueError, match="every location is open water"):
        sampling_weights(c[:2], 0.5, ocean_keep=0.0)
