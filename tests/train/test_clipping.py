"""Gradient clipping: DINO's per-parameter rule (the method's recipe, optim.clip_mode=per_parameter) and a global
norm (one factor for all tensors; DINOv2 takes one norm per module), on plain tensors and on FSDP2 shards
(2 gloo ranks), where each tensor's norm spans both shards."""

import os

import pytest
import torch

from terrafm.config import ConfigError, load_config
from terrafm.train.trainer import clip_gradients


def _params(*norms: float) -> list[torch.nn.Parameter]:
    """Parameters whose gradients have the given L2 norms (different shapes, one without a gradient)."""
    out = []
    for i, norm in enumerate(norms):
        p = torch.nn.Parameter(torch.zeros(3 + i, 2))
        g = torch.randn(3 + i, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64).float()
        p.grad = g * (norm / g.norm())
        out.append(p)
    out.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: skipped, as DINO skips it
    return out


def _dino_clip(params, clip: float) -> None:
    """DINO's utils.clip_gradients, written from its description: each gradient scaled by clip / (norm + 1e-6)
    where that is below 1."""
    for p in params:
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


def test_per_parameter_clips_each_tensor_to_the_bound_on_its_own():
    params, want = _params(6.0, 1.0, 3.5), _params(6.0, 1.0, 3.5)
    total = clip_gradients(params, 3.0, per_parameter=True)
    _dino_clip(want, 3.0)
    assert total == pytest.approx((36 + 1 + 3.5**2) ** 0.5, rel=1e-6)  # the norm before clipping
    for p, q in zip(params, want, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert [round(p.grad.norm().item(), 4) for p in params[:3]] == [3.0, 1.0, 3.0]


def test_global_clips_every_tensor_by_one_factor():
    params = _params(6.0, 1.0, 3.5)
    before = [p.grad.clone() for p in params[:3]]
    total = clip_gradients(params, 3.0, per_parameter=False)
    for p, g in zip(params[:3], before, strict=True):
        torch.testing.assert_close(p.grad, g * (3.0 / (total + 1e-6)), rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params[:3]])).item() == pytest.approx(3.0)


@pytest.mark.parametrize("per_parameter", [True, False])
def test_no_gradient_at_all_has_norm_zero(per_parameter):
    assert clip_gradients([torch.nn.Parameter(torch.zeros(2))], 3.0, per_parameter) == 0.0


@pytest.mark.parametrize("per_parameter", [True, False])
def test_a_bound_of_zero_only_measures(per_parameter):
    params = _params(6.0, 1.0)
    before = [p.grad.clone() for p in params[:2]]
    assert clip_gradients(params, 0.0, per_parameter) == pytest.approx(37**0.5, rel=1e-6)
    for p, g in zip(params[:2], before, strict=True):
        assert torch.equal(p.grad, g)


def test_every_preset_clips_per_parameter_and_a_bad_mode_is_named():
    """The method's recipe is DINO's; tiny_cpu too, since global clipping read the same there (docs/training.md)."""
    for preset in ("vitb_h100", "vitb_a100", "vitl_h100", "vitl_a100", "tiny_cpu"):
        assert load_config(preset).optim.clip_mode == "per_parameter", preset
    with pytest.raises(ConfigError, match="optim.clip_mode"):
        load_config("tiny_cpu", overrides=["optim.clip_mode=per_tensor"])


def _model_with_gradients() -> tuple[torch.nn.Sequential, torch.Tensor]:
    """The same small model and input in every process (its gradients: some norms over the bound 3, some under)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.GELU(), torch.nn.Linear(9, 3))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    return model, x


def _clip_on_shards(rank: int, port: int, per_parameter: bool, results) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    model, x = _model_with_gradients()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    (model(x).pow(2).sum() * 0.3).backward()
    params = list(model.parameters())
    total = clip_gradients(params, 3.0, per_parameter)
    results[rank] = (total, [p.grad.full_tensor() for p in params])
    dist.destroy_process_group()


@pytest.mark.parametrize("per_parameter", [True, False])
def test_clipping_on_fsdp2_shards_matches_one_process(per_parameter):
    """Each parameter's norm is reduced over its shards (one collective for all of them): the clipped gradients
    and the returned norm are those of the same model unsharded."""
    import torch.multiprocessing as mp
    from train_harness import free_port

    results = mp.Manager().dict()
    mp.start_processes(_clip_on_shards, args=(free_port(), per_parameter, results), nprocs=2, join=True,
                       start_method="spawn")
    model, x = _model_with_gradients()
    (model(x).pow(2).sum() * 0.3).backward()
    params = list(model.parameters())
    norms = [p.grad.norm().item() for p in params]
    assert max(norms) > 3.0 > min(norms)  # the bound binds for some tensors, not all
    total = clip_gradients(params, 3.0, per_parameter)
    for rank in (0, 1):
        sharded_total, grads = results[rank]
        assert sharded_total == pytest.approx(total, rel=1e-5)
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
