"""torch.compile over the training path: no graph breaks with every op on Triton, and no recompiles after
warm-up (one Block graph for all blocks and both crop sizes, bounded embedding graphs)."""

from functools import partial

import pytest
import torch
import torch._dynamo
from synthetic import SyntheticLoader
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from terrafm.models import build_model
from terrafm.models.vit import Block
from terrafm.ssl.loss import DINOLoss
from terrafm.ssl.meta_arch import SSLMetaArch
from terrafm.train.parallelize import parallelize

KERNEL_OPS = ("patch_embed", "cross_attention_fusion", "teacher_softmax", "dino_cross_entropy", "dino_head_loss")


def _arch(backend: str, depth: int = 2, fused_head_loss: bool = False, drop_path_rate: float = 0.1) -> SSLMetaArch:
    torch.manual_seed(0)
    prefs = {op: backend for op in KERNEL_OPS}
    loss = DINOLoss(64, 11, [1], ops_prefer=prefs)
    factory = partial(build_model, "terrafm_tiny", img_size=32, fusion=True, depth=depth, fusion_heads=4, ops=prefs)
    head = dict(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    arch = SSLMetaArch.build(factory, head, loss, drop_path_rate, fused_head_loss=fused_head_loss)
    arch.teacher.eval()
    return arch


def _inputs(batch) -> tuple:
    return batch.global_views, batch.local_views, batch.majority_class, 0.04


@pytest.mark.parametrize("fused_head_loss", [False, True])
def test_student_forward_and_loss_have_no_graph_breaks_with_every_op_on_triton(fused_head_loss):
    """Teacher + student forward (Case 1 and Case N views, two crop sizes) and the DINO loss in one graph,
    every kernel op forced to Triton (the interpreter on CPU): the custom ops never break the graph."""
    arch = _arch("triton", fused_head_loss=fused_head_loss)
    batch = next(iter(SyntheticLoader(num_samples=4, batch_size=2, num_local=2)))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(arch)(*_inputs(batch))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops_in_graph = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
                    if node.op == "call_function"}
    expected = {"terrafm.patch_embed.default", "terrafm.cross_attention_fusion.default"}
    expected |= ({"terrafm.dino_head_loss.default"} if fused_head_loss
                 else {"terrafm.teacher_softmax.default", "terrafm.dino_cross_entropy.default"})
    assert expected <= ops_in_graph, ops_in_graph


@pytest.mark.slow
def test_compiled_custom_ops_match_eager_with_gradients(ieee_convolutions):
    """inductor (fullgraph) around the Triton custom ops: same loss and gradients as eager. fp32 patch_embed runs
    IEEE here: with tf32 operands, inductor's last-bit differences upstream flip some roundings (3e-5 apart)."""
    batch = next(iter(SyntheticLoader(num_samples=4, batch_size=2, num_local=2)))
    grads = []
    for compiled in (False, True):
        arch = _arch("triton", drop_path_rate=0.0)
        fn = torch.compile(arch, fullgraph=True) if compiled else arch
        torch._dynamo.reset()
        loss = fn(*_inputs(batch))
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in arch.student.parameters()]))
    (eager_loss, eager_grads), (loss, compiled_grads) = grads
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads, strict=True):
        assert (g_compiled is None) == (g_eager is None)
        if g_eager is not None:
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_recompiles_stay_bounded_over_steps_and_crop_sizes():
    """3 training steps, 2 crop sizes, Case 1 and Case N views, drop path on: after the first step no
    new graph is compiled, and Block.forward has exactly two graphs (student, teacher) for 4 blocks."""
    arch = _arch("torch", depth=4)
    parallelize(arch, None, fsdp=False, compile=True)
    optimizer = torch.optim.SGD(arch.student.parameters(), lr=0.01)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for batch in SyntheticLoader(num_samples=6, batch_size=2, num_local=2):
        arch(*_inputs(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        arch.update_teacher(0.99)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(graphs) == 3
    assert graphs[0] == graphs[1] == graphs[2], f"graphs compiled after each step: {graphs}"
    # embedding: embed_one / patchify per (sensor channels, crop size, student|teacher), fuse per mode
    assert graphs[0] <= 16, graphs
    assert len(_debug_get_cache_entry_list(Block.forward.__code__)) == 2
