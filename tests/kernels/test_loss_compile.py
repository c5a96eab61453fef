"""AOT-compile every shipped config of the loss kernels for sm_80 and sm_90 (no GPU needed): no spills,
and tensor-core instructions where a config promises them. Slow (~1 min); kernels.compile_report
covers all kernel families in CI, this is the quick check for the loss kernels alone.

Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest on CPU) @triton.jit functions are
interpreter objects that triton.compile cannot take.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
capability = int(sys.argv[1])
for module in sys.argv[2:]:
    for spec in importlib.import_module(f"terrafm_kernels.{module}").compile_specs():
        signature = {**spec["signature"], **{name: "constexpr" for name in spec["constexprs"]}}
        attrs = {(spec["fn"].arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in spec.get("divisible_by_16", ())}  # as the JIT specializes at the production shape
        source = triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constexprs=spec["constexprs"],
                                           attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        regs, stack, shared, local = map(int, found.groups())
        ptx = kernel.asm["ptx"]
        print(json.dumps({"name": spec["name"], "regs": regs, "stack": stack, "local": local,
                          "uses_dot": spec["uses_dot"], "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx}))
"""
MODULES = ("teacher_softmax", "dino_cross_entropy", "dino_head_loss")


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
def test_shipped_configs_compile_without_spills(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(capability), *MODULES], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    expected = sum(len(importlib.import_module(f"terrafm_kernels.{m}").compile_specs()) for m in MODULES)
    assert len(results) == expected
    for r in results:
        assert r["stack"] == 0 and r["local"] == 0, f"{r['name']} sm_{capability} spills: {r}"
        if r["uses_dot"]:
            tensor_core = r["wgmma" if capability == 90 else "mma"]
            assert tensor_core, f"{r['name']} sm_{capability}: no tensor-core dot"
