"""Microbenchmarks of every bench op through pytest-benchmark (`pytest tests/bench/test_microbench.py
--benchmark-only` to compare runs); cheap enough to run as plain tests: tiny shapes, a few rounds.

On CUDA each also checks the timed provider's result against the eager reference (test_fused_kernel), so a fast
wrong kernel fails; on CPU the kernels' correctness is tests/kernels' (interpreter, float64 oracle) and these only
time the eager reference.
"""

import pytest
import torch

from terrafm_bench import kernels as kernel_benches

TINY = {
    "patch_embed": {"B": 2, "C": 4, "H": 32, "W": 32, "E": 32, "p": 8},
    "fusion": {"T": 12, "M": 3, "A": 64, "Q": 5},
    "attention": {"B": 2, "H": 2, "N": 17, "d": 16},
    "teacher_softmax": {"R": 8, "K": 256},
    "dino_cross_entropy": {"S": 3, "T": 2, "B": 4, "K": 256},
    "dino_head_loss": {"S": 3, "T": 2, "B": 4, "K": 256, "D": 32},
    "dinov2_dino_loss": {"B": 4, "local": 2, "K": 256},
    "dinov2_dino_head_loss": {"B": 4, "local": 2, "K": 256, "D": 32},
    "dinov2_ibot_loss": {"M": 12, "images": 4, "K": 256},
    "dinov2_sinkhorn_knopp": {"R": 8, "K": 256},
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("op", kernel_benches.OPS)
def test_eager_reference(benchmark, op):
    bench = kernel_benches.load(op)
    args = bench.inputs(TINY[op], DEVICE, torch.float32)
    out = benchmark.pedantic(bench.reference, args=args, rounds=3, warmup_rounds=1)
    assert torch.isfinite(_first(out)).all()


@pytest.mark.parametrize("op", kernel_benches.OPS)
def test_fused_kernel(benchmark, op):
    if DEVICE != "cuda":
        pytest.skip("needs CUDA: Triton kernels run only in the interpreter here, and interpreter runs are never timed")
    bench = kernel_benches.load(op)
    try:
        fn = bench.kernel()
    except ImportError as err:
        if op != "attention":  # the one op that ships no kernel; for any other a broken import is a failure, not a skip
            raise
        pytest.skip(str(err))
    args = bench.inputs(TINY[op], DEVICE, torch.float32)
    out = benchmark.pedantic(fn, args=args, rounds=5, warmup_rounds=2)
    torch.testing.assert_close(_first(out).float(), _first(bench.reference(*args)).float(), rtol=1e-4, atol=1e-4)


def test_patch_embed_bench_times_the_training_call_without_an_image_gradient():
    """Training never needs grad_x (the images are inputs): the bench computed it and its roofline counted
    6 M KD E FLOPs, 1.5x the 4 M KD E of forward + grad_weight."""
    bench = kernel_benches.load("patch_embed")
    shape = TINY["patch_embed"]
    x, weight, bias = bench.inputs(shape, "cpu", torch.float32)
    assert not x.requires_grad and weight.requires_grad and bias.requires_grad
    M, KD, E = shape["B"] * (shape["H"] // shape["p"]) ** 2, shape["C"] * shape["p"] ** 2, shape["E"]
    assert bench.cost(shape)["flops"] == 4 * M * KD * E
