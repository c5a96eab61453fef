"""`terrafm info`: versions, each accelerated backend (usable here, or why not) and the backend each op resolves to.

The ops section is `terrafm.ops.resolve(device=...)` with no preferences, for cpu and (when usable) cuda:
JSON {"ops": {op: {device: backend}}}; text lines "  <op> cpu: <backend>, cuda: <backend>". A run's
own choice (with its config's `ops:` preferences) is recorded in its config.yaml.
"""

import argparse
import json
import platform

from terrafm import backends


def collect() -> dict:
    import torch

    from terrafm import __version__, ops

    versions = {"terrafm": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numpy", "nvidia.dali", "flash_attn", "pyarrow", "tifffile"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "unknown")
        except ModuleNotFoundError as err:
            versions[name] = None if err.name and name.startswith(err.name) else f"broken: {err}"
        except Exception as err:  # installed, but its import fails: not "not installed"
            versions[name] = f"broken: {backends.error_line(err)}"
    found = {name: fn() for name, fn in backends.ALL.items()}
    devices = ["cpu", "cuda"] if found["cuda"].usable else ["cpu"]
    resolved = {dev: ops.resolve(device=dev) for dev in devices}
    chosen = {op: {dev: resolved[dev][op] for dev in devices} for op in ops.REGISTRY}
    return {
        "versions": versions,
        "backends": {k: {"usable": v.usable, "detail": v.detail} for k, v in found.items()},
        "ops": chosen,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for k, v in info["versions"].items():
        print(f"  {k:12s} {v if v is not None else 'not installed'}")
    print("backends:")
    for k, v in info["backends"].items():
        print(f"  {k:20s} {'yes' if v['usable'] else 'no ':3s}  {v['detail']}")
    print("ops (backend resolved per device, no preferences):")
    for op, per_dev in info["ops"].items():
        desc = ", ".join(f"{d}: {b}" for d, b in per_dev.items())
        print(f"  {op:24s} {desc}")
    return 0
