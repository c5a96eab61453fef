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

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)


def test_report_compiles_patch_embed_for_both_archs(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "terrafm_kernels.compile_report", "--modules", "patch_embed",
                          "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["regs"] > 0 and r["stack"] == 0 and r["local"] == 0, r
        assert r["tensor_core"] == ("wgmma" if r["arch"] == "sm_90" else "mma"), r


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


def test_missing_module_fails_only_with_strict():
    code = "from terrafm_kernels import compile_report as c; import sys; sys.exit(c.main(['--modules', '{}'{}]))"
    assert _run(code.format("no_such_kernel", "")).returncode == 0
    assert _run(code.format("no_such_kernel", ", '--strict'")).returncode == 1
