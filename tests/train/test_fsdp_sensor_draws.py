"""2-rank FSDP2 (gloo) where the ranks draw different sensors in one step: the gradients still line up.

Each rank's backward must give gradients to the same parameters, or FSDP2's reduce-scatter of unequal
buffers fails or mixes up parameters. torch 2.11 (the GPU image) has no set_reduce_scatter_unused_params,
so the student's forward gives each sensor it did not draw a zero gradient (unused_parameters_zero);
this test runs that path on CPU and checks the reduced gradients against one process's average.
"""

import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from train_harness import free_port, run_ranks

from terrafm.models import build_model
from terrafm.ssl.head import DINOHead
from terrafm.ssl.meta_arch import DINOModel

B, SIZE = 2, 32


def _student() -> DINOModel:
    torch.manual_seed(0)
    return DINOModel(build_model("terrafm_tiny", img_size=SIZE, fusion=True),
                     DINOHead(build_model("terrafm_tiny").embed_dim, num_prototypes=32, hidden_dim=16,
                              bottleneck_dim=8, num_layers=2))


def _views(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0: one S1 view; rank 1: one S2 L2A view and one fused S1 + S2 L2A view (S2 L1C on neither)."""
    g = torch.Generator().manual_seed(rank)
    s1 = partial(torch.randn, B, 2, SIZE, SIZE, generator=g)
    s2 = partial(torch.randn, B, 12, SIZE, SIZE, generator=g)
    return [{"s1": s1()}] if rank == 0 else [{"s2_l2a": s2()}, {"s1": s1(), "s2_l2a": s2()}]


def _loss(model: DINOModel, rank: int) -> torch.Tensor:
    return model(_views(rank)).float().square().mean()


def test_a_forward_gives_every_parameter_a_gradient_whatever_the_sensors():
    model = _student()
    _loss(model, 0).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    pe = model.backbone.patch_embed
    assert torch.count_nonzero(pe.conv2d_s2_l2a.weight.grad) == 0 and torch.count_nonzero(pe.fusion.pool.grad) == 0
    assert torch.count_nonzero(pe.conv2d_s1.weight.grad) > 0


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from terrafm.train.parallelize import apply_fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = _student()
    model = _student()
    apply_fsdp(model, init_device_mesh("cpu", (2,)), torch.float32, torch.float32, backward=True)
    _loss(model, rank).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:  # FSDP averages over ranks: the gradient of the mean of both ranks' losses
        ((_loss(reference, 0) + _loss(reference, 1)) / 2).backward()
        bad = []
        for n, p in reference.named_parameters():
            if n not in grads or not torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6):
                bad.append(n)
        (out / "result.txt").write_text(f"{len(grads)} of {len(list(reference.parameters()))}; bad: {bad}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s: two gloo processes
def test_two_ranks_with_different_sensors_reduce_the_gradient_of_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", __file__, str(tmp_path)], timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = len(list(_student().parameters()))
    assert (tmp_path / "result.txt").read_text() == f"{count} of {count}; bad: []"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
