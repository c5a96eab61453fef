"""The AOT compile report (registers, spills, mma use per kernel config for sm_80 / sm_90).

Runs `python -m terrafm_kernels.compile_report --json FILE` (kernels/compile_report.py) and keeps its rows;
Triton compiles for a GPUTarget without a GPU, so this section runs on CPU machines too.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(quick: bool, log, timeout_s: float = 900, modules: list[str] | None = None) -> dict:
    """The report's rows for `modules` (compile report module names; None: every shipped kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compile.json"
        command = [sys.executable, "-m", "terrafm_kernels.compile_report", "--json", str(out)]
        command += ["--modules", *modules] if modules is not None else []
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:  # a skipped section, not a traceback that loses the sections before it
            return {"skipped": f"compile_report did not finish within {timeout_s:g} s"}
        if not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"skipped": f"compile_report exited with {proc.returncode}: {tail[0][:200]}"}
        data = json.loads(out.read_text())
    rows = data["rows"]
    problems = [r for r in rows if not r["ok"]]
    log(f"  compile report: {len(rows)} kernel configs, {len(problems)} with problems")
    return {"rows": rows, "problems": len(problems), "missing": data["missing"]}
