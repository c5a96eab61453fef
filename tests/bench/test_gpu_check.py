"""scripts/gpu_check.sh: the --cpu run ends with every stage ok and a complete report; failures, timeouts
and unselected stages are reported as such; bad arguments exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from terrafm_bench.gpu_check import STAGES, TRITON_OPS
from terrafm_bench.gpu_check_kernels import CASES, DTYPES
from terrafm_bench.gpu_check_report import collect
from terrafm_bench.gpu_check_train import top_kernels

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for --cpu and clears it for a GPU run
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow  # ~3.5 min on the loaded 2-core dev machine (the script's --cpu budget is 420 s)
def test_cpu_mode_runs_every_stage_ok_and_writes_a_complete_report(tmp_path):
    out = tmp_path / "out"
    proc = _run("--cpu", "--work", str(tmp_path / "work"), str(out), timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_report.json").read_text())
    stages = report["stages"]
    assert list(stages) == list(STAGES) and report["mode"] == "cpu" and report["all_ok"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 and not s["failures"] for s in stages.values()), {
        n: s.get("failures") for n, s in stages.items()}
    assert report["total_seconds"] < 440

    env = stages["env"]
    assert env["torch"] == torch.__version__ and env["triton"] and set(TRITON_OPS) <= set(env["ops"])
    assert stages["build"]["csrc"] is True and stages["build"]["pip_exit_code"] == 0

    rows = stages["kernel_correctness"]["rows"]
    assert {(r["op"], r["dtype"]) for r in rows} == {(op, d) for op in CASES for d in DTYPES}
    for r in rows:
        if "skipped" in r:  # only bf16 of the tl.dot kernels, which the interpreter computes wrongly
            assert r["dtype"] == "bfloat16" and CASES[r["op"]].uses_dot, r
        else:
            assert r["ok"] and all(c["err"] <= 2 * c["plain_err"] + c["atol"] for c in r["checks"]), r
            assert {c["what"] for c in r["checks"]} >= set(CASES[r["op"]].outputs)
    # fp32 patch_embed's plain emulates nn.Conv2d's tf32 GEMMs; the report sets torch's own conv beside it (IEEE
    # on a CPU: far more exact than the emulation; on a GPU, cuDNN's tf32: near 1)
    native = [r["native_vs_plain"] for r in rows if "native_vs_plain" in r]
    assert [r["dtype"] for r in rows if "native_vs_plain" in r] == ["float32"] * len(native) and native
    assert all(0 <= ratios["out"] < 0.1 and 0 <= ratios["grad weight"] < 0.1 for ratios in native), native

    # Sinkhorn-Knopp at iBOT's masked patch rows as well (toy: 40), checked and timed
    assert {r["shape"] for r in rows if r["op"] == "sinkhorn_knopp"} == {"R=4 K=300", "R=40 K=300"}
    timed = stages["kernel_timing"]["rows"]
    sinkhorn = {r["shape"] for r in timed if r["op"] == "sinkhorn_knopp" and r.get("ms", 0) > 0}
    assert sinkhorn == {"R=4 K=300", "R=40 K=300"}
    for op in CASES:
        providers = {r["provider"]: r for r in timed if r["op"] == op}
        assert {"kernel", "eager", "compile"} <= {p for p, r in providers.items() if r["ms"] > 0}, op
        assert providers["kernel"]["pct_of_roofline"] > 0 and providers["kernel"]["speedup_vs_eager"] > 0
        assert 0 < providers["kernel"]["host_ms"] <= providers["kernel"]["ms"]
        assert providers["kernel"]["gpu_ms"] is None  # a CPU trace has no GPU kernels
    head = {r["provider"]: r for r in timed if r["op"] == "dino_head_loss"}
    assert head["kernel"]["peak_bytes"] > 0 and head["eager"]["peak_bytes"] > 0
    assert {r["provider"] for r in timed if r["op"] == "attention"} >= {"eager", "compile", "sdpa", "flash_attn"}

    runs = {r["head"]: r for r in stages["train_step"]["runs"]}
    assert set(runs) == {"unfused", "fused"}
    for r in runs.values():
        assert r["img_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["steps"] == 4
        assert len(r["top_kernels"]["rows"]) == 15 and r["top_kernels"]["steps"] == 1  # profile_steps (1, 2)
    assert "traced over 1 step(s):" in (out / "gpu_report.md").read_text()
    assert "torch module / plain error" in (out / "gpu_report.md").read_text()
    # same seed, same first batch: the fused head computes the unfused head's loss
    assert runs["fused"]["loss_first"] == pytest.approx(runs["unfused"]["loss_first"], rel=1e-4)
    bench = stages["train_step"]["bench_step"]
    if "rows" in bench:
        assert [r["img_per_s"] > 0 for r in bench["rows"] if r["config"] == "tiny"] == [True, True]
    else:
        assert "time was spent" in bench["skipped"] or "left in the stage" in bench["skipped"]
    data = {r["path"]: r for r in stages["data"]["rows"]}
    assert data["numpy"]["tiles_per_s"] > 0 and data["cpp"]["tiles_per_s"] > 0

    markdown = (out / "gpu_report.md").read_text()
    for heading in ("| stage | status |", "## Kernel correctness", "## Kernel timing", "## Training step",
                    "## Data loader"):
        assert heading in markdown
    assert stages["summary"]["markdown"] in markdown
    assert "== summary: ok" in (out / "gpu_check.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the GPU run does on a machine without a GPU")
def test_gpu_mode_without_a_gpu_fails_its_stages_and_still_reports(tmp_path):
    out = tmp_path / "out"
    proc = _run("--stages", "env,kernel_correctness,summary", str(out), timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:]
    stages = json.loads((out / "gpu_report.json").read_text())["stages"]
    assert stages["env"]["status"] == "failed" and "--cpu" in stages["env"]["failures"][-1]
    assert stages["env"]["ops"]  # what was measured before the failure is kept
    assert stages["kernel_correctness"]["status"] == "failed"
    assert stages["summary"]["status"] == "ok"  # a failed stage does not stop the later ones
    assert {n for n, s in stages.items() if s["status"] == "skipped"} == {"build", "kernel_timing", "train_step",
                                                                          "data"}
    assert "## Failures" in (out / "gpu_report.md").read_text()


@pytest.mark.parametrize("args", [(), ("--stages", "env,nope", "out"), ("--frobnicate", "out"), ("a", "b")])
def test_bad_arguments_exit_2(args, tmp_path):
    proc = _run(*args, timeout=30)
    assert proc.returncode == 2 and ("usage:" in proc.stderr or "unknown" in proc.stderr), proc.stderr


def test_report_marks_timeouts_crashes_and_stages_not_run(tmp_path):
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "env.json").write_text(json.dumps({"status": "ok", "failures": [], "gpu": "X"}))
    (stages / "env.exit").write_text("0 3 60\n")
    (stages / "build.json").write_text(json.dumps({"status": "running", "failures": [], "pip_seconds": 1}))
    (stages / "build.exit").write_text("124 150 150\n")
    (stages / "kernel_correctness.exit").write_text("1 2 120\n")  # crashed before writing anything
    result = collect(tmp_path, list(STAGES[:-1]))
    assert result["env"] == {"status": "ok", "failures": [], "gpu": "X", "seconds": 3.0, "limit_s": 60,
                             "exit_code": 0}
    assert result["build"]["status"] == "failed" and result["build"]["failures"] == ["timed out after 150 s"]
    assert result["build"]["pip_seconds"] == 1  # figures measured before the timeout are kept
    assert result["kernel_correctness"]["failures"] == ["exited with code 1 before writing its result"]
    assert result["kernel_timing"]["status"] == "skipped" and "budget" in result["kernel_timing"]["reason"]
    assert result["summary"]["status"] == "skipped" and "not selected" in result["summary"]["reason"]


def test_top_kernels_prefers_gpu_kernels_and_sums_by_name(tmp_path):
    events = [{"cat": "kernel", "name": "gemm", "dur": 5.0}, {"cat": "kernel", "name": "softmax", "dur": 7.0},
              {"cat": "kernel", "name": "gemm", "dur": 4.0}, {"cat": "cpu_op", "name": "aten::mm", "dur": 100.0},
              {"cat": "kernel", "name": "copy", "dur": 1.0}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    top = top_kernels(trace, n=2, steps=2)
    assert top["what"] == "GPU kernels" and top["total_ms"] == pytest.approx(0.017) and top["steps"] == 2
    assert [(r["name"], r["calls"]) for r in top["rows"]] == [("gemm", 2), ("softmax", 1)]
    assert top["rows"][0]["pct"] == pytest.approx(100 * 9 / 17)
    trace.write_text(json.dumps({"traceEvents": [e for e in events if e["cat"] == "cpu_op"]}))
    assert top_kernels(trace)["rows"][0]["name"] == "aten::mm"


def test_a_timed_call_moves_grad_out_to_the_device_once():
    """The first H200 run timed a 115 MB host-to-device copy of grad_out inside every patch_embed call."""
    from terrafm_bench.gpu_check_kernels import make_call

    class CountedGrad(torch.Tensor):
        moves = 0

        def to(self, *args, **kwargs):
            CountedGrad.moves += 1
            return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)

    case = CASES["patch_embed"]
    g = torch.Generator().manual_seed(0)
    shape = {"B": 1, "C": 2, "H": 8, "W": 8, "E": 4, "p": 4}
    leaves = {k: v.requires_grad_(k in case.grads) for k, v in case.make(shape, g).items()}
    grad_out = case.grad_out(shape, g).as_subclass(CountedGrad)
    call = make_call(case.plain, case, leaves, case.scalars(shape), grad_out)
    first, second = call(), call()
    assert CountedGrad.moves == 1
    torch.testing.assert_close(first["grad weight"], second["grad weight"])


def test_timing_separates_the_hosts_share_from_the_wall_time():
    """host_ms is the issue time, before the sync: a GPU slower than the host shows in ms, not host_ms."""
    import time

    from terrafm_bench.gpu_check import PROFILES
    from terrafm_bench.gpu_check_kernels import time_ms

    profile = PROFILES["cpu"]
    pending = []

    def call():  # a launch: cheap on the host, 10 ms of queued device work
        pending.append(0.01)

    def sync():
        time.sleep(sum(pending))
        pending.clear()

    t = time_ms(call, sync, profile)
    assert t["ms"] >= 9.0 and t["host_ms"] < 0.5 * t["ms"] and t["calls"] >= 1
    host_bound = time_ms(lambda: time.sleep(0.005), lambda: None, profile)
    assert host_bound["host_ms"] >= 4.0 and host_bound["host_ms"] == pytest.approx(host_bound["ms"], rel=0.05)


def test_kernel_ms_per_call_sums_the_traces_kernels(tmp_path):
    from terrafm_bench.gpu_check_kernels import kernel_ms_per_call

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "name": "a", "dur": 30.0}, {"cat": "kernel", "name": "b", "dur": 10.0},
        {"cat": "cpu_op", "name": "aten::add", "dur": 500.0}, {"cat": "kernel", "name": "c"}]}))
    total, top = kernel_ms_per_call(trace, calls=4, top=1)
    assert total == pytest.approx(0.01) and top == [("a", pytest.approx(0.0075))]
    trace.write_text(json.dumps({"traceEvents": [{"cat": "cpu_op", "name": "aten::add", "dur": 500.0}]}))
    assert kernel_ms_per_call(trace, calls=4) == (None, [])


def test_trainer_rates_are_total_work_over_total_time():
    """Two windows of 64 images a step at 0.32 s and 0.66 s a step: 128 images in 0.98 s, not the mean of the
    windows' rates (the H200 report said 145 img/s for 97)."""
    from terrafm_bench.gpu_check_train import steady_rates

    windows = [{"img_per_s": 64 / t, "mfu": 0.1 * 0.32 / t, "step_time_s": t, "data_wait_s": 0.01}
               for t in (0.32, 0.66)]
    rates = steady_rates(windows)
    assert rates["img_per_s"] == pytest.approx(128 / 0.98) and rates["step_time_s"] == pytest.approx(0.49)
    assert rates["mfu"] == pytest.approx(0.1 * 0.64 / 0.98)
    assert steady_rates([{**w, "mfu": None} for w in windows])["mfu"] is None


def test_a_full_disk_keeps_the_previous_report_whole(tmp_path, full_disk):
    """gpu_report.json and .md were written in place: a disk that filled mid-write left a torn report of the run
    instead of the previous one."""
    from terrafm_bench import gpu_check_report

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "stages").mkdir(parents=True)
    assert gpu_check_report.report(work, out, "cpu", ["summary"]) == 1  # summary selected, not run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"gpu_report.json", "gpu_report.md"}
    full_disk(out)
    with pytest.raises(OSError, match="No space left"):
        gpu_check_report.report(work, out, "cpu", ["summary"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
