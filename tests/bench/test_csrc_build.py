"""setup.py builds csrc/ (terrafm._C) from the files a clean clone has, with the tools a fresh machine may have."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CMAKE_TOOLS = {"cmake", "ccmake", "cpack", "ctest"}


def test_builds_with_cmake_from_its_wheel_only(tmp_path):
    """cmake from PyPI's wheel is on PATH only in an activated venv: `.venv/bin/pip install --no-build-isolation -e .`
    (gpu_check's build stage) on a machine without a system cmake passed setup.py's check for cmake and then died
    with `[Errno 2] No such file or directory: 'cmake'`."""
    import cmake  # the wheel pyproject.toml's build requirements install

    tools = tmp_path / "bin"  # every tool on PATH but cmake's
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for tool in os.scandir(folder):
            if tool.name not in CMAKE_TOOLS and not (tools / tool.name).exists():
                (tools / tool.name).symlink_to(tool.path)
    env = {**os.environ, "PATH": str(tools)}
    assert shutil.which("cmake", path=env["PATH"]) is None
    assert shutil.which("cmake", path=cmake.CMAKE_BIN_DIR) is not None

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"],
                           cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (built,) = (src / "lib" / "terrafm").glob("_C*.so")
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.render_view.__name__)")
    loaded = subprocess.run([sys.executable, "-c", probe, str(built)], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "render_view", loaded.stderr


def test_the_sdist_holds_the_csrc_build(tmp_path):
    """Without a MANIFEST.in the sdist had no csrc/ and no CMakeLists.txt (the extension declares no sources), so a
    wheel built from it (`python -m build`, pip from source) failed in CMake: 'does not appear to contain
    CMakeLists.txt'."""
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("csrc", "terrafm", "kernels", "bench"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    # -P: the copy's kernels/ folder must not shadow an installed module of that name while setuptools imports
    built = subprocess.run([sys.executable, "-P", "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = {"CMakeLists.txt"} | {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert needed <= names, sorted(needed - names)
