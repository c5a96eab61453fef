"""`terrafm bench`: a quick subset leaves JSON / markdown / PNG with versions and git revision; --compare."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from terrafm.cli import main
from terrafm_bench.common import GPUS, TensorPeak, roofline_floor_us
from terrafm_bench.memory import fused_footprint_bytes


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "--only", "kernels,roofline,compile", "--ops", "teacher_softmax",
                 "--out", str(out)])
    return code, out


def test_quick_subset_writes_json_markdown_and_png(quick_run):
    code, out = quick_run
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().startswith("# terrafm bench (quick")
    assert (out / "kernel_teacher_softmax.png").stat().st_size > 1000
    meta = result["meta"]
    assert meta["info"]["versions"]["torch"] == torch.__version__
    assert meta["git_revision"] and not meta["git_revision"].startswith("unknown")
    assert meta["timestamp"] and meta["machine"]["cpu_count"]
    rows = {r["provider"]: r for r in result["sections"]["kernels"]}
    assert rows["eager"]["ms"] > 0 and rows["eager"]["gb_per_s"] > 0 and rows["eager"]["peak_bytes"] > 0
    if rows["eager"]["dtype"] == "float32":  # GB/s from the bytes of the timed dtype: fp32 logits in, fp32 probs out
        R, K = 128, 8192
        assert rows["eager"]["bytes"] == 4 * R * K + 4 * R * K + 4 * 4 * K  # + c, c_h read, two sums written
        assert rows["eager"]["gb_per_s"] == pytest.approx(rows["eager"]["bytes"] / (rows["eager"]["ms"] * 1e6))
    assert rows["compile"]["ms"] > 0
    if not torch.cuda.is_available():  # interpreter runs are never timed
        assert "ms" not in rows["kernel"] and "interpreter" in rows["kernel"]["skipped"]
    roof = result["sections"]["roofline"]
    assert {r["op"] for r in roof} >= {"teacher_softmax", "dino_head_loss"}
    assert all(r["floor_us_H100"] < r["floor_us_A100"] for r in roof)
    compile_section = result["sections"]["compile"]
    # compile_report runs on a CPU (scripts/test.sh runs it too): a skipped section here is a broken report, which
    # `"rows" in compile_section or compile_section["skipped"]` let pass
    assert compile_section.get("rows") and "skipped" not in compile_section, compile_section
    # --ops teacher_softmax: the configs of its kernel module, for both archs (the whole report took ~100 s here)
    assert {r["module"] for r in compile_section["rows"]} == {"teacher_softmax"}
    assert {r["arch"] for r in compile_section["rows"]} == {"sm_80", "sm_90"}


def test_ops_select_the_compile_reports_kernel_modules(tmp_path, monkeypatch):
    """--ops selected only within the kernels section: the compile section compiled every shipped kernel."""
    from terrafm_bench import compile as compile_section
    from terrafm_bench import kernels

    asked = []
    monkeypatch.setattr(compile_section, "run", lambda quick, log, modules=None: asked.append(modules) or {"rows": []})
    assert main(["bench", "--only", "compile", "--ops", "dinov2_ibot_loss,fusion,dinov2_sinkhorn_knopp",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["bench", "--only", "compile", "--out", str(tmp_path / "b")]) == 0
    assert asked == [["dino_teacher", "dino_student_ce", "fusion"], None]
    assert main(["bench", "--only", "compile", "--ops", "attention", "--out", str(tmp_path / "c")]) == 0
    section = json.loads((tmp_path / "c" / "bench.json").read_text())["sections"]["compile"]
    assert section == {"skipped": "--ops attention launches no Triton kernel of terrafm_kernels"}
    # every bench op names modules the compile report knows
    from terrafm_kernels.compile_report import MODULES
    assert all(set(kernels.load(op).KERNEL_MODULES) <= set(MODULES) for op in kernels.OPS)


def test_compare_reports_ratio_of_common_measurements(quick_run, tmp_path, capsys):
    _, out = quick_run
    a = tmp_path / "a.json"
    shutil.copy(out / "bench.json", a)
    slower = json.loads(a.read_text())
    for r in slower["sections"]["kernels"]:
        if "ms" in r:
            r["ms"] *= 2
    b = tmp_path / "b.json"
    b.write_text(json.dumps(slower))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "2.00x" in text and "teacher_softmax" in text and "0 only in A" in text


def test_bad_arguments_name_what_is_wrong(tmp_path, capsys):
    assert main(["bench", "--only", "kernels,speed", "--out", str(tmp_path)]) == 2
    assert "speed" in capsys.readouterr().err
    bogus = tmp_path / "x.json"
    bogus.write_text("{}")
    assert main(["bench", "--compare", str(bogus), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    for flag, value in (("--mfu", "-1"), ("--mfu", "nan"), ("--mfu", "1.5"), ("--mfu", "5e-324"),
                        ("--gpus-per-node", "0"), ("--ib-gbit-s", "-400")):
        assert main(["bench", "--only", "roofline", "--out", str(tmp_path / "r"), flag, value]) == 2
        assert flag in capsys.readouterr().err
    for ops in ("", "fusion,"):  # an empty --ops ran every kernel
        assert main(["bench", "--only", "kernels", "--ops", ops, "--out", str(tmp_path / "k")]) == 2
        assert "--ops: unknown ['']" in capsys.readouterr().err
    # --ops without the kernels or compile section selected nothing and was ignored in silence
    assert main(["bench", "--only", "roofline", "--ops", "fusion", "--out", str(tmp_path / "k")]) == 2
    assert "--ops applies to the kernels and compile sections" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()  # a refused run made its --out folder first
    assert main(["bench", "--only", "roofline", "--out", str(bogus)]) == 2  # a file where the folder should go
    assert "is a file" in capsys.readouterr().err and bogus.read_text() == "{}"


@pytest.mark.parametrize("flag", ["--nvlink-gb-s", "--ib-gbit-s"])
def test_an_infinite_bandwidth_is_refused(tmp_path, capsys, flag):
    """inf passed the `> 0` check and priced every transfer at 0 ms."""
    assert main(["bench", "--only", "comm", "--out", str(tmp_path), flag, "inf"]) == 2
    assert f"{flag} must be a positive finite number" in capsys.readouterr().err


def _result(step_rows: list[dict], revision: str = "abc") -> dict:
    return {"quick": True, "device": "cpu", "meta": {"git_revision": revision}, "sections": {"step": step_rows}}


def test_compare_header_keeps_the_dirty_mark_and_words(tmp_path, capsys):
    """Revisions were cut to 12 characters: '-dirty' vanished, 'unknown (not a git checkout)' read 'unknown (not'."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([], "678a791ec9e255c71d2733934fc3570475df0c77-dirty")))
    b.write_text(json.dumps(_result([], "unknown (not a git checkout)")))
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "(678a791ec9e2-dirty, cpu)" in header and "(unknown (not a git checkout), cpu)" in header


def test_compare_keeps_rows_that_differ_only_in_head_apart(tmp_path, capsys):
    rows = [{"config": "tiny", "batch": 8, "precision": "fp32", "head": h, "step_s": s}
            for h, s in (("unfused", 0.2), ("fused", 0.4))]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(rows)))
    b.write_text(json.dumps(_result([{**r, "step_s": r["step_s"] / 2} for r in rows])))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "| step | tiny | 8 | fp32 | unfused | 200 | 100 | 0.50x |" in table
    assert "| step | tiny | 8 | fp32 | fused | 400 | 200 | 0.50x |" in table


def test_compare_keeps_data_rows_of_other_shards_or_workloads_apart(tmp_path, capsys):
    """Data rows were keyed by path alone: the bundled 60 px sample against 240 px shards read as a 4-5x
    regression."""
    def data(tile, rate, quick=True):
        return {**_result([]), "quick": quick, "sections": {"data": {
            "tile_size": tile, "modalities": {"s2_l2a": 12}, "rows": [{"path": "cpp", "tiles_per_s": rate}]}}}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(data(60, 1000.0)))
    b.write_text(json.dumps(data(240, 250.0)))
    c.write_text(json.dumps(data(60, 500.0)))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    assert "1 only in A, 1 only in B" in capsys.readouterr().out
    assert main(["bench", "--compare", str(a), str(c)]) == 0
    assert "| data | cpp | 60 px tiles, {'s2_l2a': 12} | quick |  | 1 | 2 | 2.00x |" in capsys.readouterr().out


@pytest.mark.parametrize("content", [
    "5", '"sections meta"', "[1, 2]", '{"sections": [], "meta": {}}', "{bad", b"\xff\xfe",
    json.dumps(_result([{"config": "tiny", "step_s": 0.1}])),
    json.dumps(_result([{"config": "tiny", "batch": 8, "precision": "fp32", "step_s": 0}])),
    json.dumps(_result([{"config": "tiny", "batch": 8, "precision": "fp32", "step_s": float("inf")}])),  # 0.00x
    json.dumps({**_result([]), "sections": {"kernels": {"op": "x"}}}),
])
def test_compare_names_a_malformed_file_in_one_line(tmp_path, capsys, content):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    good.write_text(json.dumps(_result([])))
    capsys.readouterr()
    assert main(["bench", "--compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_roofline_floor_uses_the_peak_of_the_units_the_op_runs_on():
    """Dot-free ops (fusion, softmax, cross-entropy) compute on the FMA units: 66.9 TFLOP/s fp32 on H100, not the
    989.5 of bf16 tensor cores; ops built on dots keep the tensor-core peak."""
    from terrafm_bench import roofline

    compute = {"flops": int(66.9e12), "bytes": 1}
    assert roofline_floor_us(compute, "H100 SXM", "tflops_fp32") == pytest.approx(1e6)
    rows = roofline.run(None, False, lambda _: None)
    peaks = {r["op"]: r["peak"] for r in rows}
    assert peaks["patch_embed"] == peaks["attention"] == peaks["dino_head_loss"] == "tflops_bf16"
    assert peaks["fusion"] == peaks["teacher_softmax"] == peaks["dino_cross_entropy"] == "tflops_fp32"
    for r in rows:
        flops_per_s = {"tflops_bf16": 989.5e12, "tflops_fp32": 66.9e12}[r["peak"]]
        assert r["floor_us_H100"] == pytest.approx(1e6 * max(r["flops"] / flops_per_s, r["bytes"] / 3.35e12))


def test_tensor_peak_counts_live_tensors_only():
    def fn():
        a = torch.ones(256, 1024)  # 1 MiB
        b = a * 2  # 2 MiB live
        del a
        c = b + 1  # a freed: still 2 MiB live at most
        return c.sum()

    with TensorPeak() as mode:
        fn()
    assert 2 * 2**20 <= mode.peak < 2 * 2**20 + 4096


def test_tensor_peak_counts_no_view_or_in_place_write_of_an_input():
    """A view of a tensor made before the call (a reshape, a transpose) or an in-place write to it (an optimizer
    step) was counted as a new allocation of its whole storage: 1 MiB here for nothing allocated."""
    x = torch.ones(256, 1024)  # 1 MiB, made outside the mode
    with TensorPeak() as mode:
        flat, xt = x.view(-1), x.t()
        x.mul_(2)
        torch.add(x, 1, out=x)
        half = x[:128] + 1  # 0.5 MiB: the one allocation
        del flat, xt
    assert 2**19 <= mode.peak < 2**19 + 4096
    assert half.shape == (128, 1024)


def test_roofline_floor_is_the_slower_of_compute_and_bandwidth():
    h100 = GPUS["H100 SXM"]
    compute = {"flops": int(h100["tflops_bf16"] * 1e12), "bytes": 1}
    memory = {"flops": 1, "bytes": int(h100["tb_per_s"] * 1e12)}
    assert roofline_floor_us(compute, "H100 SXM") == pytest.approx(1e6)
    assert roofline_floor_us(memory, "H100 SXM") == pytest.approx(1e6)
    assert roofline_floor_us(memory, "A100 SXM 80GB") > roofline_floor_us(memory, "H100 SXM")


def test_fused_loss_footprint_grows_with_k_d_not_with_rows_times_k():
    S, T, K, D = 12, 2, 65536, 256
    logits_fp32 = (S + T) * 64 * K * 4  # one (rows, K) tensor of the unfused path at B = 64
    grow = fused_footprint_bytes(S, T, 128, K, D, dtype_bytes=2) - fused_footprint_bytes(S, T, 64, K, D, dtype_bytes=2)
    assert 0 < grow < 0.05 * logits_fp32


def test_step_section_times_the_unfused_and_the_fused_head(tmp_path):
    assert main(["bench", "--quick", "--only", "step", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["step"]
    timed = {(r["config"], r["head"]): r for r in rows if "step_s" in r}
    assert set(timed) == {("tiny", "unfused"), ("tiny", "fused")}
    for r in timed.values():
        assert r["step_s"] > 0 and r["peak_bytes"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        # the presets' workload: views stratified over the loader's sensor mix, some fused (Case N)
        assert len(r["views"]) == 2 + 4 and r["fused_views"] >= 1 and {"s1", "s2_l2a"} <= set(r["views"])
    # the same seeded weights and batch: the fused op (torch reference here) gives the unfused loss
    assert abs(timed["tiny", "fused"]["loss"] - timed["tiny", "unfused"]["loss"]) < 1e-4
    skipped = {(r["config"], r["head"]) for r in rows if r.get("skipped") == "needs GPU"}
    assert skipped == {(c, h) for c in ("ViT-S", "ViT-B", "ViT-L") for h in ("unfused", "fused")}
    assert "| tiny | terrafm_tiny | fused |" in (tmp_path / "bench.md").read_text()


def test_an_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    """--out '' was the current folder: the results landed wherever the command was run."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--only", "comm", "--out", ""]) == 2
    assert capsys.readouterr().err.startswith("terrafm bench: --out is empty; give the results folder")
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_is_not_a_folder_says_so_before_any_section(tmp_path, capsys):
    """--data-dir FILE said "shard directory FILE does not exist", and only once the sections before data had run."""
    shard_file = tmp_path / "shards.tar"
    shard_file.write_text("x")
    for data_dir, problem in ((str(shard_file), "is a file, not a folder"), ("", "is empty"),
                              (str(tmp_path / "nope"), "does not exist")):
        args = ["bench", "--only", "kernels,data", "--data-dir", data_dir, "--out", str(tmp_path / "r")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"terrafm bench: --data-dir {data_dir}{' ' if data_dir else ''}{problem}; "), err
        assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_data_dir_that_is_not_a_shard_set_is_refused_before_any_section(tmp_path, capsys):
    """A folder of GeoTIFFs (no index.json) or a torn index failed only once the sections before data had run,
    with nothing written: minutes of measurements lost."""
    tiffs = tmp_path / "tiffs"
    tiffs.mkdir()
    (tiffs / "B04.tif").write_bytes(b"II*\x00" + bytes(64))
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "index.json").write_text('{"format": ')
    for data_dir, problem in ((tiffs, "index.json not found"), (torn, "index.json is not valid JSON")):
        out = tmp_path / f"r-{data_dir.name}"
        assert main(["bench", "--only", "comm,data", "--data-dir", str(data_dir), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"terrafm bench: --data-dir: {data_dir / 'index.json'}"), captured.err
        assert problem in captured.err and len(captured.err.splitlines()) == 1
        assert "[comm]" not in captured.out and not out.exists()


def test_a_data_dir_smaller_than_a_batch_is_refused_before_any_section(tmp_path, capsys):
    """4 locations against the quick batch of 8 failed only when the data section ran, after the sections before it,
    with advice naming data.batch_size, which bench has no option for."""
    from terrafm.data.prepare import convert
    from terrafm.data.sample import write_sample_parquet

    write_sample_parquet(tmp_path / "parquet", seed=0, cells=1, tile_size=60)
    convert([tmp_path / "parquet"], tmp_path / "shards", tile_size=60, workers=0, progress=False)
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--only", "comm,data", "--data-dir", str(tmp_path / "shards"),
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "holds 4 locations, fewer than the data section's batch of 8 (--quick); give more data" in captured.err
    assert "[comm]" not in captured.out and not out.exists()


def test_a_full_disk_keeps_the_previous_results_whole(tmp_path, full_disk, capsys):
    """bench.json and bench.md were written in place: a disk that filled mid-write left the last run's results torn."""
    out = tmp_path / "r"
    assert main(["bench", "--only", "comm", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk(out)
    assert main(["bench", "--only", "comm", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_compile_report_past_its_time_is_a_skipped_section():
    """subprocess.TimeoutExpired escaped the compile section: a traceback, and the sections before it never written."""
    from terrafm_bench import compile as compile_section

    out = compile_section.run(True, lambda _: None, timeout_s=0.01)
    assert out == {"skipped": "compile_report did not finish within 0.01 s"}


def test_a_data_section_failing_mid_run_keeps_the_finished_sections(tmp_path, monkeypatch, capsys):
    """A shard set that changed under the run (a .bin shortened after the index was checked) exited 2 without
    writing anything: the sections before data were lost."""
    from terrafm.data.shards import ShardError
    from terrafm_bench import data

    def shortened(*args, **kwargs):
        raise ShardError("part-00000.bin has 1000 bytes, its chunks need 3624192")

    monkeypatch.setattr(data, "run", shortened)
    out = tmp_path / "r"
    assert main(["bench", "--only", "roofline,data,comm", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "terrafm bench: part-00000.bin has 1000 bytes, its chunks need 3624192\n"
    result = json.loads((out / "bench.json").read_text())
    assert list(result["sections"]) == ["roofline"] and result["sections"]["roofline"]
    assert result["skipped_sections"] == {"data": "failed: part-00000.bin has 1000 bytes, its chunks need 3624192"}
    assert "**data**: skipped, failed: part-00000.bin" in (out / "bench.md").read_text()


def test_a_section_that_fails_otherwise_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    """CPU out of memory in memory, or triton missing (not required off Linux) under kernels / roofline, ended the
    run with a traceback and an empty --out: every finished section was lost."""
    from terrafm_bench import roofline

    def no_triton(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'triton'")

    monkeypatch.setattr(roofline, "run", no_triton)
    out = tmp_path / "r"
    assert main(["bench", "--only", "comm,roofline,compile", "--ops", "teacher_softmax", "--out", str(out)]) == 1
    assert "[roofline] failed (ModuleNotFoundError: No module named 'triton')" in capsys.readouterr().err
    result = json.loads((out / "bench.json").read_text())
    assert list(result["sections"]) == ["comm", "compile"]
    assert result["skipped_sections"] == {"roofline": "failed: ModuleNotFoundError: No module named 'triton'"}


def test_kernels_named_twice_in_ops_run_once(tmp_path, monkeypatch):
    from terrafm_bench import kernels

    ran = []
    monkeypatch.setattr(kernels, "run_op", lambda op, *args: ran.append(op) or [])
    assert main(["bench", "--only", "kernels", "--ops", "fusion,fusion", "--out", str(tmp_path / "r")]) == 0
    assert ran == ["fusion"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_writes_the_finished_sections(tmp_path, signum):
    """A run killed by its job's time limit (SIGTERM) or Ctrl-C lost every section it had finished."""
    out = tmp_path / "r"
    code = ("import os, sys\n"
            "from terrafm_bench import comm\n"
            f"comm.run = lambda args, log: os.kill(os.getpid(), {int(signum)})\n"
            "from terrafm.cli import main\n"
            f"sys.exit(main(['bench', '--only', 'roofline,comm,memory', '--out', {str(out)!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + signum, (run.returncode, run.stderr[-2000:])
    name = signal.Signals(signum).name
    assert run.stderr == (f"terrafm bench: interrupted ({name}) in [comm]; writing the sections finished before "
                          "it\n")
    result = json.loads((out / "bench.json").read_text())
    assert list(result["sections"]) == ["roofline"]
    assert result["skipped_sections"] == {"comm": f"interrupted ({name})"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_waits_for_the_results(tmp_path, signum):
    """SIGTERM between the last section and the end of the writing (matplotlib's import alone takes a second or
    two) killed the run with nothing written; Ctrl-C there was a traceback and no bench.json."""
    out = tmp_path / "r"
    code = ("import os, signal, sys\n"
            "from terrafm_bench import report\n"
            "write = report.write\n"
            "def killed_then_write(result, out_dir):\n"
            f"    os.kill(os.getpid(), {int(signum)})\n"
            "    return write(result, out_dir)\n"
            "report.write = killed_then_write\n"
            "from terrafm.cli import main\n"
            f"sys.exit(main(['bench', '--only', 'comm', '--out', {str(out)!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + signum, (run.returncode, run.stderr[-2000:])
    assert run.stderr == (f"terrafm bench: interrupted ({signal.Signals(signum).name}) while writing the results; "
                          "they were written whole\n")
    assert json.loads((out / "bench.json").read_text())["sections"]["comm"]["rows"]


def test_ctrl_c_before_any_section_is_one_line_and_130(tmp_path):
    """Ctrl-C in the imports or the run's metadata (git, versions: seconds) was a traceback."""
    out = tmp_path / "r"
    code = ("import os, signal, sys\n"
            "from terrafm_bench import common\n"
            "common.metadata = lambda: os.kill(os.getpid(), signal.SIGINT)\n"
            "from terrafm.cli import main\n"
            f"sys.exit(main(['bench', '--only', 'comm', '--out', {str(out)!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 130, (run.returncode, run.stderr[-2000:])
    assert run.stderr == "terrafm bench: interrupted (SIGINT) before any section ran; nothing was written\n"
    assert not out.exists()


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_section(capsys):
    """An existing folder where no file can be made was found out only when the results were written, after every
    section had run (minutes to hours of a GPU node)."""
    assert main(["bench", "--only", "roofline,comm", "--out", "/proc"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "terrafm bench: cannot write in --out /proc: No such file or directory\n"
    assert "[roofline]" not in captured.out


def test_roofline_divides_by_the_kernel_times_whatever_the_order_of_only(tmp_path, monkeypatch):
    """`--only roofline,kernels` ran roofline first: a GPU run got no measured fraction of the roofline (and a
    section named twice ran twice)."""
    from terrafm_bench import kernels, roofline

    shape = kernels.shape_label(kernels.load("teacher_softmax").shapes(True)[0])
    row = {"op": "teacher_softmax", "shape": shape, "dtype": "bfloat16", "pass": "fwd", "provider": "kernel", "ms": 1.0}
    monkeypatch.setattr(kernels, "run_op", lambda op, device, quick, log: [row])
    monkeypatch.setattr(roofline, "device_gpu_name", lambda: "H100 SXM")
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--only", "comm,roofline,kernels,comm", "--ops", "teacher_softmax", "--out",
                 str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert list(result["sections"]) == ["comm", "kernels", "roofline"]
    timed = next(r for r in result["sections"]["roofline"] if r["op"] == "teacher_softmax" and r["shape"] == shape)
    assert timed["fraction_of_roofline"] == pytest.approx(timed["floor_us_H100"] / 1e3)


def test_a_step_config_out_of_memory_is_a_row_not_the_end_of_the_run(monkeypatch):
    """torch.OutOfMemoryError at one config (ViT-L on a smaller GPU) ended the bench with a traceback."""
    from terrafm_bench import step

    timed = []

    def measure(name, head, device, steps):
        if head == "fused":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore detail")
        timed.append((name, head))
        return {"config": name, "head": head, "img_per_s": 1.0, "step_s": 1.0, "mfu": None}

    monkeypatch.setattr(step, "_measure", measure)
    rows = step.run("cpu", True, lambda _: None)
    assert timed == [("tiny", "unfused")]
    fused = next(r for r in rows if r["config"] == "tiny" and r["head"] == "fused")
    assert fused["skipped"] == "out of memory: CUDA out of memory. Tried to allocate 8.00 GiB"
    assert len(rows) == 8


def test_a_stdout_that_fails_mid_run_loses_no_results(tmp_path, monkeypatch, capsys):
    """`terrafm bench | head -1`: the second progress line raised BrokenPipeError out of the run, results unwritten."""
    import sys

    from terrafm_bench import cli

    class ClosedPipe:
        def __init__(self):
            self.lines = 0

        def write(self, text):
            self.lines += text.count("\n")
            if self.lines > 1:
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(cli, "_devnull_stdout", None)
    assert main(["bench", "--only", "comm", "--out", str(tmp_path / "r")]) == 0
    assert "stdout failed (Broken pipe); the run goes on" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "bench.json").read_text())["sections"]["comm"]


def test_an_installed_copy_inside_another_repository_reports_no_revision(tmp_path, monkeypatch):
    """git_revision ran `git rev-parse HEAD` in site-packages' parent: a venv inside another project's repository
    put that project's commit into bench.json as terrafm's."""
    import terrafm_bench.common as common

    other = tmp_path / "their_project"
    site = other / "venv" / "site-packages" / "terrafm_bench"
    site.mkdir(parents=True)
    git = ["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "theirs"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(common, "__file__", str(site / "common.py"))
    assert theirs not in common.git_revision()
    assert common.git_revision() == "unknown (not a git checkout)"
