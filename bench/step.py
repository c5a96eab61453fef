"""End-to-end training step: images/s, MFU and peak memory of one TerraFM self-distillation step.

One step = teacher forward on the global views, student forward on global + local views, DINO loss with
dual centering, backward, AdamW, EMA teacher update (one process, no FSDP: the per-GPU cost). The views are the
presets' workload: the global and the local views each take their sensors stratified over the loader's mix
(terrafm.data.views.modality_mix of DataConfig's modalities and p_fused), so half of them fuse 2-3 sensors
through the Case N fusion, as in training on average. MFU counts useful FLOPs (3x the student forward, 1x the
teacher forward) against the GPU's dense bf16 peak.
Each config runs twice: the unfused head (prototype layers, teacher softmax, cross-entropy ops) and
`ssl.fused_head_loss` (one dino_head_loss op: on a GPU the Triton kernel, no (views x B, K) logits).
"""

import time

import numpy as np
import torch

from .common import peak_memory, sync

# name -> (backbone, batch, global size, local size, n_local, prototypes, head hidden, bottleneck)
CONFIGS = {
    "tiny": ("terrafm_tiny", 8, 64, 32, 4, 1024, 256, 64),
    "ViT-S": ("terrafm_small", 64, 224, 96, 8, 65536, 2048, 256),
    "ViT-B": ("terrafm_base", 32, 224, 96, 8, 65536, 2048, 256),
    "ViT-L": ("terrafm_large", 16, 224, 96, 8, 65536, 2048, 256),
}
N_GLOBAL = 2


HEADS = {"unfused": False, "fused": True}


def _build(name: str, device: str, fused: bool):
    from terrafm.config import Config
    from terrafm.data.views import modality_mix
    from terrafm.modalities import MODALITIES
    from terrafm.ssl.meta_arch import SSLMetaArch

    backbone, batch, gsize, lsize, n_local, k, hidden, bottleneck = CONFIGS[name]
    cfg = Config()
    cfg.model.name, cfg.model.img_size, cfg.model.drop_path_rate = backbone, gsize, 0.0
    cfg.ssl.num_prototypes, cfg.ssl.head_hidden_dim, cfg.ssl.head_bottleneck_dim = k, hidden, bottleneck
    cfg.ssl.head_layers, cfg.ssl.fused_head_loss = 3, fused
    torch.manual_seed(0)  # the same weights for both heads: their losses are comparable
    arch = SSLMetaArch.from_config(cfg, num_classes=11, high_classes=[0, 1], device=device).to(device)
    arch.teacher.eval()
    g = torch.Generator().manual_seed(0)
    mix = modality_mix(cfg.data.modalities, cfg.data.p_fused)

    def views(n: int, size: int) -> list[dict[str, torch.Tensor]]:
        """n views whose sensors are the mix's subsets at the quantiles (i + 1/2) / n of its cumulative probability."""
        cumulative = np.cumsum([p for p, _ in mix])
        picks = [mix[min(int(np.searchsorted(cumulative, (i + 0.5) / n, side="right")), len(mix) - 1)][1]
                 for i in range(n)]
        return [{m: torch.randn(batch, len(MODALITIES[m].bands), size, size, generator=g).to(device) for m in sensors}
                for sensors in picks]

    views_g, views_l = views(N_GLOBAL, gsize), views(n_local, lsize)
    majority = torch.randint(0, 11, (batch,), generator=g).to(device)
    return arch, views_g, views_l, majority


def _measure(name: str, head: str, device: str, steps: int) -> dict:
    from terrafm.train.metrics import peak_flops

    arch, views_g, views_l, majority = _build(name, device, HEADS[head])
    opt = torch.optim.AdamW([p for p in arch.student.parameters() if p.requires_grad], lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = arch(views_g, views_l, majority, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        arch.update_teacher(0.996)
        arch.loss.update_center()
        return loss.detach()

    step()  # warm-up: allocator, lazy init
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    batch = CONFIGS[name][1]
    flops = batch * arch.flops_per_sample(views_g, views_l)
    peak = peak_flops(torch.device(device), "bf16" if device == "cuda" else "fp32", 0.0)
    mem = peak_memory(step, device) if device == "cuda" or name == "tiny" else {"bytes": None, "how": "skipped"}
    sensors = ["+".join(v) for v in views_g + views_l]
    return {"config": name, "backbone": CONFIGS[name][0], "head": head, "batch": batch, "steps": steps,
            "views": sensors, "fused_views": sum("+" in v for v in sensors),
            "precision": "bf16 autocast" if device == "cuda" else "fp32", "step_s": seconds,
            "img_per_s": batch / seconds, "tflops_per_step": flops / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "mfu_note": "" if peak else "no known peak FLOP/s for this device (MFU needs an H100/A100)",
            "peak_bytes": mem["bytes"], "memory_how": mem["how"], "loss": float(loss)}


def run(device: str, quick: bool, log) -> list[dict]:
    rows = []
    for name in CONFIGS:
        for head in HEADS:
            if device != "cuda" and name != "tiny":
                rows.append({"config": name, "backbone": CONFIGS[name][0], "head": head, "skipped": "needs GPU"})
                log(f"  {name:6s} {head:8s} skipped: needs GPU")
                continue
            steps = (2 if quick else 10) if device != "cuda" else (5 if quick else 20)
            try:
                row = _measure(name, head, device, steps)
            except torch.OutOfMemoryError as err:  # a config too big for this GPU: a row, not the end of the run
                row = {"config": name, "backbone": CONFIGS[name][0], "head": head,
                       "skipped": f"out of memory: {str(err).splitlines()[0][:200]}"}
            rows.append(row)
            if "skipped" in row:
                log(f"  {name:6s} {head:8s} skipped: {row['skipped']}")
                if device == "cuda":  # after the except block: its traceback no longer holds the config's tensors
                    torch.cuda.empty_cache()
                continue
            log(f"  {name:6s} {head:8s} {row['img_per_s']:8.1f} img/s  step {row['step_s'] * 1e3:8.1f} ms  "
                f"MFU {row['mfu'] if row['mfu'] is not None else 'n/a'}")
    return rows
