"""One gloo rank of test_dino.test_two_ranks_match_one: the centre and Sinkhorn-Knopp sums over ranks."""

import os

import torch
import torch.distributed as dist


def shards(seed: int = 0):
    """The global inputs (the same on every rank) and each rank's rows: DINO class tokens split evenly,
    iBOT masked patches unevenly (5 and 8 rows), logits at a temperature where DINOv2 stays finite."""
    g = torch.Generator().manual_seed(seed)
    K = 1271
    cls = torch.randn(8, K, generator=g) * 1.5
    patches = torch.randn(13, K, generator=g) * 1.5
    return K, cls, patches, [cls[:4], cls[4:]], [patches[:5], patches[5:]]


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    K, _, _, cls_shards, patch_shards = shards()
    dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
    out = {"sk_cls": dino.sinkhorn_knopp_teacher(cls_shards[rank], teacher_temp=0.04)}
    n_masked = torch.tensor([patch_shards[rank].shape[0]])
    out["sk_patches"] = ibot.sinkhorn_knopp_teacher(patch_shards[rank], teacher_temp=0.04,
                                                    n_masked_patches_tensor=n_masked)
    out["n_masked_after"] = n_masked
    dino.update_center(cls_shards[rank])
    ibot.update_center(patch_shards[rank].unsqueeze(0))
    out["probs_cls"] = dino.softmax_center_teacher(cls_shards[rank], teacher_temp=0.07)  # applies the update
    ibot.apply_center_update()
    out["center_cls"], out["center_patches"] = dino.center.clone(), ibot.center.clone()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
