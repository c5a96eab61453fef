"""AOT-compile every shipped kernel configuration for A100 (sm_80) and H100 (sm_90), no GPU needed.

    python -m terrafm_kernels.compile_report [--arch sm_80 sm_90] [--modules ...] [--json OUT] [--strict]

Each kernel module exposes compile_specs(): the (kernel, signature, constexprs, num_warps,
num_stages) it launches on a GPU. For each spec and architecture this compiles the kernel with
triton.compile(ASTSource, target=GPUTarget), reads the cubin's resource usage with the cuobjdump
that ships in the triton wheel (REG, STACK, LOCAL, SHARED), and checks the instructions:
dot kernels must use wgmma on sm_90 and mma on sm_80 (else the GEMM runs on FMA units, ~15x
slower). Exit status 1 on any register spill (STACK/LOCAL > 0), more shared memory than a block may
use, a dot kernel without tensor-core instructions, a failed compile, or (with --strict) a kernel
module that is missing.
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

MODULES = ["patch_embed", "fusion", "teacher_softmax", "dino_cross_entropy", "dino_head_loss", "dino_teacher",
           "dino_student_ce"]
ARCHS = {"sm_80": 80, "sm_90": 90}
# Largest dynamic shared memory one block may use: A100 163 KB, H100 227 KB (CUDA occupancy tables).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
PACKAGE = __name__.rpartition(".")[0] or "terrafm_kernels"


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}: the triton wheel for Linux x86_64 ships it")
    return path


def compile_one(spec: dict, capability: int) -> dict:
    """Compile one spec for sm_<capability>; return its resource usage and tensor-core check."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"name": spec["name"], "arch": f"sm_{capability}", "uses_dot": bool(spec["uses_dot"]),
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    signature = {**spec["signature"], **{name: "constexpr" for name in spec["constexprs"]}}
    try:
        source = triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constexprs=spec["constexprs"])
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as err:  # a compile failure is a finding to report, not a crash of the report
        return {**row, "ok": False, "problem": f"compile failed: {type(err).__name__}: {str(err)[:300]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        return {**row, "ok": False, "problem": f"could not parse cuobjdump output: {usage[:200]}"}
    regs, stack, shared, local = map(int, found.groups())
    ptx = kernel.asm["ptx"]
    instr = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None
    row.update(regs=regs, stack=stack, local=local, shared_static=shared,
               shared_bytes=int(getattr(kernel.metadata, "shared", 0)), tensor_core=instr)
    problems = []
    if stack or local:
        problems.append(f"register spills (STACK {stack}, LOCAL {local})")
    if row["shared_bytes"] > MAX_SHARED_BYTES[capability]:
        problems.append(f"shared memory {row['shared_bytes']} B > {MAX_SHARED_BYTES[capability]} B per block")
    wanted = "wgmma" if capability >= 90 else "mma"
    if row["uses_dot"] and instr != wanted:
        problems.append(f"dot kernel without {wanted} (found {instr})")
    return {**row, "ok": not problems, "problem": "; ".join(problems)}


def collect(modules: list[str], archs: list[str]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for module in modules:
        try:
            specs = importlib.import_module(f"{PACKAGE}.{module}").compile_specs()
        except ModuleNotFoundError as err:
            if err.name and err.name.endswith(module):
                missing.append(module)
                continue
            raise
        for spec in specs:
            for arch in archs:
                rows.append({"module": module, **compile_one(spec, ARCHS[arch])})
                print(_format(rows[-1]), flush=True)
    return rows, missing


def _format(r: dict) -> str:
    if "regs" not in r:
        return f"{r['name']:44s} {r['arch']:6s} FAILED  {r['problem']}"
    return (f"{r['name']:44s} {r['arch']:6s} regs {r['regs']:4d}  stack {r['stack']:3d}  local {r['local']:3d}  "
            f"shared {r['shared_bytes']:7d}  {str(r['tensor_core'] or '-'):6s} {'ok' if r['ok'] else r['problem']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrafm_kernels.compile_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--strict", action="store_true", help="fail when a kernel module is missing")
    args = parser.parse_args(argv)
    if importlib.import_module(f"{PACKAGE}._common").INTERPRET:
        # @triton.jit objects are interpreter functions under TRITON_INTERPRET=1; compile in a clean child.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", f"{PACKAGE}.compile_report", *(argv or sys.argv[1:])],
                              env=env).returncode
    print(f"{'kernel config':44s} {'arch':6s} resources (cuobjdump -res-usage), tensor-core instructions")
    rows, missing = collect(args.modules, args.arch)
    bad = [r for r in rows if not r["ok"]]
    for module in missing:
        print(f"{module}: module missing{' (--strict: failure)' if args.strict else ''}")
    print(f"{len(rows)} configs compiled, {len(bad)} with problems, {len(missing)} modules missing")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "missing": missing}, f, indent=2)
    return 1 if bad or (missing and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
