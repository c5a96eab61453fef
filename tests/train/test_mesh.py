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


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s each on a loaded 2-core machine (FSDP2 setup, one tiny step)
@pytest.mark.parametrize("teacher_reshard_after_forward", [False, True])
def test_teacher_keeps_its_gathered_weights_until_reshard_model(one_process_group, teacher_reshard_after_forward):
    """parallel.teacher_reshard_after_forward=false: after the step's forward the teacher's blocks hold
    gathered plain tensors (no all-gather on another forward of the step) until reshard_model frees them,
    so the EMA update on the shards reaches the next forward; true: DTensor shards right after forward."""
    from functools import partial

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from terrafm.models import build_model
    from terrafm.ssl.loss import DINOLoss
    from terrafm.ssl.meta_arch import SSLMetaArch
    from terrafm.train.parallelize import MESH_DIMS, parallelize, reshard_model

    torch.manual_seed(0)
    arch = SSLMetaArch.build(partial(build_model, "terrafm_tiny", img_size=32),
                             dict(num_prototypes=64, hidden_dim=32, bottleneck_dim=16, num_layers=3),
                             DINOLoss(64, num_classes=11, high_classes=[0]), 0.0)
    parallelize(arch, init_device_mesh("cpu", (1, 1), mesh_dim_names=MESH_DIMS), fsdp=True,
                teacher_reshard_after_forward=teacher_reshard_after_forward)
    blocks = arch.student.backbone.blocks
    state = [block._get_fsdp_state() for block in blocks]  # prefetch: the next block forward, the previous back
    assert state[0]._states_to_forward_prefetch == [state[1]] and state[1]._states_to_backward_prefetch == [state[0]]
    views = [{"s2_l2a": torch.randn(2, 12, 32, 32)} for _ in range(2)]
    loss = arch(views, [{"s2_l2a": torch.randn(2, 12, 16, 16)}], torch.zeros(2, dtype=torch.long), 0.04)
    loss.backward()
    teacher_block = arch.teacher.backbone.blocks[0]
    assert all(isinstance(p, DTensor) for p in teacher_block.parameters()) == teacher_reshard_after_forward
    reshard_model(arch.teacher)
    assert all(isinstance(p, DTensor) for p in teacher_block.parameters())
    # the EMA (momentum 0: copy) of a changed student must reach the teacher's next forward, not stale weights
    with torch.no_grad():
        for p in arch.student.parameters():
            p.to_local().add_(0.1 * torch.randn_like(p.to_local()))
        arch.update_teacher(0.0)
        arch.student.eval()
        torch.testing.assert_close(arch.teacher(views), arch.student(views))
