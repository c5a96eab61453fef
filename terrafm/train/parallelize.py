"""Apply parallelism to the SSL model from the outside (torchtitan style): the backbone stays plain.

Order per model (student and teacher alike): activation checkpointing per block -> torch.compile per
block -> FSDP2 `fully_shard` per block, then the head, then the root. Student and teacher are sharded
identically, so their local shards line up for the EMA update (SSLMetaArch.update_teacher).
"""

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from terrafm.ssl.meta_arch import DINOModel, SSLMetaArch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
               backward: bool) -> None:
    """fully_shard per block, then the head, then the root (patch embedding, tokens, final norm).

    backward=False (the teacher) reshards every unit, the root included, right after its forward:
    there is no backward to reuse the gathered weights, and the EMA update needs the shards.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        # The student's last block is all-gathered again at the start of backward: keep it gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not backward or i < len(blocks) - 1)
    fully_shard(model.head, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not backward)
    if backward:
        # Views of one step may use different sensors on different ranks: parameters of an unused
        # modality then have no gradient on one rank only; reduce zeros for them so collectives match.
        model.set_reduce_scatter_unused_params(True)


def parallelize(
    arch: SSLMetaArch,
    mesh: DeviceMesh | None,
    *,
    fsdp: bool,
    precision: str = "fp32",
    reduce_precision: str = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> SSLMetaArch:
    """Apply the configured parallelism to student and teacher in place and return `arch`.

    Activation checkpointing is applied to the student only (the teacher runs without autograd).
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
        apply_fsdp(arch.student, mesh, DTYPES[precision], DTYPES[reduce_precision], backward=True)
        apply_fsdp(arch.teacher, mesh, DTYPES[precision], DTYPES[reduce_precision], backward=False)
    return arch


def unwrap_block(block: nn.Module) -> nn.Module:
    """The plain Block under compile/checkpoint wrappers (for FLOP counting and state dict keys)."""
    while True:
        inner = getattr(block, "_orig_mod", None) or getattr(block, "_checkpoint_wrapped_module", None)
        if inner is None:
            return block
        block = inner
