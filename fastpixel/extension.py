"""The C++ engine (`csrc/`): compiled on first use into a cache directory, then loaded with ctypes.

The engine is a plain C++17 library over raw pointers with a C ABI (no torch headers, no
Python headers), so it builds in about a second with one compiler call and loads without
any binding layer. The compiled library is cached under

    $FASTPIXEL_BUILD_DIR, else $TORCH_EXTENSIONS_DIR/fastpixel, else ~/.cache/fastpixel

in a file named after a hash of the sources, the compiler's version, the flags and the
CPU (the flags include -march=native), so a changed source, compiler or machine rebuilds.
$CXX picks the compiler (default: c++). Builds are atomic (a temporary file, then a rename),
so concurrent processes can share the cache directory.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# csrc/ of the source tree (an editable install), else the copy installed as fastpixel/csrc
_TREE = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [(_TREE if _TREE.is_dir() else Path(__file__).resolve().parent / "csrc") / "step.cpp"]
# -ffp-contract=off: the mixture draw must round each operation as PyTorch does (see csrc/step.cpp)
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]


class BuildError(RuntimeError):
    """The C++ engine could not be compiled or loaded here."""


def build_dir() -> Path:
    """Where compiled engines are cached."""
    if os.environ.get("FASTPIXEL_BUILD_DIR"):
        return Path(os.environ["FASTPIXEL_BUILD_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fastpixel"
    return Path.home() / ".cache" / "fastpixel"


def _compiler() -> str:
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C++ compiler: {name!r} is not on PATH (set CXX to one, e.g. g++)")
    return path


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _library_path(compiler: str) -> Path:
    missing = [str(source) for source in SOURCES if not source.is_file()]
    if missing:
        raise BuildError(f"the C++ engine's sources are missing from this installation: {', '.join(missing)}")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"the C++ compiler {compiler!r} does not run: {err}") from err
    key = hashlib.sha256()
    for part in [*(source.read_bytes() for source in SOURCES), version.encode(), " ".join(FLAGS).encode(),
                 _cpu().encode()]:
        key.update(part)
        key.update(b"\0")
    return build_dir() / f"fastpixel_step_{key.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    print(f"fastpixel: compiling the C++ engine into {target.parent} (once, a few seconds)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", temporary, *map(str, SOURCES)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise BuildError(f"compiling csrc/ failed ({compiler}):\n{result.stderr.strip()}")
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"compiling csrc/ failed ({compiler}): {err}") from err
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@functools.lru_cache(maxsize=None)
def _build() -> ctypes.CDLL | BuildError:
    """The loaded engine, or why there is none: tried once per process (see `forget`)."""
    try:
        compiler = _compiler()
        target = _library_path(compiler)
        if not target.exists():
            _compile(compiler, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError as err:
            raise BuildError(f"the compiled C++ engine {target} does not load: {err}") from err
    except BuildError as err:
        return err
    for name in ("fp_run_float32", "fp_run_float64"):
        getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        getattr(library, name).restype = None
    library.fp_op_slots.restype = ctypes.c_int
    return library


def load() -> ctypes.CDLL:
    """The compiled engine, built first if needed. Raises BuildError when it cannot be."""
    outcome = _build()
    if isinstance(outcome, BuildError):
        raise outcome
    return outcome


def why_unavailable() -> str | None:
    """None if the engine builds and loads here, else why not."""
    outcome = _build()
    return str(outcome) if isinstance(outcome, BuildError) else None


def forget() -> None:
    """Forget this process's build outcome, so the next use tries again (tests change $CXX)."""
    _build.cache_clear()
