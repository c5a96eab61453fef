"""terrafm_kernels: fused Triton kernels for ViTs, importable with only torch and triton installed.

Modules (one kernel family each: Triton kernels, a torch custom op with its autograd, an nn.Module drop-in):
    reference           pure-PyTorch specification of every op (no triton import)
    patch_embed         patchify + GEMM + bias + modality/position embedding
    fusion              adaptive cross-attention fusion over modality tokens
    teacher_softmax     dual-centering teacher softmax with centre statistics
    dino_cross_entropy  student DINO cross-entropy, chunked over K
    dino_head_loss      prototype layer fused with the two above
    dino_teacher        DINOv2 teacher targets: centred softmax, log-domain Sinkhorn-Knopp
    dino_student_ce     DINOv2 student soft-target cross-entropy with per-row weights
    dino                DINOv2 drop-ins DINOLoss and iBOTPatchLoss on the two above
Imports inside this package are relative, so the folder can be copied into another project.
"""

__version__ = "0.1.0"
