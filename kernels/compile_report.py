"""AOT-compile every shipped kernel configuration for A100 (sm_80) and H100 (sm_90), no GPU needed.

    python -m terrafm_kernels.compile_report [--arch sm_80 sm_90] [--modules ...] [--json OUT] [--strict] [--jobs N]

Each kernel module exposes compile_specs(): the (kernel, signature, constexprs, num_warps,
num_stages) it launches on a GPU, and optionally `divisible_by_16`: the arguments the JIT specializes
as multiples of 16 at the production shape (aligned pointers, D = 256, ...), so that the report
compiles the variant that runs there. For each spec and architecture this compiles the kernel with
triton.compile(ASTSource, target=GPUTarget), reads the cubin's resource usage with the cuobjdump
that ships in the triton wheel (REG, STACK, LOCAL, SHARED), and checks the instructions:
dot kernels must use wgmma on sm_90 and mma on sm_80 (else the GEMM runs on FMA units, ~15x
slower). Exit status 1 on any register spill (STACK/LOCAL > 0), more shared memory than a block may
use, a dot kernel without tensor-core instructions, a failed compile, or (with --strict) a kernel
module that is missing.

Efficiency counts: every spec carries `efficiency`, its op file's count at the presets' production
shape on that row's GPU (_common.PRESET_SAMPLES: the A100 presets run half the H100 presets' samples per GPU),
computed from the launcher's own grid and tiles (docs/kernels.md, "Efficiency counts"). Each
row gets useful_flops / executed_flops, min_bytes / moved_bytes (HBM, wave model), occupancy
(CTAs per SM from registers, shared memory and warps), tma (tensor-descriptor copies in the PTX) and
the roofline time on that architecture's GPU (divided by programs / SMs where the counts give a smallest
launch of fewer programs than SMs). A ratio over its bound (BOUND, or HEAD_BOUND for the
fused head) fails the report unless the config is in KNOWN_OVER_BOUND, the documented list of waste
still to close; an entry that is back within bound fails too, so the list only shrinks. Streaming kernels'
counts also give `step_bytes` (the loads one program has in flight per loop step): fewer bytes in flight per SM
than bandwidth x latency / SMs (Little's law) fails likewise unless listed in KNOWN_LATENCY_BOUND, and the
predicted time uses the bandwidth they allow.
"""

import argparse
import functools
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .gpus import BY_CAPABILITY, LOADED_DRAM_LATENCY_NS
from .gpus import GPUS as GPUS_TABLE

MODULES = ["patch_embed", "fusion", "teacher_softmax", "dino_cross_entropy", "dino_head_loss", "dino_teacher",
           "dino_student_ce"]
ARCHS = {"sm_80": 80, "sm_90": 90}
# Largest dynamic shared memory one block may use: A100 163 KiB, H100 227 KiB (CUDA occupancy tables).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


def _costed_on(capability: int) -> dict:
    """The compile report's view of the GPU an architecture is costed on (terrafm_kernels.gpus, in FLOP/s, B/s)."""
    name = BY_CAPABILITY[capability]
    g = GPUS_TABLE[name]
    return {"name": name.split()[0], **{k: g[k] for k in ("sms", "regs", "shared", "ctas", "warps", "l2")},
            "hbm": g["tb_per_s"] * 1e12, "latency": LOADED_DRAM_LATENCY_NS * 1e-9,
            "peak": {"tensor": g["tflops_bf16"] * 1e12, "tf32": g["tflops_tf32"] * 1e12,
                     "fp32": g["tflops_fp32"] * 1e12}}


GPUS = {capability: _costed_on(capability) for capability in BY_CAPABILITY}
BOUND = 1.5  # executed / useful FLOPs and moved / minimum bytes
HEAD_BOUND = 2.0  # dino_head_loss: the fused head recomputes logit tiles by design
# Configs whose ratios are over bound, and why: regular expressions matched at the start of "name@arch", as
# KNOWN_LATENCY_BOUND's. Empty since stop 47 (docs/kernels.md, "Current figures", has what each entry said); an
# entry needs the reason the waste cannot be closed, and fails the strict report once the config is within bound.
KNOWN_OVER_BOUND: dict[str, str] = {}
# Streaming configs with fewer bytes of loads in flight per SM than Little's law asks, and why: regular
# expressions matched at the start of "name@arch" (an entry that matches a config with enough in flight fails).
KNOWN_LATENCY_BOUND = {
    r"fusion_bwd_head_(float16|bfloat16)_.*@sm_90": (
        "the head backward steps 8 positions of one 32-column chunk: 3.5 KiB of 16-bit loads a step at 4 resident "
        "programs (128 registers), 14.0 KiB per SM where Little's law asks 14.9 (ViT-B 12.6: one of its 5 chunks "
        "per head is a 16-column tail); 16 positions compile their sums to tf32 mma.sync, a 64-column chunk pads "
        "ViT-B's 144 columns to 192 (FLOPs over bound)"),
}
KNOWN_LATENCY_BOUND[r"fusion_fwd_(float16|bfloat16)_b@sm_80"] = (
    "three sensors, ViT-B: 193 registers, 2 programs per SM, 16 positions of 32 columns a step; d = 144 is 4 whole "
    "chunks and one of 16 (a masked column loads nothing), so the mean step holds 10.8 KiB where Little's law asks "
    "11.1 on A100. 32 positions of 16 columns hold 12.0 there but take 255 registers and are latency bound on sm_90 "
    "(12.0 of 14.9), where this tile holds 16.2 at 3 programs per SM")
_FUSION_M2_LATENCY = ("two fused sensors: a step loads 2 tokens per position where three load 3, so M = 2 has 2/3 "
                      "of M = 3's bytes in flight (fp32 head backward 12.5 KiB per SM on sm_90, 16-bit head "
                      "backward 10.0 on sm_80, where Little's law asks 14.9 / 11.1); more positions per step double "
                      "the (positions, 16 lanes, columns) tiles' registers")
KNOWN_LATENCY_BOUND.update({r"fusion_bwd_head_float32_\w+_m2@sm_90": _FUSION_M2_LATENCY,
                            r"fusion_bwd_head_(float16|bfloat16)_\w+_m2@sm_80": _FUSION_M2_LATENCY})
KNOWN_LATENCY_BOUND[r"fusion_fwd_(float16|bfloat16)_(b_m2|l_m2)@|fusion_fwd_float32_l_m2@"] = (
    "a launch too small to fill the GPU: at the presets' per-view call (one fused global crop of every sample, T = "
    "samples x 196: 12544 positions on an H100, 6272 on an A100 for ViT-B, half that for ViT-L) the M = 2 forward "
    "(16-bit, and fp32 ViT-L) is 392 programs on an H100 and 196 on an A100, all resident at once, 3 and 2 per SM: "
    "12.0 / 8.0 KiB of loads in flight per SM where Little's law asks 14.9 / 11.1. Two global views that draw the "
    "same sensors share a call (1 in 6 steps) and are not latency bound; a step of twice the bytes pads ViT-B's "
    "144-wide heads (1.60x FLOPs) or doubles registers")
# The triton the two lists above were measured with (scripts/setup.sh's pin). Under another triton (the GPU
# image's 3.6) register counts differ, so an entry no longer needed there is a note, not a failure.
LISTS_TRITON = "3.7.1"
PACKAGE = __package__  # terrafm_kernels, or the name of a project's copy of the folder (also under -m)


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
        # the JIT specializes 16-byte-aligned pointers and ints that are multiples of 16 (vector loads, no
        # per-element addresses): a spec names the arguments that are so at its production shape
        attrs = {(spec["fn"].arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in spec.get("divisible_by_16", ())}
        source = triton.compiler.ASTSource(fn=spec["fn"], signature=signature, constexprs=spec["constexprs"],
                                           attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as err:  # a compile failure is a finding to report, not a crash of the report
        return {**row, "ok": False, "problem": f"compile failed: {type(err).__name__}: {str(err)[:300]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump(), "-res-usage", "-sass", cubin.name], capture_output=True, text=True,
                               check=True).stdout  # the resource line and the disassembly, in one call
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        return {**row, "ok": False, "problem": f"could not parse cuobjdump output: {usage[:200]}"}
    regs, stack, shared, local = map(int, found.groups())
    ptx = kernel.asm["ptx"]
    instr = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None
    row["load_run_kb"] = round(load_run_bytes(usage) * 32 * spec["num_warps"] / 1024, 1)
    row.update(regs=regs, stack=stack, local=local, shared_static=shared,
               shared_bytes=int(getattr(kernel.metadata, "shared", 0)), tensor_core=instr,
               tma="cp.async.bulk.tensor" in ptx)
    problems = efficiency(row, spec, capability)
    if stack or local:
        problems.append(f"register spills (STACK {stack}, LOCAL {local})")
    if row["shared_bytes"] > MAX_SHARED_BYTES[capability]:
        problems.append(f"shared memory {row['shared_bytes']} B > {MAX_SHARED_BYTES[capability]} B per block")
    wanted = "wgmma" if capability >= 90 else "mma"
    if row["uses_dot"] and instr != wanted:
        problems.append(f"dot kernel without {wanted} (found {instr})")
    if not row["uses_dot"] and instr:  # e.g. the fusion head kernel at 16 positions a step
        problems.append(f"{instr} in a kernel without tl.dot: the compiler turned a sum of products into "
                        "tensor-core instructions (tf32 for fp32 data), a precision no interpreter test checks")
    return {**row, "ok": not problems, "problem": "; ".join(problems)}


_ADDRESS = re.compile(r"\[(R\d+)")  # a register used as an address: [R4.64+0x10]
_SASS_LINE = re.compile(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?(\S+)\s*([^;]*);")


def _registers(operand: str, count: int = 1) -> set[str]:
    """The R registers an operand names: R4 with count 4 is R4..R7 (a 128-bit load's destination)."""
    found = re.match(r"R(\d+)", operand.strip())
    return {f"R{int(found.group(1)) + i}" for i in range(count)} if found else set()


def load_run_bytes(sass: str) -> int:
    """Bytes per thread of the largest group of global loads (LDG) the SASS issues before the first instruction
    that reads any of their results: what a thread has in flight at once (Little's law), the evidence for a
    streaming kernel's `step_bytes`. Parsed from the cubin's disassembly (destination and source registers)."""
    best = run = 0
    pending: set[str] = set()
    for line in sass.splitlines():
        found = _SASS_LINE.match(line)
        if not found:
            continue
        op, operands = found.group(1), [o.strip() for o in found.group(2).split(",")]
        reads = set().union(*(_registers(o.strip("-|!")) | set(_ADDRESS.findall(o)) for o in operands[1:]))
        if pending and reads & pending:
            best, run, pending = max(best, run), 0, set()
        if op.startswith("LDG") and operands:
            width = re.search(r"\.(64|128)\b", op)
            size = int(width.group(1)) // 8 if width else 4
            run += size
            pending |= _registers(operands[0], max(1, size // 4))
        elif pending and operands and _registers(operands[0]) & pending:  # overwritten before use: not pending
            pending -= _registers(operands[0])
    return max(best, run)


def occupancy(regs: int, shared_bytes: int, num_warps: int, gpu: dict) -> int:
    """CTAs per SM: registers (allocated per warp in units of 256), shared memory (+1 KB reserved per
    CTA), warps and the CTA limit, whichever binds first."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = gpu["regs"] // (regs_per_warp * num_warps)
    by_shared = gpu["shared"] // (shared_bytes + 1024)
    return max(0, min(gpu["ctas"], gpu["warps"] // num_warps, by_regs, by_shared))


def _stale(row: dict, problems: list[str], message: str) -> None:
    """A KNOWN_* entry the config no longer needs: a problem under LISTS_TRITON (the lists only shrink), a note
    on the row under any other triton."""
    import triton

    if triton.__version__ == LISTS_TRITON:
        problems.append(message)
    else:
        row["stale_entry"] = f"{message} (under triton {triton.__version__}; the lists are for {LISTS_TRITON})"


def efficiency(row: dict, spec: dict, capability: int) -> list[str]:
    """Add occupancy, the spec's efficiency counts and the roofline time to row; return bound problems."""
    gpu = GPUS[capability]
    row["occupancy"] = occupancy(row["regs"], row["shared_bytes"] + row["shared_static"], row["num_warps"], gpu)
    if "efficiency" not in spec:
        return ["no efficiency counts (compile_specs must give each spec an `efficiency`)"]
    counts = spec["efficiency"](sms=gpu["sms"], concurrent=gpu["sms"] * max(row["occupancy"], 1), l2_bytes=gpu["l2"],
                                capability=capability)
    flops_ratio = counts["executed_flops"] / max(counts["useful_flops"], 1)
    bytes_ratio = counts["moved_bytes"] / max(counts["min_bytes"], 1)
    # a launch of fewer programs than SMs leaves SMs idle (counts' optional "programs": the op's smallest launch)
    programs = counts.get("programs", gpu["sms"])
    fill = min(1.0, programs / gpu["sms"])
    bandwidth, problems = gpu["hbm"], []
    if "step_bytes" in counts:  # a streaming kernel: Little's law on the loads its resident programs keep in flight
        resident = min(max(row["occupancy"], 1), -(-programs // gpu["sms"]))
        # a step's loads count only as far as the SASS issues them together (load_run_kb: before the first use)
        step = min(counts["step_bytes"], row.get("load_run_kb", 0) * 1024 or counts["step_bytes"])
        in_flight, needed = step * resident, gpu["hbm"] * gpu["latency"] / gpu["sms"]
        bandwidth = min(bandwidth, in_flight * gpu["sms"] / gpu["latency"])
        row.update(in_flight_kb=round(in_flight / 1024, 1), needed_kb=round(needed / 1024, 1))
        known = next((why for pattern, why in KNOWN_LATENCY_BOUND.items()
                      if re.match(pattern, f"{row['name']}@sm_{capability}")), None)
        if in_flight < needed and known is None:
            problems.append(f"latency bound: {in_flight / 1024:.1f} KiB of loads in flight per SM < "
                            f"{needed / 1024:.1f} KiB (bandwidth x latency / SMs): larger steps or more resident "
                            "programs")
        elif in_flight >= needed and known is not None:
            _stale(row, problems, "not latency bound but listed in KNOWN_LATENCY_BOUND: remove the entry")
        elif known is not None:
            row["known_latency_bound"] = known
    roofline = max(counts["executed_flops"] / gpu["peak"][counts["flop_kind"]], counts["moved_bytes"] / bandwidth)
    seconds = roofline / fill
    row.update(counts, flops_ratio=round(flops_ratio, 3), bytes_ratio=round(bytes_ratio, 3),
               **{f"predicted_us_{gpu['name'].lower()}": round(seconds * 1e6, 2)})
    bound = HEAD_BOUND if row["name"].startswith("head_") else BOUND
    over = [f"{what} {ratio:.2f}x > {bound}x" for what, ratio in (("flops", flops_ratio), ("bytes", bytes_ratio))
            if ratio > bound]
    known = next((reason for pattern, reason in KNOWN_OVER_BOUND.items()
                  if re.match(pattern, f"{row['name']}@sm_{capability}")), None)
    row["over_bound"] = "; ".join(over)
    if over and known is None:
        problems.append(f"over bound: {row['over_bound']} (close the waste, or list it in KNOWN_OVER_BOUND with why)")
    elif known is not None and not over:
        _stale(row, problems, "within bound but listed in KNOWN_OVER_BOUND: remove the entry")
    else:
        row["known_over_bound"] = known
    return problems


@functools.cache
def _specs(module: str) -> list[dict]:
    return importlib.import_module(f"{PACKAGE}.{module}").compile_specs()


def _compile_task(module: str, index: int, arch: str) -> dict:
    """One row: spec `index` of `module` compiled for `arch` (a task a worker process can take by name)."""
    return {"module": module, **compile_one(_specs(module)[index], ARCHS[arch])}


def collect(modules: list[str], archs: list[str], jobs: int = 1) -> tuple[list[dict], list[str]]:
    """Every spec of `modules` for every arch, in that order, compiled by `jobs` processes (Triton's compile and
    ptxas take one core each); the modules that do not exist here."""
    tasks, missing = [], []
    for module in modules:
        try:
            count = len(_specs(module))
        except ModuleNotFoundError as err:
            if err.name and err.name.endswith(module):
                missing.append(module)
                continue
            raise
        tasks += [(module, index, arch) for index in range(count) for arch in archs]
    rows = []
    if jobs > 1 and len(tasks) > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            for row in pool.map(_compile_task, *zip(*tasks, strict=True)):
                rows.append(row)
                print(_format(row), flush=True)
    else:
        for task in tasks:
            rows.append(_compile_task(*task))
            print(_format(rows[-1]), flush=True)
    return rows, missing


def _format(r: dict) -> str:
    if "regs" not in r:
        return f"{r['name']:44s} {r['arch']:6s} FAILED  {r['problem']}"
    counts = ""
    if "flops_ratio" in r:
        time = next(v for k, v in r.items() if k.startswith("predicted_us_"))
        counts = (f"occ {r['occupancy']:2d}  flops x{r['flops_ratio']:<6.2f} bytes x{r['bytes_ratio']:<5.2f} "
                  f"{time:9.1f} us  ")
    status = "ok" if r["ok"] else r["problem"]
    if r["ok"] and r.get("known_over_bound"):
        status = f"known over bound ({r['over_bound']})"
    if r["ok"] and r.get("known_latency_bound"):
        status += f"; known latency bound ({r['in_flight_kb']} < {r['needed_kb']} KiB in flight per SM)"
    return (f"{r['name']:44s} {r['arch']:6s} regs {r['regs']:4d}  stack {r['stack']:3d}  local {r['local']:3d}  "
            f"shared {r['shared_bytes']:7d}  {str(r['tensor_core'] or '-'):6s} {'tma' if r['tma'] else '-':3s}  "
            f"{counts}{status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrafm_kernels.compile_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--strict", action="store_true", help="fail when a kernel module is missing")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--jobs", type=int, default=usable,
                        help="compile processes (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more processes")
    for module in args.modules:  # checked before anything compiles (a --json problem used to surface at the end)
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", module):
            parser.error(f"--modules {module!r} is not a module name; kernel modules: {', '.join(MODULES)}")
        if module not in MODULES:  # a typo used to print "module missing" and exit 0
            what = "has no kernels" if importlib.util.find_spec(f"{PACKAGE}.{module}") else "does not exist"
            parser.error(f"--modules {module}: {PACKAGE}.{module} {what}; kernel modules: {', '.join(MODULES)}")
    if args.json:
        target = os.path.abspath(args.json)
        parent = os.path.dirname(target)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.isdir(target) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            why = "it is a folder" if os.path.isdir(target) else f"{parent} is not a writable folder"
            parser.error(f"--json {args.json}: cannot write a file there ({why})")
    try:
        cuobjdump()
    except FileNotFoundError as err:
        print(f"compile_report: {err}", file=sys.stderr)
        return 2
    if importlib.import_module(f"{PACKAGE}._common").INTERPRET:
        # @triton.jit objects are interpreter functions under TRITON_INTERPRET=1; compile in a clean child.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", f"{PACKAGE}.compile_report", *(argv or sys.argv[1:])],
                              env=env).returncode
    print(f"{'kernel config':44s} {'arch':6s} resources (cuobjdump -res-usage), tensor-core instructions")
    rows, missing = collect(args.modules, args.arch, args.jobs)
    bad = [r for r in rows if not r["ok"]]
    for module in missing:
        print(f"{module}: module missing{' (--strict: failure)' if args.strict else ''}")
    known = sum(1 for r in rows if r.get("known_over_bound"))
    latency = sum(1 for r in rows if r.get("known_latency_bound"))
    print(f"{len(rows)} configs compiled, {len(bad)} with problems, {known} known over bound (KNOWN_OVER_BOUND), "
          f"{latency} known latency bound (KNOWN_LATENCY_BOUND), {len(missing)} modules missing")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        tmp = f"{args.json}.{os.getpid()}.tmp"  # written whole, then renamed: a full disk keeps the last report
        try:
            with open(tmp, "w") as f:
                json.dump({"rows": rows, "missing": missing, "bound": BOUND, "head_bound": HEAD_BOUND,
                           "known_over_bound": KNOWN_OVER_BOUND, "known_latency_bound": KNOWN_LATENCY_BOUND,
                           "loaded_dram_latency_ns": LOADED_DRAM_LATENCY_NS}, f, indent=2)
            os.replace(tmp, args.json)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return 1 if bad or (missing and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
