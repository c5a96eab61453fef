"""Build the csrc/ C++ extension (terrafm._C) through CMake; everything else is in pyproject.toml."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _cmake() -> str | None:
    """The cmake to run: the one on PATH, else the PyPI wheel's, whose binary is on PATH only in an activated
    virtual environment (`.venv/bin/pip install --no-build-isolation` leaves PATH as it is)."""
    found = shutil.which("cmake")
    if found is not None:
        return found
    try:
        import cmake
    except ImportError:
        return None
    return shutil.which("cmake", path=cmake.CMAKE_BIN_DIR)


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build csrc/ with CMake, failing with a message that names what is missing."""

    def run(self):
        missing = []
        if _cmake() is None:
            missing.append("cmake (pip install cmake, or apt-get install cmake)")
        try:
            import pybind11  # noqa: F401
        except ImportError:
            missing.append("pybind11 (pip install pybind11)")
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            missing.append("a C++17 compiler (apt-get install g++)")
        if missing:
            raise RuntimeError("cannot build terrafm._C (csrc/): missing " + "; ".join(missing))
        super().run()

    def build_extension(self, ext: CMakeExtension):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("TERRAFM_CMAKE_BUILD_TYPE", "Release")
        cmake = _cmake()
        configure = [
            cmake, ext.source_dir,
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        try:
            subprocess.run(configure, cwd=build_dir, check=True)
            subprocess.run([cmake, "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_dir, check=True)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"building csrc/ with CMake failed ({' '.join(err.cmd)}); the output above names the error. "
                "Needed: cmake>=3.18, pybind11, a C++17 compiler and the Python headers (python3-dev)."
            ) from err


setup(
    # terrafm.configs holds only YAML presets, so find_packages does not see it
    packages=find_packages(include=["terrafm", "terrafm.*"]) + ["terrafm.configs"]
    + ["terrafm_kernels"] + [f"terrafm_kernels.{p}" for p in find_packages("kernels")]
    + ["terrafm_bench"] + [f"terrafm_bench.{p}" for p in find_packages("bench")],
    ext_modules=[CMakeExtension("terrafm._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
