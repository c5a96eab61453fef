"""Host -> device hand-over: storage-dtype views, normalisation and cast on the device, batches in flight."""

import pytest
import torch

from terrafm import backends
from terrafm.data import loader as loader_module
from terrafm.data.config import DataConfig
from terrafm.data.loader import build_loader


def _cfg(shards, **kw):
    base = dict(shard_dir=str(shards), batch_size=4, global_size=40, local_size=16, n_local=2, num_workers=0,
                backend="numpy", seed=7, p_fused=0.5)
    return DataConfig(**{**base, **kw})


def test_host_views_are_storage_dtype_and_the_device_stage_normalises_them(sample_shards):
    loader = build_loader(_cfg(sample_shards))
    plan = loader.plan(0, 0)
    host, out = loader.render_host(plan), loader.render(plan)
    for hv, ov in zip(host.global_views + host.local_views, out.global_views + out.local_views, strict=True):
        for m, x in hv.items():
            assert x.dtype == (torch.float16 if m == "s1" else torch.uint16)
            assert x.element_size() == 2  # half the bytes of the float32 the model takes
            y = ov[m]
            assert y.dtype == torch.float32 and y.shape == x.shape
            mean = torch.from_numpy(loader.mean[m]).view(-1, 1, 1)
            std = torch.from_numpy(loader.std[m]).view(-1, 1, 1)
            torch.testing.assert_close(y, (x.double() - mean.double()).div(std.double()).float(), rtol=1e-5,
                                       atol=1e-5)
    torch.testing.assert_close(out.index, host.index)


class _Recorder:
    """Wraps a DeviceStage and logs the order of start / finish calls."""

    def __init__(self, stage):
        self.stage, self.log = stage, []

    def start(self, batch):
        self.log.append(("start", int(batch.index[0])))
        return self.stage.start(batch)

    def finish(self, started):
        self.log.append(("finish", int(started[0].index[0])))
        return self.stage.finish(started)


def test_the_next_batch_is_on_its_way_before_a_batch_is_handed_out(sample_shards):
    loader = build_loader(_cfg(sample_shards))
    loader.stage = recorder = _Recorder(loader.stage)
    batches = list(loader)
    starts = [i for i, (what, _) in enumerate(recorder.log) if what == "start"]
    finishes = [i for i, (what, _) in enumerate(recorder.log) if what == "finish"]
    assert len(starts) == len(finishes) == len(batches) == len(loader)
    for k in range(len(batches) - loader_module.IN_FLIGHT + 1):
        # batch k is finished (handed out) only after batch k + IN_FLIGHT - 1 was started
        assert finishes[k] > starts[k + loader_module.IN_FLIGHT - 1]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0


def test_the_step_counts_batches_handed_out_not_batches_in_flight(sample_shards):
    loader = build_loader(_cfg(sample_shards))
    it = iter(loader)
    next(it)
    next(it)
    assert loader.step == 2  # batch 2 is already in flight, but a resume must start from it


@pytest.mark.gpu
@pytest.mark.skipif(not backends.cuda().usable, reason="needs CUDA")
def test_cuda_transfers_from_pinned_memory_on_a_side_stream(sample_shards):
    loader = build_loader(_cfg(sample_shards), device="cuda")
    assert loader.pin and loader.stage.stream is not None
    host = loader.render_host(loader.plan(0, 0))
    assert all(t.is_pinned() for v in host.global_views for t in v.values())
    batch = next(iter(loader))
    assert all(t.is_cuda and t.dtype == torch.float32 for v in batch.global_views for t in v.values())
    cpu = build_loader(_cfg(sample_shards)).render(loader.plan(0, 0))
    for a, b in zip(batch.global_views, cpu.global_views, strict=True):
        for m in a:
            torch.testing.assert_close(a[m].cpu(), b[m])
