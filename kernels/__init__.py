"""terrafm_kernels: fused Triton kernels for ViTs, importable with only torch and triton installed.

Op files (one kernel family each, same shape: Triton kernels, launcher, torch custom op with its autograd,
roofline_cost / efficiency and compile_specs for the compile report):
    patch_embed         patchify + GEMM + bias + modality/position embedding
    fusion              adaptive cross-attention fusion over modality tokens
    teacher_softmax     dual-centering teacher softmax with centre statistics
    dino_cross_entropy  student DINO cross-entropy, chunked over K
    dino_head_loss      prototype layer fused with the two above
    dino_teacher        DINOv2 teacher targets: centred softmax, log-domain Sinkhorn-Knopp
    dino_student_ce     DINOv2 student soft-target cross-entropy with per-row weights
Beside them:
    reference           pure-PyTorch specification of every op (no triton import)
    modules             nn.Module drop-ins: PatchEmbed, CrossAttentionFusion, DualCenteringSoftmax,
                        DINOCrossEntropy, DINOHeadLoss
    dino                DINOv2 drop-ins DINOLoss and iBOTPatchLoss on dino_teacher / dino_student_ce
    swap                accelerate_vit: the kernels swapped into timm / torchvision / HF ViTs
    compile_report      AOT compile of every shipped config, with efficiency counts
    _common             the one input-validation helper (check_tensor) and launch helpers
Imports inside this package are relative, so the folder can be copied into another project; the copy's
custom ops are registered under its own package name (torch.ops.<name>), these under torch.ops.terrafm.
"""

__version__ = "0.1.0"
