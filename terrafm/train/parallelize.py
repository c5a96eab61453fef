"""Apply parallelism to the SSL model from the outside (torchtitan style): the backbone stays plain.

Order per model (student and teacher alike): activation checkpointing per block -> torch.compile per
block -> FSDP2 `fully_shard` per block, then the head, then the root. Student and teacher are sharded
identically on one 2-D mesh ("dp_replicate", "dp_shard"), so their local shards line up for the EMA
update (SSLMetaArch.update_teacher). dp_replicate > 1 makes it HSDP: parameters are all-gathered and
gradients reduce-scattered within a dp_shard group, then all-reduced across the replicas.
"""

import os

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from terrafm.ssl.meta_arch import DINOModel, SSLMetaArch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MESH_DIMS = ("dp_replicate", "dp_shard")


def mesh_shape(dp_replicate: int, dp_shard: int, world_size: int, ranks_per_node: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) from the config keys (-1 = the rest; dp_replicate 0 = one per node).

    The default (0, -1) shards within a node and replicates across nodes: the all-gathers and
    reduce-scatters stay on NVLink and only the all-reduce of one shard crosses the network.
    """
    if dp_replicate == 0:
        if dp_shard == -1 and world_size % ranks_per_node:
            raise ValueError(f"{world_size} ranks are not whole nodes of {ranks_per_node}; set parallel.dp_replicate "
                             "and parallel.dp_shard")
        dp_replicate = world_size // ranks_per_node if dp_shard == -1 else -1
    rest = dp_replicate if dp_shard == -1 else dp_shard
    if dp_replicate == -1 or dp_shard == -1:
        if world_size % rest:
            raise ValueError(f"parallel.{'dp_replicate' if dp_shard == -1 else 'dp_shard'}={rest} does not divide "
                             f"the {world_size} ranks")
        dp_replicate, dp_shard = (rest, world_size // rest) if dp_shard == -1 else (world_size // rest, rest)
    if dp_replicate * dp_shard != world_size:
        raise ValueError(f"parallel.dp_replicate x parallel.dp_shard = {dp_replicate} x {dp_shard} = "
                         f"{dp_replicate * dp_shard}, but there are {world_size} ranks; use -1 for the rest")
    return dp_replicate, dp_shard


def check_gpus_per_node(ranks_per_node: int) -> None:
    """Every rank of a node needs a GPU of its own: more ranks than visible GPUs (--nproc, GPUS_PER_NODE above the
    allocation's) used to stop each rank with CUDA's "invalid device ordinal" traceback."""
    visible = torch.cuda.device_count()
    if ranks_per_node > visible:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"{ranks_per_node} ranks on this node, one GPU each, but {visible} GPU(s) are visible"
                         + (f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else "") + f"; start at most "
                         f"{visible} per node (--nproc, torchrun --nproc_per_node, the SLURM scripts' GPUS_PER_NODE) "
                         "or set train.device=cpu")


def apply_activation_checkpointing(model: DINOModel) -> None:
    """Recompute each block's activations in backward: memory ~ one block instead of all of them."""
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


EMBEDDING_STAGES = ("embed_one", "patchify", "fuse")  # TerraFMPatchEmbed's modality-agnostic stages


def apply_compile(model: DINOModel) -> None:
    """torch.compile (fullgraph) each block and the three stages of the embedding.

    The blocks run the same code with the same constants (the drop-path rate is a buffer), so
    Dynamo traces Block.forward once and every block reuses that graph; the embedding stages take
    the sensor's parameters as inputs, so one graph serves every sensor (see TerraFMPatchEmbed).
    dynamic=True: batch, crop size and token count are symbolic from the first call, so one graph
    serves both crop sizes (parameter shapes stay static).
    """
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=True, dynamic=True)
    patch_embed = model.backbone.patch_embed
    for name in EMBEDDING_STAGES:
        setattr(patch_embed, name, torch.compile(getattr(patch_embed, name), fullgraph=True, dynamic=True))


def apply_fsdp(model: DINOModel, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               backward: bool, forward_prefetch: int = 1, backward_prefetch: int = 1,
               reshard_after_forward: bool = True) -> None:
    """fully_shard per block, then the head, then the root (patch embedding, tokens, final norm).

    mesh: 1-D (FSDP) or 2-D ("dp_replicate", "dp_shard": HSDP). backward=True (the student) keeps its last
    block gathered after forward, since backward starts there. backward=False (the teacher) follows
    `reshard_after_forward` for every unit: False keeps the weights gathered across the step's forwards
    until `reshard_model` is called before the EMA update (which works on the shards). Each block issues the
    all-gathers of the next `forward_prefetch` blocks in forward and, in backward, of the preceding
    `backward_prefetch` blocks (0: FSDP2's implicit one-ahead prefetch).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        keep = i == len(blocks) - 1 if backward else not reshard_after_forward
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep)
    fully_shard(model.head, mesh=mesh, mp_policy=mp, reshard_after_forward=backward or reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not backward and reshard_after_forward)
    for i, block in enumerate(blocks):
        if forward_prefetch:
            block.set_modules_to_forward_prefetch(list(blocks[i + 1:i + 1 + forward_prefetch]))
        if backward and backward_prefetch:
            block.set_modules_to_backward_prefetch(list(blocks[max(0, i - backward_prefetch):i])[::-1])


def parallelize(
    arch: SSLMetaArch,
    mesh: DeviceMesh | None,
    *,
    fsdp: bool,
    precision: str = "fp32",
    reduce_precision: str = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    forward_prefetch: int = 1,
    backward_prefetch: int = 1,
    teacher_reshard_after_forward: bool = True,
) -> SSLMetaArch:
    """Apply the configured parallelism to student and teacher in place and return `arch`.

    Activation checkpointing is applied to the student only (the teacher runs without autograd).
    teacher_reshard_after_forward=False: call `reshard_model(arch.teacher)` before the EMA update.
    """
    if precision not in DTYPES or reduce_precision not in DTYPES:
        raise ValueError(f"precision and reduce_precision must be one of {sorted(DTYPES)}, "
                         f"got {precision!r} / {reduce_precision!r}")
    if fsdp and mesh is None:
        raise ValueError("fsdp=True needs a device mesh (an initialised process group)")
    if not fsdp and precision != "fp32":
        raise ValueError("precision=bf16 is applied through FSDP2's MixedPrecisionPolicy; set train.fsdp=true")
    if activation_checkpointing:
        apply_activation_checkpointing(arch.student)
    if compile:
        apply_compile(arch.student)
        apply_compile(arch.teacher)
    if fsdp:
        dtypes = DTYPES[precision], DTYPES[reduce_precision]
        apply_fsdp(arch.student, mesh, *dtypes, backward=True, forward_prefetch=forward_prefetch,
                   backward_prefetch=backward_prefetch)
        apply_fsdp(arch.teacher, mesh, *dtypes, backward=False, forward_prefetch=forward_prefetch,
                   reshard_after_forward=teacher_reshard_after_forward)
    return arch


def reshard_model(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit of `model` (a no-op for units already sharded)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
