"""Peak memory of the DINO loss at K = 65536: fused dino_head_loss vs the unfused path (logits materialised).

The unfused path (reference.dino_head_loss: prototype GEMM -> teacher softmax -> cross-entropy, forward +
backward) is measured on every machine. The fused kernel is measured on a GPU; on CPU it only runs in
the Triton interpreter, so its footprint is computed from the buffers it allocates (labelled analytic).

The DINOv2 drop-ins (terrafm_kernels.dino) get the same treatment at DINOv2's ViT-L per-GPU shapes: one
DINO class-token step (centred teacher, 8 local + 2 global crops of 64 images) and one iBOT step (centred
teacher + forward_masked over the masked patch rows), DINOv2's eager math against the drop-in, and the
class-token step from the bottleneck on (last layer included) against DINOLoss.forward_fused.
"""

import functools

import torch

from terrafm_kernels._common import num_splits

from . import dinov2_eager
from .common import peak_memory
from .kernels import dino_head_loss as head_bench
from .kernels import dinov2_dino_head_loss, dinov2_dino_loss, dinov2_ibot_loss

H100_SMS = 132


def fused_footprint_bytes(S: int, T: int, B: int, K: int, D: int, dtype_bytes: int, sms: int = H100_SMS) -> int:
    """Bytes dino_head_loss allocates at its peak, beyond its inputs (v already in the features' dtype, as the
    presets' bf16 parameters are), on a GPU with `sms` SMs, from the kernel's own LaunchPlan.

    Kept through the call: the normalised h_s, h_t (e bytes each), the gains g (K fp32 per side) and what
    backward needs (A, Bs fp32; 1 / ||v|| per side). The forward's peak adds one project launch's fp32
    partials (splits, R, D + 2), centre-sum partials and (programs, K) norm scratch; the backward's adds the
    cast (R, D) operands, dL/dh_s in fp32, dL/dv (K, D) in v's dtype and dL/dg. The normalised weight is
    never formed.
    """
    from terrafm_kernels.dino_head_loss import LaunchPlan

    e, rs, rt = dtype_bytes, S * B, T * B
    plan = LaunchPlan(K, D, e == 4, False, sms)
    kept = (rs + rt) * D * e + 8 * K + (rt + rs) * D * 4 + 8 * K

    def project(R: int, centred: bool) -> int:
        grid, _, splits, _ = plan.project_grid(R)
        return splits * R * (D + 2) * 4 + grid[0] * grid[1] * K * 4 + (grid[1] * 2 * K * 4 if centred else 0)

    forward = max(project(rs, False), project(rt, True))
    backward = (rs + rt) * D * e + rs * D * 4 + K * D * e + 4 * K
    return kept + max(forward, backward)


def run(device: str, quick: bool, log) -> list[dict]:
    shape = {"S": 10, "T": 2, "B": 64, "K": 65536, "D": 256}  # the presets: 2 global + 8 local views, 640 rows
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    label = " ".join(f"{k}={v}" for k, v in shape.items())
    args = head_bench.inputs(shape, device, dtype)
    rows = []

    def unfused():
        loss = head_bench.reference(*args)[0]
        loss.backward()
        return loss

    mem = peak_memory(unfused, device)
    rows.append({"path": "unfused (logits materialised)", "shape": label, "dtype": str(dtype)[6:],
                 "peak_bytes": mem["bytes"], "how": "measured: " + mem["how"]})
    if device == "cuda":
        fused_fn = head_bench.kernel()

        def fused():
            loss = fused_fn(*args)[0]
            loss.backward()
            return loss

        mem = peak_memory(fused, device)
        rows.append({"path": "fused dino_head_loss", "shape": label, "dtype": str(dtype)[6:],
                     "peak_bytes": mem["bytes"], "how": "measured: " + mem["how"]})
    else:
        e = torch.finfo(dtype).bits // 8
        rows.append({"path": "fused dino_head_loss", "shape": label, "dtype": str(dtype)[6:],
                     "peak_bytes": fused_footprint_bytes(**shape, dtype_bytes=e),
                     "how": f"analytic: buffers the kernel allocates on an H100 ({H100_SMS} SMs); "
                            "the kernel runs only in the interpreter here"})
    for r in rows:
        log(f"  {r['path']:32s} {r['shape']:32s} {r['peak_bytes'] / 2**20:9.1f} MiB  ({r['how']})")
    return rows + dinov2_rows(device, quick, log)


def _ce_partials(R: int, K: int, sms: int) -> int:
    """Bytes of the student cross-entropy's per-split statistics for R rows (GPU block sizes)."""
    from terrafm_kernels import dino_student_ce as ce

    return 16 * R * num_splits(K, -(-R // ce.GPU_BLOCK_R), ce.GPU_BLOCK_K, 4 * sms)[0] + 8 * R


def dinov2_footprint_bytes(op: str, shape: dict, dtype_bytes: int, sms: int = H100_SMS) -> int:
    """Bytes the DINOv2 drop-in allocates at its peak (backward), beyond its inputs, on a GPU with `sms` SMs.

    dinov2_dino_loss: the fp32 teacher probabilities (2B, K); the student gradients (local crops' chunks and
    their concatenation, global crops) in the input dtype. dinov2_ibot_loss: the fp32 teacher probabilities
    and the student gradient (M, K). Plus the cross-entropy's per-split statistics. dinov2_dino_head_loss
    (forward_fused): fused_footprint_bytes of dino_head_loss, which it runs.
    """
    K, e = shape["K"], dtype_bytes
    if op == "dinov2_dino_head_loss":  # dino_head_loss's buffers plus the concatenated student features
        B, n, D = shape["B"], shape["local"], shape["D"]
        return fused_footprint_bytes(2 + n, 2, B, K, D, e, sms) + (2 + n) * B * D * e
    if op == "dinov2_dino_loss":
        B, n = shape["B"], shape["local"]
        return 4 * 2 * B * K + 2 * n * B * K * e + 2 * B * K * e + n * _ce_partials(B, K, sms) + _ce_partials(
            2 * B, K, sms)
    M = shape["M"]
    return 4 * M * K + M * K * e + _ce_partials(M, K, sms)


def _loss_step(fn, args: tuple):
    """One forward + backward of fn(*args); input gradients dropped so each call starts alike."""
    loss = fn(*args)
    loss.backward()
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None
    return loss


def dinov2_rows(device: str, quick: bool, log) -> list[dict]:
    """Peak memory of the DINOv2 drop-ins against DINOv2's eager loss, K = 65536 prototypes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vit_l = dinov2_eager.VIT_L
    masked = 512 if quick else vit_l["masked"]
    cases = [(dinov2_dino_loss, {"B": vit_l["B"], "local": vit_l["local"], "K": 65536}),
             (dinov2_dino_head_loss, {"B": vit_l["B"], "local": vit_l["local"], "K": 65536, "D": 256}),
             (dinov2_ibot_loss, {"M": masked, "images": 2 * vit_l["B"], "K": 65536})]
    rows = []
    for bench, shape in cases:
        label = " ".join(f"{k}={v}" for k, v in shape.items())
        args = bench.inputs(shape, device, dtype)

        mem = peak_memory(functools.partial(_loss_step, bench.reference, args), device)
        rows.append({"path": f"{bench.OP} eager (DINOv2 math)", "shape": label, "dtype": str(dtype)[6:],
                     "peak_bytes": mem["bytes"], "how": "measured: " + mem["how"]})
        if device == "cuda":
            mem = peak_memory(functools.partial(_loss_step, bench.kernel(), args), device)
            rows.append({"path": f"{bench.OP} drop-in", "shape": label, "dtype": str(dtype)[6:],
                         "peak_bytes": mem["bytes"], "how": "measured: " + mem["how"]})
        else:
            rows.append({"path": f"{bench.OP} drop-in", "shape": label, "dtype": str(dtype)[6:],
                         "peak_bytes": dinov2_footprint_bytes(bench.OP, shape, torch.finfo(dtype).bits // 8),
                         "how": f"analytic: buffers the kernels allocate on an H100 ({H100_SMS} SMs); "
                                "the kernels run only in the interpreter here"})
        for r in rows[-2:]:
            log(f"  {r['path']:32s} {r['shape']:32s} {r['peak_bytes'] / 2**20:9.1f} MiB  ({r['how']})")
    return rows
