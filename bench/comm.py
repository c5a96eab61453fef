"""Communication model of one pretraining step: flat FSDP vs HSDP, per GPU, against the step's compute.

Pure arithmetic, no GPU. What the trainer's FSDP2 layout moves per step (terrafm.train.parallelize):
  student: the blocks run once per crop size (2 passes: global, local), each pass all-gathers every
    block in forward and again in backward and reduce-scatters its gradient; the head is gathered in
    forward and backward, the root (patch embedding, tokens, norm) once; gradients reduce-scatter once.
  teacher: one all-gather of everything per step (parallel.teacher_reshard_after_forward=false).
Parameters travel in bf16, gradients in fp32 (train.reduce_precision). A ring collective over n ranks
sends (and receives) S (n-1)/n bytes per GPU (all-gather, reduce-scatter) or 2 S (n-1)/n (all-reduce), so its time
is those bytes over one direction's bandwidth: NVLink 450 GB/s per direction on H100 SXM (the datasheet's 900 GB/s
is both directions together), InfiniBand 400 Gb/s per NIC per direction (NDR), as NCCL's bus bandwidth counts.
  FSDP: one shard group of all N GPUs; past one node every collective runs at the per-GPU network share.
  HSDP: shard within a node (NVLink), replicate across nodes: only the all-reduce of each GPU's gradient
    shard (1/8 of the gradients) crosses InfiniBand.
Compute: the step's FLOPs (terrafm.train.metrics) at the GPU's dense bf16 peak times --mfu (1.0 = the
roofline floor: the least compute there is to hide communication behind, so efficiencies are lower bounds).
Scaling efficiency = compute / step time, with the collectives overlapped with compute (FSDP2 prefetch:
step = max(compute, comm)) and without overlap (step = compute + comm).
"""

from functools import partial

import torch

from .common import GPUS

# name -> (backbone, per-GPU batch of the H100 preset)
MODELS = {"ViT-B": ("terrafm_base", 64), "ViT-L": ("terrafm_large", 32)}
NODE_COUNTS = (1, 8, 64)  # whole nodes, as the trainer's mesh needs: 8, 64, 512 GPUs at 8 per node
GPU = "H100 SXM"
# the data defaults: 2 global 224 px crops, 8 local 96 px crops, each view one sensor or 2-3 fused (DataConfig)
N_GLOBAL, GLOBAL_SIZE, N_LOCAL, LOCAL_SIZE = 2, 224, 8, 96
HEAD = dict(num_prototypes=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3)
PARAM_BYTES, GRAD_BYTES = 2, 4  # bf16 all-gather, fp32 reduce-scatter / all-reduce
STUDENT_PASSES = 2  # crop sizes: the blocks run once per size


def param_counts(backbone: str) -> dict[str, int]:
    """Parameters of one DINO model (student or teacher): blocks, head, root (the rest), built on meta with the
    presets' model.fusion (the Case N fusion parameters are in the root the trainer shards and gathers)."""
    from terrafm.config import ModelConfig
    from terrafm.models import build_model
    from terrafm.ssl.head import DINOHead

    with torch.device("meta"):
        model = build_model(backbone, img_size=GLOBAL_SIZE, fusion=ModelConfig.fusion)
        head = DINOHead(model.embed_dim, **HEAD)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    return {"blocks": blocks, "head": sum(p.numel() for p in head.parameters()),
            "root": sum(p.numel() for p in model.parameters()) - blocks,
            "dim": model.embed_dim, "depth": len(model.blocks), "patch": model.patch_size}


def view_flops(counts: dict[str, int], size: int, conv_only: bool = False) -> float:
    """Backbone forward FLOPs of one image of a view, averaged over the presets' modality mix (DataConfig's
    modalities and p_fused): half the views fuse 2-3 sensors, each with its own patch embedding. conv_only: the
    patch convolutions' share alone (their backward has no input gradient)."""
    from terrafm.data.config import DataConfig
    from terrafm.data.views import modality_mix
    from terrafm.modalities import MODALITIES
    from terrafm.models.terrafm import backbone_flops, patch_conv_flops

    data = DataConfig()
    flops = (partial(patch_conv_flops, counts["dim"], counts["patch"]) if conv_only
             else partial(backbone_flops, counts["dim"], counts["depth"], counts["patch"]))
    return sum(p * flops([len(MODALITIES[m].bands) for m in subset], size, size)
               for p, subset in modality_mix(data.modalities, data.p_fused))


def step_flops(counts: dict[str, int], batch: int) -> float:
    """Useful FLOPs of one step on one GPU: 3x the student forward on all views less the patch convolutions'
    input gradient (images need none), 1x the teacher's on global (SSLMetaArch.flops_per_sample's count)."""
    from terrafm.ssl.head import head_flops

    head = head_flops(counts["dim"], HEAD["hidden_dim"], HEAD["bottleneck_dim"], HEAD["num_prototypes"],
                      HEAD["num_layers"])
    g, loc = view_flops(counts, GLOBAL_SIZE) + head, view_flops(counts, LOCAL_SIZE) + head
    conv = N_GLOBAL * view_flops(counts, GLOBAL_SIZE, True) + N_LOCAL * view_flops(counts, LOCAL_SIZE, True)
    return batch * (3 * (N_GLOBAL * g + N_LOCAL * loc) - conv + N_GLOBAL * g)


def collective_elements(counts: dict[str, int]) -> dict[str, int]:
    """Full-size tensor elements per step that go through each collective (before the (n-1)/n ring factor)."""
    b, h, r = counts["blocks"], counts["head"], counts["root"]
    return {"all_gather": 2 * STUDENT_PASSES * b + 2 * h + r + (b + h + r),  # student fwd+bwd, teacher once
            "reduce_scatter": STUDENT_PASSES * b + h + r}  # a reduce per backward pass of each unit


def comm(counts: dict[str, int], gpus: int, gpus_per_node: int, hsdp: bool, nvlink_gb_s: float,
         ib_gb_s_per_gpu: float) -> dict:
    """Bytes per GPU per step of each collective and their time at the given link speeds (seconds)."""
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs are not whole nodes of {gpus_per_node}; the trainer's mesh is nodes x GPUs "
                         "per node")
    elems = collective_elements(counts)
    shard = min(gpus, gpus_per_node) if hsdp else gpus
    replicate = gpus // shard
    ring = (shard - 1) / shard
    shard_bw = nvlink_gb_s if shard <= gpus_per_node else ib_gb_s_per_gpu
    out = {"mesh": f"{replicate} x {shard}",
           "all_gather_bytes": elems["all_gather"] * PARAM_BYTES * ring,
           "reduce_scatter_bytes": elems["reduce_scatter"] * GRAD_BYTES * ring,
           # HSDP: each GPU all-reduces its 1/shard of the gradients with its peers on the other nodes
           "all_reduce_bytes": 2 * elems["reduce_scatter"] * GRAD_BYTES / shard * (replicate - 1) / replicate}
    out["comm_s"] = ((out["all_gather_bytes"] + out["reduce_scatter_bytes"]) / (shard_bw * 1e9)
                     + out["all_reduce_bytes"] / (ib_gb_s_per_gpu * 1e9))
    return out


def table(nvlink_gb_s: float = 450.0, ib_gbit_s: float = 400.0, nics_per_node: int = 8, gpus_per_node: int = 8,
          mfu: float = 1.0, node_counts: tuple[int, ...] = NODE_COUNTS) -> list[dict]:
    """One row per (model, node count, FSDP | HSDP)."""
    for name, value in (("nvlink_gb_s", nvlink_gb_s), ("ib_gbit_s", ib_gbit_s), ("mfu", mfu)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if mfu > 1 or nics_per_node < 1 or gpus_per_node < 1:
        raise ValueError("need 0 < mfu <= 1, nics_per_node >= 1 and gpus_per_node >= 1")
    ib_gb_s_per_gpu = ib_gbit_s / 8 * nics_per_node / gpus_per_node
    peak = GPUS[GPU]["tflops_bf16"] * 1e12
    rows = []
    for model, (backbone, batch) in MODELS.items():
        counts = param_counts(backbone)
        compute_s = step_flops(counts, batch) / (peak * mfu)
        for nodes in node_counts:
            gpus = nodes * gpus_per_node
            for strategy in ("FSDP", "HSDP"):
                row = {"model": model, "params_m": (counts["blocks"] + counts["head"] + counts["root"]) / 1e6,
                       "batch_per_gpu": batch, "gpus": gpus, "nodes": nodes, "strategy": strategy}
                row.update(comm(counts, gpus, gpus_per_node, strategy == "HSDP", nvlink_gb_s, ib_gb_s_per_gpu))
                row["compute_s"] = compute_s
                row["efficiency_overlapped"] = compute_s / max(compute_s, row["comm_s"])
                row["efficiency_serial"] = compute_s / (compute_s + row["comm_s"])
                rows.append(row)
    return rows


def run(args, log) -> dict:
    rows = table(args.nvlink_gb_s, args.ib_gbit_s, args.nics_per_node, args.gpus_per_node, args.mfu)
    for r in rows:
        log(f"  {r['model']} {r['gpus']:4d} GPUs {r['strategy']} {r['mesh']:>7s}: all-gather "
            f"{r['all_gather_bytes'] / 1e9:5.2f} GB, reduce-scatter {r['reduce_scatter_bytes'] / 1e9:5.2f} GB, "
            f"all-reduce {r['all_reduce_bytes'] / 1e9:5.2f} GB; comm {r['comm_s'] * 1e3:7.1f} ms vs compute "
            f"{r['compute_s'] * 1e3:6.1f} ms: efficiency {r['efficiency_overlapped']:.0%} overlapped, "
            f"{r['efficiency_serial']:.0%} serial")
    return {"gpu": GPU, "nvlink_gb_s": args.nvlink_gb_s, "ib_gbit_s": args.ib_gbit_s,
            "nics_per_node": args.nics_per_node, "gpus_per_node": args.gpus_per_node, "mfu": args.mfu,
            "rows": rows}
