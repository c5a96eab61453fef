"""Write a bench result as JSON + markdown + PNG plots, and diff two result files (`--compare`)."""

import json
import math
from functools import partial
from pathlib import Path

from terrafm.fileio import atomic_write, atomic_write_bytes

from .markdown import mib, table


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    v = meta["info"]["versions"]
    lines = [f"# terrafm bench ({'quick' if result['quick'] else 'full'}, {result['device']})", "",
             f"{meta['timestamp']} · git {meta['git_revision']} · {meta['machine'].get('gpu', 'CPU only')} · "
             f"{meta['machine']['cpu_count']} CPUs · torch {v['torch']} · triton {v.get('triton')} · "
             f"run took {result['seconds']:.0f} s", ""]
    sections = result["sections"]
    for name, why in result.get("skipped_sections", {}).items():
        lines += [f"**{name}**: skipped, {why}", ""]
    if "kernels" in sections:
        lines += ["## Kernels (median time; GB/s and TFLOP/s from the kernel's roofline_cost)", ""]
        reasons = list(dict.fromkeys(r["skipped"] for r in sections["kernels"] if "skipped" in r))
        rows = [[r["op"], r["shape"], r["dtype"], r["pass"], r["provider"],
                 _fmt(r.get("ms"), " ms") if "ms" in r else f"skipped ({reasons.index(r['skipped']) + 1})",
                 _fmt(r.get("gb_per_s")), _fmt(r.get("tflops_per_s")), mib(r.get("peak_bytes"))]
                for r in sections["kernels"]]
        lines += table(["op", "shape", "dtype", "pass", "provider", "time", "GB/s", "TFLOP/s", "peak mem"], rows)
        lines += [f"({i}) {why}  " for i, why in enumerate(reasons, 1)] + ([""] if reasons else [])
        hows = sorted({r["memory_how"] for r in sections["kernels"] if "memory_how" in r})
        lines += [f"Peak memory measured as: {', '.join(hows)}.", ""] if hows else []
    if "memory" in sections:
        lines += ["## DINO loss at K = 65536: fused vs unfused peak memory", ""]
        lines += table(["path", "shape", "dtype", "peak", "how"],
                       [[r["path"], r["shape"], r["dtype"], mib(r["peak_bytes"]), r["how"]]
                        for r in sections["memory"]])
    if "step" in sections:
        lines += ["## Training step (one process)", ""]
        rows = []
        for r in sections["step"]:
            head = r.get("head", "unfused")
            if "skipped" in r:
                rows.append([r["config"], r["backbone"], head, "-", "-", "-", "-", "-", r["skipped"]])
            else:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                rows.append([r["config"], r["backbone"], head, r["batch"], r["precision"], _fmt(r["img_per_s"]),
                             mfu, mib(r["peak_bytes"]), r["mfu_note"] or r["memory_how"]])
        lines += table(["config", "backbone", "head", "batch", "precision", "img/s", "MFU", "peak mem", "note"],
                       rows)
    if "data" in sections:
        data = sections["data"]
        mods = ", ".join(f"{m} {c} bands" for m, c in data.get("modalities", {}).items())
        lines += [f"## Data paths ({data.get('shard_dir')}: {data.get('tile_size')} px tiles, {mods})", ""]
        rows = [[r["path"], _fmt(r.get("tiles_per_s")), _fmt(r.get("views_per_s")), _fmt(r.get("tiles_per_core_s")),
                 r.get("backend", "-"), r.get("skipped", "")] for r in data.get("rows", [])]
        lines += table(["path", "tiles/s", "views/s", "tiles/s per core", "backend", "skipped"], rows) if rows else \
            [f"skipped: {data.get('skipped')}", ""]
        demand = data.get("demand")
        if demand:
            lines += [f"Host cores needed: {demand['model']} on {demand['gpu']} at {demand['mfu']:.0%} of the bf16 "
                      f"peak trains on {demand['tiles_per_s']:.0f} tiles/s per GPU ({demand['batch_per_gpu']} tiles "
                      f"per {demand['step_s'] * 1e3:.0f} ms step); goal at most {data['cores_per_gpu_goal']} cores "
                      "per GPU.", ""]
            lines += [f"Not the production budget: {c}." for c in data.get("caveats", [])]
            lines += [""] if data.get("caveats") else []
            lines += table(["path", "tiles/s per core", "cores per GPU", "cores per node", "within goal",
                            "host to device GB/s per GPU"],
                           [[b["path"], _fmt(b["tiles_per_core_s"]), _fmt(b["cores_per_gpu"]),
                             _fmt(b["cores_per_node"]), "yes" if b["within_goal"] else "no", _fmt(b.get("h2d_gb_s"))]
                            for b in data.get("budget", [])])
    if "roofline" in sections:
        lines += ["## Roofline floor (bf16 operands; dense peak of the units the op runs on, HBM bandwidth)", ""]
        units = {"tflops_bf16": "bf16 tensor", "tflops_fp32": "fp32 FMA"}
        rows = [[r["op"], r["shape"], f"{r['flops'] / 1e9:.3g}", f"{r['bytes'] / 1e6:.3g}", _fmt(r["intensity"]),
                 units[r.get("peak", "tflops_bf16")], _fmt(r["floor_us_H100"], " us"), _fmt(r["floor_us_A100"], " us"),
                 _fmt(r["fraction_of_roofline"]) if r["fraction_of_roofline"] is not None else r["fraction_note"]]
                for r in sections["roofline"]]
        lines += table(["op", "shape", "GFLOP", "MB", "FLOP/B", "peak", "H100 floor", "A100 floor",
                        "measured fraction"], rows)
    if "comm" in sections:
        c = sections["comm"]
        lines += [f"## Communication per GPU per step: FSDP vs HSDP ({c['gpu']}, NVLink {c['nvlink_gb_s']:g} GB/s, "
                  f"{c['nics_per_node']}x{c['ib_gbit_s']:g} Gb/s InfiniBand per node of {c['gpus_per_node']}, "
                  f"each direction; compute at {c['mfu']:g} x bf16 peak)", ""]
        rows = [[r["model"], r["gpus"], r["strategy"], r["mesh"], f"{r['all_gather_bytes'] / 1e9:.2f}",
                 f"{r['reduce_scatter_bytes'] / 1e9:.2f}", f"{r['all_reduce_bytes'] / 1e9:.2f}",
                 f"{r['comm_s'] * 1e3:.1f}", f"{r['compute_s'] * 1e3:.1f}", f"{r['efficiency_overlapped']:.0%}",
                 f"{r['efficiency_serial']:.0%}"] for r in c["rows"]]
        lines += table(["model", "GPUs", "strategy", "mesh (replicate x shard)", "all-gather GB",
                        "reduce-scatter GB", "all-reduce GB", "comm ms", "compute ms", "efficiency (overlapped)",
                        "efficiency (serial)"], rows)
    if "compile" in sections:
        c = sections["compile"]
        lines += ["## Compile report (AOT, sm_80 / sm_90)", ""]
        if "skipped" in c:
            lines += [f"skipped: {c['skipped']}", ""]
        else:
            keys = [k for k in c["rows"][0] if k not in ("fn",)] if c["rows"] else []
            lines += table(keys, [[_fmt(r.get(k)) for k in keys] for r in c["rows"]])
    return "\n".join(lines)


def plots(result: dict, out_dir: Path) -> list[str]:
    """One PNG per timed op (time per provider and shape) and one of the memory comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timed = [r for r in result["sections"].get("kernels", []) if "ms" in r]
    for op in sorted({r["op"] for r in timed}):
        rows = [r for r in timed if r["op"] == op]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            ms = [next((r["ms"] for r in rows if r["shape"] == s and r["provider"] == p), 0.0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ms, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} on {result['device']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = atomic_write(out_dir / f"kernel_{op}.png", partial(fig.savefig, dpi=100, format="png"))
        plt.close(fig)
        written.append(path.name)
    mem = result["sections"].get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh([f"{r['path']}\n({r['how'].split(':')[0]})" for r in mem], [r["peak_bytes"] / 2**20 for r in mem])
        ax.set_xlabel("peak MiB")
        ax.set_title(f"DINO loss, {mem[0]['shape']}", fontsize=9)
        fig.tight_layout()
        path = atomic_write(out_dir / "memory_dino_head_loss.png", partial(fig.savefig, dpi=100, format="png"))
        plt.close(fig)
        written.append(path.name)
    return written


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md and the plots, each written whole or not at all: a full disk keeps the previous
    run's files instead of leaving torn ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, out_dir)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    atomic_write_bytes(paths["json"], json.dumps(result, indent=2, default=str).encode())
    atomic_write_bytes(paths["md"], markdown(result).encode())
    drawn = {Path(p).name for p in result["plots"]}
    for old in (*out_dir.glob("kernel_*.png"), *out_dir.glob("memory_*.png")):  # an earlier run's, into this --out
        if old.name not in drawn:
            old.unlink(missing_ok=True)
    return paths


def _ms(value) -> float:
    """A measured time: a positive finite number, else ValueError (a ratio of it must mean something)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"a time or rate of {value!r}, not a positive finite number")
    return float(value)


def _rows(value) -> list[dict]:
    """A section's rows: a list of objects, else ValueError."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ValueError("a section's rows are not a list of objects")
    return value


def _timings(result: dict) -> dict[tuple, float]:
    """Every measurement of one result, keyed (section, what, shape / batch, provider / precision, dtype / head)."""
    keyed = {}
    for r in _rows(result["sections"].get("kernels", [])):
        if "ms" in r:
            keyed[("kernel", r["op"], r["shape"], r["provider"], r["dtype"])] = _ms(r["ms"])
    for r in _rows(result["sections"].get("step", [])):
        if "step_s" in r:
            keyed[("step", r["config"], str(r["batch"]), r["precision"], r.get("head", "unfused"))] = \
                _ms(r["step_s"]) * 1e3
    data = result["sections"].get("data", {})
    # the shards and the workload a data row was measured on: a bundled 60 px sample against 240 px shards (or
    # --quick's 96 px crops against 224) read as a 4-5x regression
    shards = f"{data.get('tile_size', '?')} px tiles, {data.get('modalities', {})}"
    workload = "quick" if result.get("quick") else "full"
    for r in _rows(data.get("rows", [])):
        if "tiles_per_s" in r:
            keyed[("data", r["path"], shards, workload, "")] = 1e3 / _ms(r["tiles_per_s"])
    return keyed


def _load(path: Path) -> tuple[dict, dict[tuple, float]]:
    """One bench.json and its measurements, or ValueError naming the file and what is wrong with it."""
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--compare: {path} is not JSON ({err})") from None
    if not (isinstance(result, dict) and isinstance(result.get("sections"), dict)
            and isinstance(result.get("meta"), dict)):
        raise ValueError(f"--compare: {path} is not a terrafm bench result (no 'sections' and 'meta' objects)")
    try:
        return result, _timings(result)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"--compare: {path} has a malformed measurement row ({type(err).__name__}: {err})") from None


def _revision(result: dict) -> str:
    """A result's git revision, short: 12 hex digits, keeping '-dirty' and any words after it."""
    revision = str(result["meta"].get("git_revision", "?"))
    head, sep, rest = revision.partition("-")
    return head[:12] + sep + rest if all(c in "0123456789abcdef" for c in head) and len(head) > 12 else revision


def compare(a_path: Path, b_path: Path) -> str:
    """Markdown diff of two result files: every measurement present in both, B / A (lower is faster)."""
    for p in (a_path, b_path):
        if not p.is_file():
            raise FileNotFoundError(f"--compare: {p} is not a file; pass two bench.json files")
    (a, ta), (b, tb) = _load(a_path), _load(b_path)
    common = [k for k in ta if k in tb]
    lines = [f"# bench compare: A = {a_path} ({_revision(a)}, {a.get('device', '?')}), "
             f"B = {b_path} ({_revision(b)}, {b.get('device', '?')})", ""]
    rows = [[*k, f"{ta[k]:.4g}", f"{tb[k]:.4g}", f"{tb[k] / ta[k]:.2f}x"] for k in common]
    lines += table(["section", "what", "shape / batch", "provider / precision", "dtype / head", "A ms", "B ms",
                    "B / A"], rows)
    only = len(ta) - len(common), len(tb) - len(common)
    lines.append(f"{len(common)} measurements in both; {only[0]} only in A, {only[1]} only in B "
                 "(data rows: ms per tile).")
    return "\n".join(lines)
