import numpy as np
import pytest

from terrafm.data.sampler import LandCoverSampler, land_cover_weights


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
