"""The data-parallel mesh from parallel.dp_replicate / parallel.dp_shard (pure arithmetic, no process group)."""

import pytest

from terrafm.config import ConfigError, load_config
from terrafm.train.parallelize import mesh_shape


@pytest.mark.parametrize("replicate, shard, world, per_node, expected", [
    (0, -1, 1, 1, (1, 1)),  # one process
    (0, -1, 8, 8, (1, 8)),  # one node: FSDP within it
    (0, -1, 64, 8, (8, 8)),  # 8 nodes: shard within a node, replicate across nodes (HSDP)
    (0, 4, 64, 8, (16, 4)),  # dp_shard given: dp_replicate 0 is the rest
    (1, -1, 64, 8, (1, 64)),  # flat FSDP over every rank
    (-1, 1, 4, 4, (4, 1)),  # pure replication
    (2, 2, 4, 4, (2, 2)),
])
def test_mesh_shape(replicate, shard, world, per_node, expected):
    assert mesh_shape(replicate, shard, world, per_node) == expected


@pytest.mark.parametrize("replicate, shard, world, per_node, message", [
    (2, 3, 4, 4, "2 x 3 = 6, but there are 4 ranks"),
    (-1, 3, 4, 4, "parallel.dp_shard=3 does not divide the 4 ranks"),
    (3, -1, 4, 4, "parallel.dp_replicate=3 does not divide"),
    (0, -1, 12, 8, "12 ranks are not whole nodes of 8"),
])
def test_mesh_shape_errors_name_the_keys(replicate, shard, world, per_node, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(replicate, shard, world, per_node)


def test_parallel_config_defaults_and_checks():
    p = load_config("tiny_cpu").parallel
    assert (p.dp_replicate, p.dp_shard, p.forward_prefetch, p.backward_prefetch) == (0, -1, 1, 1)
    assert p.teacher_reshard_after_forward is False
    with pytest.raises(ConfigError, match="cannot both be -1"):
        load_config("tiny_cpu", ["parallel.dp_replicate=-1"])
    with pytest.raises(ConfigError, match="parallel.dp_shard -1 or a count"):
        load_config("tiny_cpu", ["parallel.dp_shard=0"])
    with pytest.raises(ConfigError, match="_prefetch must be >= 0"):
        load_config("tiny_cpu", ["parallel.forward_prefetch=-1"])
