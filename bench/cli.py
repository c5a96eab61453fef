"""`terrafm bench`: kernels vs eager PyTorch and torch.compile, DINO-loss memory, training step, data paths,
roofline floors, the compile report and the FSDP/HSDP communication model; JSON + markdown + PNG into --out.

Sections skip with a printed reason when what they need is absent (a GPU, a branch not merged yet);
Triton kernels are never timed in the interpreter.
"""

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from terrafm import backends

SECTIONS = ("kernels", "memory", "step", "data", "roofline", "compile", "comm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI; minutes on CPU)")
    parser.add_argument("--out", default="bench-results", help="results folder (default: ./bench-results)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--ops", default=None,
                        help="kernels and compile sections: comma-separated ops (default: all); the compile "
                             "report then covers the Triton kernels those ops launch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto, CUDA when a device is visible, else cpu)")
    parser.add_argument("--data-dir", default=None,
                        help="data section: a shard directory written by `terrafm prepare` to measure, with the host "
                             "cores a node needs (default: the bundled synthetic sample shards)")
    parser.add_argument("--nvlink-gb-s", type=float, default=450.0,
                        help="comm section: NVLink bandwidth per GPU within a node, GB/s in each direction (default: "
                             "450, H100 SXM: 18 links x 25 GB/s; NVIDIA's 900 GB/s counts both directions)")
    parser.add_argument("--ib-gbit-s", type=float, default=400.0,
                        help="comm section: InfiniBand per NIC, Gbit/s (default: 400, NDR)")
    parser.add_argument("--nics-per-node", type=int, default=8, help="comm section: NICs per node (default: 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="comm and data sections: GPUs per node (default: 8)")
    parser.add_argument("--mfu", type=float, default=1.0,
                        help="comm and data sections: achieved fraction of the bf16 peak for the step's compute time "
                             "(default: 1.0, the roofline floor: efficiencies are then lower bounds)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print a markdown diff of two bench.json files and exit")


def _log(msg: str) -> None:
    """Progress to stdout. A stdout that fails (`| head` exited, a redirect onto a full disk) is said once on stderr
    and then left alone: it raised out of the run, losing every section measured so far with the results unwritten."""
    global _devnull_stdout
    if sys.stdout is _devnull_stdout:
        return
    try:
        print(msg, flush=True)
    except OSError as err:
        _devnull_stdout = sys.stdout = open(os.devnull, "w")  # Python flushes stdout again at exit
        print(f"terrafm bench: stdout failed ({err.strerror or err}); the run goes on and writes its results in "
              "--out", file=sys.stderr)


_devnull_stdout = None  # the devnull file that replaced a failed stdout


def _parse_only(text: str) -> list[str]:
    """The chosen sections in the order given, each once, roofline after kernels: it divides by the kernel times
    of a kernels section run before it (`--only roofline,kernels` left a GPU run with no measured fraction)."""
    chosen = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise ValueError(f"--only: unknown section(s) {unknown or text!r}; choose from {','.join(SECTIONS)}")
    if "roofline" in chosen and "kernels" in chosen[chosen.index("roofline"):]:
        chosen.remove("roofline")
        chosen.insert(chosen.index("kernels") + 1, "roofline")
    return chosen


MIN_MFU = 1e-3


def _check_numbers(args: argparse.Namespace) -> None:
    """The machine figures must describe a machine: positive finite bandwidths and counts, MIN_MFU <= mfu <= 1."""
    for name in ("nvlink_gb_s", "ib_gbit_s", "nics_per_node", "gpus_per_node"):
        if not 0 < getattr(args, name) < math.inf:  # inf would price every transfer at 0 ms
            raise ValueError(f"--{name.replace('_', '-')} must be a positive finite number, got {getattr(args, name)}")
    if not MIN_MFU <= args.mfu <= 1:  # a vanishing mfu priced a step at inf ms and wrote NaN into bench.json
        raise ValueError(f"--mfu is a fraction of the bf16 peak: {MIN_MFU} <= mfu <= 1, got {args.mfu}")


def _check_data_dir(data_dir: str | None, quick: bool = False) -> None:
    """--data-dir, when given, is a finished shard set: its index opens (a folder of GeoTIFFs or a half-written
    `terrafm prepare` output is refused here, not after the sections before data have run) and holds a batch."""
    if data_dir is None:
        return
    hint = "give a folder written by `terrafm prepare`"
    if not data_dir:
        raise ValueError(f"--data-dir is empty; {hint}")
    if not Path(data_dir).exists():
        raise ValueError(f"--data-dir {data_dir} does not exist; {hint}")
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is a file, not a folder; {hint}")
    from terrafm.data.shards import ShardError, ShardSet

    from .data import batch_size

    try:
        records = len(ShardSet(data_dir, verify_checksums=False).keys)
    except ShardError as err:
        raise ValueError(f"--data-dir: {err}") from None
    if records < batch_size(quick):  # the data section found out after the sections before it, naming data.batch_size
        raise ValueError(f"--data-dir {data_dir} holds {records} locations, fewer than the data section's batch of "
                         f"{batch_size(quick)}{' (--quick)' if quick else ' (8 with --quick)'}; give more data")


def _check_writable(out: Path) -> None:
    """OSError unless a file can be made in the folder `out`: a read-only folder was found out only when the
    results were written, after every section had run."""
    with tempfile.NamedTemporaryFile(dir=out, prefix=".bench-write-check-"):
        pass


class SectionError(Exception):
    """A section met bad input (a shard set that changed under the run, a machine figure it cannot model)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, `kill`), raised like Ctrl-C so that the sections finished so far are written."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _run_section(name: str, args: argparse.Namespace, device: str, ops: tuple[str, ...], sections: dict) -> None:
    """Run one section into `sections`; SectionError for bad input it meets."""
    if name == "kernels":
        from . import kernels as kernel_benches

        sections["kernels"] = [row for op in ops for row in kernel_benches.run_op(op, device, args.quick, _log)]
    elif name == "memory":
        from . import memory

        sections["memory"] = memory.run(device, args.quick, _log)
    elif name == "step":
        from . import step

        sections["step"] = step.run(device, args.quick, _log)
    elif name == "data":
        from terrafm.data.shards import ShardError

        from . import data

        try:
            sections["data"] = data.run(args.quick, _log, args.data_dir, args.mfu, args.gpus_per_node, device)
        except (ShardError, ValueError) as err:
            raise SectionError(err) from None
    elif name == "roofline":
        from . import roofline

        sections["roofline"] = roofline.run(sections.get("kernels"), args.quick, _log)
    elif name == "compile":
        from . import compile as compile_section
        from . import kernels as kernel_benches

        modules = None if args.ops is None else kernel_benches.kernel_modules(ops)
        if modules == []:
            sections["compile"] = {"skipped": f"--ops {args.ops} launches no Triton kernel of terrafm_kernels"}
        else:
            sections["compile"] = compile_section.run(args.quick, _log, modules=modules)
        if "skipped" in sections["compile"]:
            _log(f"  skipped: {sections['compile']['skipped']}")
    elif name == "comm":
        from . import comm

        try:
            sections["comm"] = comm.run(args, _log)
        except ValueError as err:
            raise SectionError(err) from None


def _run_sections(only: list[str], args: argparse.Namespace, device: str, ops: tuple[str, ...], result: dict) -> int:
    """Run the chosen sections into `result`; the exit code. Bad input met mid-run (2), Ctrl-C (130) or SIGTERM
    (143) stops the run at that section, recorded under skipped_sections, and keeps the sections finished; any other
    failure of a section (out of memory, a dependency that does not import) is recorded and the rest run (1)."""
    failed = False
    for name in only:
        _log(f"[{name}]")
        t0 = time.perf_counter()
        try:
            _run_section(name, args, device, ops, result["sections"])
        except SectionError as err:
            print(f"terrafm bench: {err}", file=sys.stderr)
            result["skipped_sections"][name] = f"failed: {err}"
            return 2
        except KeyboardInterrupt as stop:
            signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
            print(f"terrafm bench: interrupted ({signum.name}) in [{name}]; writing the sections finished before it",
                  file=sys.stderr)
            result["skipped_sections"][name] = f"interrupted ({signum.name})"
            return 128 + signum
        except Exception as err:  # out of memory, a missing or broken dependency: the other sections still run
            why = backends.error_line(err)
            print(f"terrafm bench: [{name}] failed ({why}); it is recorded as failed and the other sections run",
                  file=sys.stderr)
            result["skipped_sections"][name] = f"failed: {why}"
            failed = True
            continue
        _log(f"  ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """`terrafm bench`: 0, 2 on bad input, 130 / 143 when stopped by Ctrl-C / SIGTERM (docs/bench.md)."""
    try:
        return _run(args)
    except KeyboardInterrupt:  # in the imports, checks or metadata: sections and writing handle their own
        print("terrafm bench: interrupted (SIGINT) before any section ran; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(args: argparse.Namespace) -> int:
    from . import report

    if args.compare:
        try:
            print(report.compare(Path(args.compare[0]), Path(args.compare[1])))
        except (OSError, ValueError) as err:
            print(f"terrafm bench: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        only = _parse_only(args.only)
        _check_numbers(args)
        if not args.out:  # Path("") is the current folder
            raise ValueError("--out is empty; give the results folder (default: bench-results)")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file; the results go in a folder")
        if "data" in only:
            _check_data_dir(args.data_dir, args.quick)
    except (OSError, ValueError) as err:
        print(f"terrafm bench: {err}", file=sys.stderr)
        return 2
    import torch

    from . import common
    from . import kernels as kernel_benches

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("terrafm bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    ops = kernel_benches.OPS if args.ops is None else tuple(dict.fromkeys(o.strip() for o in args.ops.split(",")))
    bad = [o for o in ops if o not in kernel_benches.OPS]
    if bad:
        print(f"terrafm bench: --ops: unknown {bad}; choose from {','.join(kernel_benches.OPS)}", file=sys.stderr)
        return 2
    if args.ops is not None and not {"kernels", "compile"} & set(only):  # it selects within those two sections
        print(f"terrafm bench: --ops applies to the kernels and compile sections, which --only {args.only} leaves "
              "out", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = {"quick": args.quick, "device": device, "meta": common.metadata(), "sections": {},
              "skipped_sections": {}}
    try:  # after every argument is checked (a refused run left an empty folder), before minutes of work
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _check_writable(Path(args.out))
    except OSError as err:
        print(f"terrafm bench: cannot write in --out {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    _log(f"terrafm bench on {device} ({'quick' if args.quick else 'full'}), git {result['meta']['git_revision']}")
    in_main = threading.current_thread() is threading.main_thread()  # where Python can take signals
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    previous_int = signal.getsignal(signal.SIGINT)
    late = []  # a SIGTERM or Ctrl-C while the results are written waits for them to be whole
    try:
        code = _run_sections(only, args, device, ops, result)
        if in_main:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda signum, frame: late.append(signum))
        result["seconds"] = time.perf_counter() - start
        try:
            paths = report.write(result, Path(args.out))
        except OSError as err:  # a full disk or a folder that went away: say so, the run's numbers are on stdout
            print(f"terrafm bench: could not write the results to {args.out}: {err}", file=sys.stderr)
            return 2
    finally:
        if in_main:  # None: the handler was not Python's (set in C), which Python cannot put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous_int is None else previous_int)
    _log(f"wrote {paths['json']}, {paths['md']} and {len(result['plots'])} PNG plot(s) in {args.out} "
         f"({result['seconds']:.0f} s)")
    if late:
        print(f"terrafm bench: interrupted ({signal.Signals(late[0]).name}) while writing the results; they were "
              "written whole", file=sys.stderr)
    return 128 + late[0] if late else code
