"""The communication model of `terrafm bench --only comm`: its arithmetic, and the CLI writing the table."""

import json
import subprocess
import sys

import pytest

from terrafm_bench import comm

COUNTS = {"blocks": 1000, "head": 100, "root": 10, "dim": 64, "depth": 2, "patch": 16}


def test_bytes_per_gpu_follow_the_ring_formulas():
    """8 GPUs on one node: FSDP = HSDP (one replica, no all-reduce); 16 GPUs on 2 nodes, HSDP 2 x 8:
    all-gather and reduce-scatter within the node, all-reduce of 1/8 of the gradients across nodes."""
    ag = 2 * 2 * 1000 + 2 * 100 + 10 + 1110  # student: 2 passes fwd + bwd, head twice, root once; teacher once
    rs = 2 * 1000 + 100 + 10
    one_node = comm.comm(COUNTS, 8, 8, hsdp=True, nvlink_gb_s=100.0, ib_gb_s_per_gpu=10.0)
    assert one_node == comm.comm(COUNTS, 8, 8, hsdp=False, nvlink_gb_s=100.0, ib_gb_s_per_gpu=10.0)
    assert one_node["mesh"] == "1 x 8" and one_node["all_reduce_bytes"] == 0
    assert one_node["all_gather_bytes"] == pytest.approx(ag * 2 * 7 / 8)
    assert one_node["reduce_scatter_bytes"] == pytest.approx(rs * 4 * 7 / 8)
    assert one_node["comm_s"] == pytest.approx((ag * 2 + rs * 4) * 7 / 8 / 100e9)

    hsdp = comm.comm(COUNTS, 16, 8, hsdp=True, nvlink_gb_s=100.0, ib_gb_s_per_gpu=10.0)
    assert hsdp["mesh"] == "2 x 8"
    assert hsdp["all_reduce_bytes"] == pytest.approx(2 * rs * 4 / 8 * 1 / 2)
    assert hsdp["comm_s"] == pytest.approx((ag * 2 + rs * 4) * 7 / 8 / 100e9 + hsdp["all_reduce_bytes"] / 10e9)
    fsdp = comm.comm(COUNTS, 16, 8, hsdp=False, nvlink_gb_s=100.0, ib_gb_s_per_gpu=10.0)
    assert fsdp["mesh"] == "1 x 16" and fsdp["all_reduce_bytes"] == 0
    assert fsdp["comm_s"] == pytest.approx((ag * 2 + rs * 4) * 15 / 16 / 10e9)  # every byte at the network share


def test_table_hsdp_scales_past_one_node_and_link_speeds_matter():
    rows = {(r["model"], r["gpus"], r["strategy"]): r for r in comm.table()}
    assert {k[0] for k in rows} == {"ViT-B", "ViT-L"} and {k[1] for k in rows} == {8, 64, 512}
    for model in ("ViT-B", "ViT-L"):
        assert rows[model, 8, "FSDP"]["comm_s"] == rows[model, 8, "HSDP"]["comm_s"]
        for gpus in (64, 512):
            assert rows[model, gpus, "HSDP"]["comm_s"] < rows[model, gpus, "FSDP"]["comm_s"] / 3
            assert rows[model, gpus, "HSDP"]["mesh"] == f"{gpus // 8} x 8"
        r = rows[model, 64, "FSDP"]
        assert 0 < r["efficiency_serial"] <= r["efficiency_overlapped"] <= 1
    # one TerraFM-B model: 85M in blocks, ~28M in the per-sensor patch embeddings, ~23M in the DINO head
    assert 120 < rows["ViT-B", 8, "FSDP"]["params_m"] < 150
    slow = {(r["model"], r["gpus"], r["strategy"]): r for r in comm.table(ib_gbit_s=200.0)}
    assert slow["ViT-B", 64, "FSDP"]["comm_s"] == pytest.approx(2 * rows["ViT-B", 64, "FSDP"]["comm_s"])
    with pytest.raises(ValueError, match="mfu"):
        comm.table(mfu=0.0)


def test_cli_writes_the_comm_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "bench", "--only", "comm", "--out", str(tmp_path),
                           "--ib-gbit-s", "200"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "bench.md").read_text()
    assert "## Communication per GPU per step: FSDP vs HSDP" in md and "2x200 Gb/s" not in md
    assert "8x200 Gb/s InfiniBand" in md and md.count("| ViT-L |") == 6
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["comm"]["rows"]
    assert len(rows) == 12
    bad = subprocess.run([sys.executable, "-m", "terrafm.cli", "bench", "--only", "comm", "--out", str(tmp_path),
                          "--mfu", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "mfu" in bad.stderr and "Traceback" not in bad.stderr


def test_nvlink_default_is_one_direction_like_infiniband():
    """A ring collective's bytes cross each link in one direction: NVLink 4 is 18 links x 25 GB/s per direction
    on H100 SXM (NVIDIA's 900 GB/s adds both directions), as InfiniBand's 400 Gb/s is per direction."""
    import argparse

    from terrafm_bench.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    per_direction = 18 * 25.0
    assert parser.parse_args([]).nvlink_gb_s == per_direction
    row = next(r for r in comm.table() if r["model"] == "ViT-B" and r["gpus"] == 8)
    ring_bytes = row["all_gather_bytes"] + row["reduce_scatter_bytes"]
    assert row["comm_s"] == pytest.approx(ring_bytes / (per_direction * 1e9))


def test_root_counts_the_fusion_parameters_the_presets_train():
    """ViT-B root by hand (A = 3 D, patch 16, 12 + 12 + 2 bands): three convs and modality vectors, the token
    projection, the Case N fusion (key A x A, 5 queries, pool; model.fusion is on in every preset), cls, 197
    position embeddings, final norm."""
    D, A, p = 768, 3 * 768, 16
    convs = (12 + 12 + 2) * p * p * A + 3 * A + 3 * A
    projection = A * A + 2 * A + (A * A + A) + (A * D + D)
    fusion = A * A + 5 * A + A
    assert comm.param_counts("terrafm_base")["root"] == convs + projection + fusion + D + 197 * D + 2 * D


def test_step_compute_averages_the_presets_sensor_mix():
    """Half the views fuse 2-3 sensors, each with its own patch embedding (p_fused 0.5): the step's compute is the
    average over the mix, by hand here, above the one-S2-sensor-per-view count it was (34 ms, now 38 ms for ViT-B)."""
    from terrafm.models.terrafm import backbone_flops

    counts = comm.param_counts("terrafm_base")
    one = lambda channels: backbone_flops(768, 12, 16, channels, 224, 224)  # noqa: E731
    singles = (one([2]) + one([12]) + one([12])) / 3
    pairs = (one([2, 12]) + one([2, 12]) + one([12, 12])) / 3
    expected = 0.5 * singles + 0.5 * (0.5 * pairs + 0.5 * one([2, 12, 12]))
    assert comm.view_flops(counts, 224) == pytest.approx(expected)
    assert comm.view_flops(counts, 224) > 1.05 * one([12])


def test_gpu_counts_are_whole_nodes():
    """--gpus-per-node 3 labelled a 2 x 3 HSDP mesh (6 GPUs) as 8 GPUs, and 7 a 1 x 7 one: the rows priced meshes
    the trainer cannot build. The table now counts nodes (1, 8, 64), and comm() refuses partial nodes."""
    for per_node in (3, 6, 7, 8):
        rows = comm.table(gpus_per_node=per_node)
        assert sorted({r["gpus"] for r in rows}) == [per_node, 8 * per_node, 64 * per_node]
        for r in rows:
            replicate, shard = (int(x) for x in r["mesh"].split(" x "))
            assert replicate * shard == r["gpus"] == r["nodes"] * per_node, r
            assert shard == (per_node if r["strategy"] == "HSDP" else r["gpus"]), r
    with pytest.raises(ValueError, match="8 GPUs are not whole nodes of 3"):
        comm.comm(COUNTS, 8, 3, hsdp=True, nvlink_gb_s=100.0, ib_gb_s_per_gpu=10.0)
