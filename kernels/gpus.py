"""The GPUs terrafm predicts and measures against: one table of datasheet figures (SXM parts, dense peaks).

Read by the compile report (occupancy, roofline time per kernel), the bench roofline, the data budget and MFU.
Per SM: registers, shared memory (bytes), resident CTAs and warps; L2 in bytes; peaks in TFLOP/s ("bf16": the
fp16/bf16 tensor cores, "tf32", "fp32": the FMA units IEEE dots and elementwise math use); HBM in TB/s.
"""

GPUS = {
    "H100 SXM": {"capability": 90, "sms": 132, "regs": 65536, "shared": 233472, "ctas": 32, "warps": 64,
                 "l2": 50 << 20, "tflops_bf16": 989.5, "tflops_tf32": 494.5, "tflops_fp32": 66.9, "tb_per_s": 3.35},
    "H200 SXM": {"capability": 90, "sms": 132, "regs": 65536, "shared": 233472, "ctas": 32, "warps": 64,
                 "l2": 50 << 20, "tflops_bf16": 989.5, "tflops_tf32": 494.5, "tflops_fp32": 66.9, "tb_per_s": 4.8},
    "A100 SXM 80GB": {"capability": 80, "sms": 108, "regs": 65536, "shared": 167936, "ctas": 32, "warps": 64,
                      "l2": 40 << 20, "tflops_bf16": 312.0, "tflops_tf32": 156.0, "tflops_fp32": 19.5,
                      "tb_per_s": 2.039},
}
# HBM latency under load (ns), for Little's law: to stream at full bandwidth an SM must have bandwidth x latency /
# SMs bytes of loads in flight (H100 ~15 KB, A100 ~11 KB). An assumption: microbenchmarks give 400-600 core cycles
# (~300-450 ns) unloaded on A100 / H100, and queues add to it at full bandwidth.
LOADED_DRAM_LATENCY_NS = 600
# The GPU each compile-report architecture is costed on.
BY_CAPABILITY = {80: "A100 SXM 80GB", 90: "H100 SXM"}
