"""The AOT compile report (registers, spills, mma use per kernel config for sm_80 / sm_90).

Runs `python -m terrafm_kernels.compile_report --json FILE` (kernels/compile_report.py) and keeps its rows;
Triton compiles for a GPUTarget without a GPU, so this section runs on CPU machines too.
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(quick: bool, log, timeout_s: float = 900) -> dict:
    if importlib.util.find_spec("terrafm_kernels.compile_report") is None:
        return {"skipped": "terrafm_kernels.compile_report is not on this branch yet (kernels/compile_report.py)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compile.json"
        proc = subprocess.run([sys.executable, "-m", "terrafm_kernels.compile_report", "--json", str(out)],
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"skipped": f"compile_report exited with {proc.returncode}: {tail[0][:200]}"}
        data = json.loads(out.read_text())
    rows = data.get("rows", data.get("kernels", [])) if isinstance(data, dict) else data
    log(f"  compile report: {len(rows)} kernel configs")
    return {"rows": rows, "raw": data}
