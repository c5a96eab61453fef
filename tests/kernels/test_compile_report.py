"""The AOT compile report: real sm_80/sm_90 cubins, resource usage from cuobjdump, spill detection.

The full report over every shipped config runs in CI as its own step (scripts/test.sh); here one
module is compiled end to end and the checks are shown to catch a spilling configuration.
Compilation runs in a child process without TRITON_INTERPRET (interpreted @triton.jit functions
cannot be compiled).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)


def test_report_compiles_patch_embed_for_both_archs(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "terrafm_kernels.compile_report", "--modules", "patch_embed",
                          "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # written beside, then renamed: no temporary left
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    fields = {"useful_flops", "executed_flops", "min_bytes", "moved_bytes", "tma", "occupancy", "flops_ratio",
              "bytes_ratio"}
    for r in rows:
        assert r["regs"] > 0 and r["stack"] == 0 and r["local"] == 0, r
        assert r["tensor_core"] == ("wgmma" if r["arch"] == "sm_90" else "mma"), r
        assert fields <= set(r) and r["occupancy"] >= 1, r
        assert r["predicted_us_" + ("h100" if r["arch"] == "sm_90" else "a100")] > 0, r
    bf16 = {(r["name"], r["arch"]): r for r in rows if r["name"].endswith("bfloat16")}
    # the presets' dtype: the forward gathers each patch once and reads W from L2 (E blocks fastest)
    assert bf16["patch_embed_fwd_bfloat16", "sm_90"]["bytes_ratio"] < 1.1
    assert bf16["patch_embed_grad_input_bfloat16", "sm_90"]["bytes_ratio"] < 1.5
    # grad_weight: a wave covers whole rows of the (E, KD) output, so G crosses HBM about twice, x once
    for arch in ("sm_80", "sm_90"):
        assert bf16["patch_embed_grad_weight_bfloat16", arch]["bytes_ratio"] < 1.5
    # W and G come by tensor descriptor: TMA on sm_90, pointer loads (triton's rewrite) on sm_80
    assert all(r["tma"] == (r["arch"] == "sm_90") for r in rows), [(r["name"], r["arch"], r["tma"]) for r in rows]


def test_processes_compile_the_same_rows_in_the_same_order(tmp_path):
    """--jobs N spreads the configs over N processes (the whole report: 100 s on one core, 60 s on two here)."""
    reports = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}.json"
        run = subprocess.run([sys.executable, "-m", "terrafm_kernels.compile_report", "--modules", "teacher_softmax",
                              "--jobs", jobs, "--json", str(out)], capture_output=True, text=True, env=ENV,
                             timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        reports.append((run.stdout, json.loads(out.read_text())["rows"]))
    (text_1, rows_1), (text_2, rows_2) = reports
    assert rows_2 == rows_1 and text_2 == text_1 and len(rows_1) > 2
    assert [r["arch"] for r in rows_1] == ["sm_80", "sm_90"] * (len(rows_1) // 2)  # each spec's archs together


def test_a_spilling_config_is_reported_as_a_problem():
    code = """
import json
from terrafm_kernels import compile_report, patch_embed
spec = [s for s in patch_embed.compile_specs() if s["name"] == "patch_embed_grad_input_float32"][0]
spec = {**spec, "constexprs": {**spec["constexprs"], "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128},
        "num_warps": 4}
print(json.dumps(compile_report.compile_one(spec, 90)))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.splitlines()[-1])
    assert not row["ok"] and ("spills" in row["problem"] or "shared memory" in row["problem"]), row


def test_tensor_core_instructions_in_a_kernel_without_dot_are_a_problem():
    """The fusion head kernel's sums over 16 positions a step compile to mma.sync: tf32 for fp32 data, a precision
    the interpreter tests cannot see (it steps 8)."""
    code = """
import json
from terrafm_kernels import compile_report, fusion
spec = [s for s in fusion.compile_specs() if s["name"] == "fusion_bwd_head_float32_b"][0]
spec = {**spec, "constexprs": {**spec["constexprs"], "BLOCK_P_HEAD": 16}}
print(json.dumps(compile_report.compile_one(spec, 80)))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.splitlines()[-1])
    assert not row["ok"] and "mma in a kernel without tl.dot" in row["problem"], row


def test_missing_module_fails_only_with_strict():
    """A kernel module of the list whose file is absent (a partial copy of the folder): reported, a failure
    only with --strict."""
    code = ("from terrafm_kernels import compile_report as c; import sys; c.MODULES.append('no_such_kernel'); "
            "sys.exit(c.main(['--modules', 'no_such_kernel'{}]))")
    assert _run(code.format("")).returncode == 0
    assert _run(code.format(", '--strict'")).returncode == 1


def test_bounds_fail_unless_listed_and_listed_entries_must_still_be_over(monkeypatch):
    from terrafm_kernels import compile_report as c

    monkeypatch.setitem(c.KNOWN_OVER_BOUND, r"some_gemm_float32@sm_80", "an entry for one arch")
    def run(name: str, executed: int, capability: int = 90) -> list[str]:
        counts = {"useful_flops": 100, "executed_flops": executed, "min_bytes": 10, "moved_bytes": 10,
                  "flop_kind": "fp32"}
        row = {"name": name, "regs": 64, "shared_bytes": 0, "shared_static": 0, "num_warps": 4}
        return c.efficiency(row, {"efficiency": lambda **_: counts}, capability)

    assert run("some_kernel_bf16", 140) == []  # 1.4x: within the 1.5x bound
    assert "over bound: flops 1.60x" in run("some_kernel_bf16", 160)[0]  # not listed: a failure
    assert run("head_softmax_project_student_bf16", 190) == []  # the fused head's bound is 2.0x
    monkeypatch.setitem(c.KNOWN_OVER_BOUND, r"some_kernel_fp32@", "an entry for every arch")
    assert run("some_kernel_fp32", 4000) == []  # listed in KNOWN_OVER_BOUND: reported, not failed
    assert "remove the entry" in run("some_kernel_fp32", 100)[0]  # the list only shrinks
    # an entry may name one arch
    assert run("some_gemm_float32", 180, 80) == []
    assert "over bound: flops 1.80x" in run("some_gemm_float32", 180, 90)[0]
    assert "remove the entry" in run("some_gemm_float32", 100, 80)[0]


def test_stale_entries_fail_only_under_the_triton_the_lists_were_measured_with(monkeypatch):
    """Under the GPU image's triton 3.6 two fusion configs use fewer registers and are no longer latency bound:
    the strict report exited 1 there for an entry that is right under the pinned 3.7.1."""
    import triton

    from terrafm_kernels import compile_report as c

    assert f"triton=={c.LISTS_TRITON}" in (ROOT / "scripts" / "setup.sh").read_text()
    counts = {"useful_flops": 100, "executed_flops": 100, "min_bytes": 10, "moved_bytes": 10, "flop_kind": "fp32"}
    monkeypatch.setitem(c.KNOWN_OVER_BOUND, r"some_kernel_float32@", "over bound under the pinned triton")
    for version, failed in ((c.LISTS_TRITON, True), ("3.6.0", False)):
        monkeypatch.setattr(triton, "__version__", version)
        row = {"name": "some_kernel_float32", "regs": 64, "shared_bytes": 0, "shared_static": 0,
               "num_warps": 4}
        problems = c.efficiency(row, {"efficiency": lambda **_: counts}, 90)
        assert bool(problems) == failed and ("stale_entry" in row) != failed, (version, problems, row)


def test_occupancy_counts_registers_shared_memory_and_warps():
    from terrafm_kernels import compile_report as c

    h100 = c.GPUS[90]
    assert c.occupancy(255, 0, 8, h100) == 1  # 8 warps x 256 registers x 32 threads = the whole file
    assert c.occupancy(128, 0, 4, h100) == 4
    assert c.occupancy(32, 100_000, 4, h100) == 2  # shared memory binds
    assert c.occupancy(16, 0, 4, h100) == 16  # 64 warps per SM bind


def test_every_spec_compiles_the_variant_the_jit_builds_at_production_shapes():
    """The JIT specializes 16-byte-aligned pointers and multiples of 16; the report must compile that variant
    (the unspecialized one of patch_embed took 199-255 registers on sm_80 where the real one takes 80-127)."""
    code = """
import importlib, json
from terrafm_kernels.compile_report import MODULES
out = {}
for name in MODULES:
    for spec in importlib.import_module("terrafm_kernels." + name).compile_specs():
        pointers = [a for a, kind in spec["signature"].items() if kind.startswith("*")]
        out[spec["name"]] = [pointers, list(spec.get("divisible_by_16", ())), list(spec["signature"])]
print(json.dumps(out))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-2000:]
    specs = json.loads(run.stdout)
    for name, (pointers, divisible, signature) in specs.items():
        assert set(pointers) <= set(divisible) <= set(signature), name
    assert {"M", "E", "KD"} <= set(specs["patch_embed_fwd_bfloat16"][1])
    assert "N" not in specs["patch_embed_fwd_bfloat16"][1]  # 196 patches per image: not a multiple of 16
    assert {"R", "K"} <= set(specs["teacher_softmax_bfloat16"][1])


def test_streaming_kernels_need_enough_loads_in_flight():
    """Little's law: an SM streams at full bandwidth only with bandwidth x latency / SMs bytes of loads in
    flight; the 1 KB steps of the old (1, 512) softmax tiles at 128 rows (one program per SM) were latency bound."""
    from terrafm_kernels import compile_report as c

    def run(name: str, step_bytes: int, programs: int = 128, regs: int = 64) -> tuple[list[str], dict]:
        counts = {"useful_flops": 100, "executed_flops": 100, "min_bytes": 10 << 20, "moved_bytes": 10 << 20,
                  "flop_kind": "fp32", "programs": programs, "step_bytes": step_bytes}
        row = {"name": name, "arch": "sm_90", "regs": regs, "shared_bytes": 0, "shared_static": 0, "num_warps": 4}
        return c.efficiency(row, {"efficiency": lambda **_: counts}, 90), row

    needed = c.GPUS[90]["hbm"] * c.GPUS[90]["latency"] / c.GPUS[90]["sms"]
    problems, slow = run("some_softmax_bf16", 1024)
    assert "latency bound" in problems[0] and slow["in_flight_kb"] == 1.0
    assert run("some_softmax_bf16", 16384) == ([], run("some_softmax_bf16", 16384)[1])
    # more resident programs add up: 4 per SM x 4 KB, as many as the grid and the occupancy allow
    assert run("some_softmax_bf16", 4096, programs=4 * 132)[0] == [] and 4 * 4096 > needed
    assert "latency bound" in run("some_softmax_bf16", 4096, programs=4 * 132, regs=255)[0][0]  # 1 CTA per SM
    # the predicted time follows the bandwidth the loads in flight allow
    fast = run("some_softmax_bf16", 65536)[1]
    assert slow["predicted_us_h100"] > 10 * fast["predicted_us_h100"]
    # listed configs are reported, not failed, and must still be latency bound
    assert run("fusion_bwd_head_bfloat16_b", 768)[0] == []
    assert "remove the entry" in run("fusion_bwd_head_bfloat16_b", 65536)[0][0]


def test_load_runs_are_read_from_the_sass_up_to_the_first_use():
    """The bytes a thread has in flight: LDGs until an instruction reads one of their destinations."""
    from terrafm_kernels.compile_report import load_run_bytes

    sass = """
        /*0100*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0110*/                   LDG.E.128 R8, desc[UR6][R2.64+0x10] ;
        /*0120*/                   IMAD.WIDE R12, R0, 0x4, R14 ;
        /*0130*/                   LDG.E R16, desc[UR6][R12.64] ;
        /*0140*/                   FADD R20, R5, R9 ;
        /*0150*/                   LDG.E.64 R22, desc[UR6][R2.64+0x20] ;
        /*0160*/               @P0 FMUL R24, R22, R23 ;
    """
    assert load_run_bytes(sass) == 16 + 16 + 4  # the FADD reads R5 (of the first 128-bit load): the run ends
    assert load_run_bytes("        /*0000*/                   EXIT ;") == 0


@pytest.mark.parametrize("args, message", [
    (["--modules", "swap"], "terrafm_kernels.swap has no kernels"),  # was an AttributeError traceback
    (["--modules", "a.b"], "is not a module name"),  # a ModuleNotFoundError traceback
    (["--modules", ""], "is not a module name"),  # printed ': module missing', exit 0
    (["--modules", "fusoin"], "terrafm_kernels.fusoin does not exist; kernel modules: "),  # the same, for a typo
    (["--json", "."], "cannot write a file there (it is a folder)"),  # a traceback after every compile
    (["--jobs", "0"], "--jobs 0: give 1 or more processes"),
])
def test_bad_arguments_exit_2_before_anything_compiles(args, message, capsys):
    from terrafm_kernels import compile_report as c

    with pytest.raises(SystemExit) as exit_info:
        c.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_no_cuobjdump_is_one_line_and_exit_2(monkeypatch, capsys):
    from terrafm_kernels import compile_report as c

    def missing():
        raise FileNotFoundError("cuobjdump not found at /x: the triton wheel for Linux x86_64 ships it")

    monkeypatch.setattr(c, "cuobjdump", missing)
    assert c.main(["--modules", "fusion"]) == 2
    assert capsys.readouterr().err.strip() == "compile_report: cuobjdump not found at /x: the triton wheel for " \
                                              "Linux x86_64 ships it"


def test_each_gpus_rows_are_costed_at_its_own_presets_samples_per_gpu():
    """The sm_80 rows were costed at the H100 presets' batch: every predicted A100 time was for twice the work the
    A100 presets' calls do. PRESET_SAMPLES must follow the presets' data.batch_size."""
    from terrafm.config import load_config
    from terrafm_kernels._common import PRESET_SAMPLES
    from terrafm_kernels.patch_embed import compile_specs

    for capability, gpu in ((90, "h100"), (80, "a100")):
        for size, model in (("base", "vitb"), ("large", "vitl")):
            assert PRESET_SAMPLES[capability][size] == load_config(f"{model}_{gpu}").data.batch_size
    spec = next(s for s in compile_specs() if s["name"] == "patch_embed_fwd_bfloat16")
    flops = {c: spec["efficiency"](sms=132, concurrent=264, l2_bytes=50 << 20, capability=c)["useful_flops"]
             for c in (90, 80)}
    assert flops[90] == 2 * flops[80] == 2 * 2 * 32 * 196 * (12 * 256) * 2304
