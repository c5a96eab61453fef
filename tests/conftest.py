"""Test-wide setup: Triton kernels in the interpreter without a CUDA GPU; threads per xdist worker; test order."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The repository root must not be importable: `python -m pytest` and xdist's workers put it on sys.path, and its
# kernels/ and bench/ folders (installed as terrafm_kernels and terrafm_bench) would shadow PyPI packages of those
# names. transformers >= 5.25 depends on Hugging Face's `kernels` and imports it: it got this repo's kernels/.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

# The test command (scripts/test.sh) sets HYPOTHESIS_PROFILE=ci: the same examples on every run, so a CI result
# does not depend on the draw; a plain `pytest` draws new examples each run and keeps exploring.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (scripts/test.sh runs 2 workers) the workers share the cores: each worker and the
# processes its tests start get an equal share of threads instead of all of them each.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The most the suite holds on disk at once under its temp folder: ViT-L's 5.6 GB checkpoint in the preset smoke test
# beside the other worker's tests (about 6.4 GB measured). Passing tests' tmp_path folders go as they end
# (tmp_path_retention_policy, pyproject.toml); kept, a run filled 21 GB.
SUITE_PEAK_DISK_GB = 7


def pytest_configure(config):
    """Say at the start, not in hundreds of ENOSPC errors at the end, that the temp folder is short of disk."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller warns once
        return
    free_gb = shutil.disk_usage(tempfile.gettempdir()).free / 1e9
    if free_gb < SUITE_PEAK_DISK_GB:
        config.issue_config_time_warning(pytest.PytestWarning(
            f"{tempfile.gettempdir()} has {free_gb:.1f} GB free; the suite holds up to {SUITE_PEAK_DISK_GB} GB there "
            "at once (the ViT-L preset's checkpoint): tests that write checkpoints may fail with 'No space left on "
            "device'. Free disk there, or point TMPDIR at a folder with room"), stacklevel=2)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def ieee_convolutions(monkeypatch):
    """fp32 convolutions without tf32, as CPU PyTorch computes them whatever the switch says: the fp32 patch_embed
    kernel follows the switch, so a test comparing it with an untouched nn.Conv2d at fp32 precision sets it."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(folder): from then on Path.write_bytes / write_text into `folder` write half their data and raise
    ENOSPC, as a disk that fills mid-write does."""
    import errno

    real = {name: getattr(Path, name) for name in ("write_bytes", "write_text")}

    def fill(folder: Path) -> None:
        def filling(name):
            def write(self, data, *args, **kwargs):
                if self.parent != folder:
                    return real[name](self, data, *args, **kwargs)
                real[name](self, data[:len(data) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, "No space left on device")
            return write

        for name in real:
            monkeypatch.setattr(Path, name, filling(name))
    return fill


def pytest_collection_modifyitems(config, items):
    """Grouped (long, serial) tests first, so that under xdist their chain runs beside everything else."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
