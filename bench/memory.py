"""Peak memory of the DINO loss at K = 65536: fused dino_head_loss vs the unfused path (logits materialised).

The unfused path (dino_head_loss_reference: prototype GEMM -> teacher softmax -> cross-entropy, forward +
backward) is measured on every machine. The fused kernel is measured on a GPU; on CPU it only runs in
the Triton interpreter, so its footprint is computed from the buffers it allocates (labelled analytic).
"""

import torch

from terrafm_kernels._common import num_splits

from .common import peak_memory
from .kernels import dino_head_loss as head_bench

H100_SMS = 132


def fused_footprint_bytes(S: int, T: int, B: int, K: int, D: int, dtype_bytes: int, sms: int = H100_SMS) -> int:
    """Bytes dino_head_loss allocates at its peak (backward), beyond its inputs, on a GPU with `sms` SMs.

    Normalised copies of h_s, h_t and W (e bytes each), the per-split fp32 projection partials
    (splits, R, D), the two fp32 (K, D) terms of dL/dW plus their difference and its cast to the input dtype.
    """
    fp32 = dtype_bytes == 4
    block_m, block_k = (16, 16) if fp32 else (64, 64)
    rs, rt = S * B, T * B
    splits = max(num_splits(K, -(-r // block_m), block_k, 2 * sms)[0] for r in (rs, rt))
    copies = (rs + rt) * D * dtype_bytes + K * D * dtype_bytes
    partials = splits * max(rs, rt) * (D + 1) * 4
    weight_grad = 3 * K * D * 4 + K * D * dtype_bytes
    return copies + max(partials, weight_grad) + rs * D * 4


def run(device: str, quick: bool, log) -> list[dict]:
    shape = {"S": 12, "T": 2, "B": 64, "K": 65536, "D": 256}  # 2 global + 10 local views: 768 rows
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
    return rows
