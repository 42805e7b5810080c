"""The C++ engine (`csrc/`): compiled on first use into a cache directory, then loaded with ctypes.

The engine is a plain C++17 library over raw pointers with a C ABI (no torch headers, no
Python headers), so it builds in about a second with one compiler call and loads without
any binding layer. The compiled library is cached under

    $FASTPIXEL_BUILD_DIR, else $TORCH_EXTENSIONS_DIR/fastpixel, else ~/.cache/fastpixel

in a file named after a hash of the sources, the compiler's version and the flags (and the
CPU, for -march=native), so a changed source, compiler or machine rebuilds. Build switches:

- $CXX picks the compiler (default: c++).
- $FASTPIXEL_CPU_ARCH is the -march value (default: native, this CPU). Another value, such
  as x86-64-v3 (AVX2 and FMA) or x86-64 (SSE2), makes a library that runs on any CPU of that
  level; one that this CPU cannot run is refused (BuildError) rather than left to die of an
  illegal instruction.

The engine is built with -fopenmp; where the compiler has no OpenMP (Apple's clang), with
-fopenmp-simd instead, and then it runs on one thread (`threaded`). Builds are atomic (a
temporary file, then a rename), so concurrent processes can share the cache directory.
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
# The sources as this process found them at import. A library built later from sources
# changed since (a checkout updated under a running training) would read the ops this
# process's Python packs in another layout: one such training died of a division by zero
# at its first sample grid. So the process builds, and names its library after, these.
_SOURCE_TEXT = {source: source.read_bytes() for source in SOURCES if source.is_file()}
# -ffp-contract=off: the mixture draw must round each operation as PyTorch does (see csrc/step.cpp);
# -fno-trapping-math: without AVX-512's masks, GCC vectorises `x > 0 ? x : e^x - 1` only so
# (the same values; no program here reads the floating-point exception flags)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# without the OpenMP runtime, -fopenmp-simd still vectorises the `omp simd` loops
OPENMP, NO_OPENMP = "-fopenmp", "-fopenmp-simd"
# x86 features an -march value may enable, as the compiler's macro and /proc/cpuinfo's flag
# (the x86-64 levels' and AVX-512's)
_X86_FEATURES = {"__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
                 "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__BMI__": "bmi1",
                 "__BMI2__": "bmi2", "__F16C__": "f16c", "__LZCNT__": "abm", "__MOVBE__": "movbe",
                 "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512CD__": "avx512cd",
                 "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl"}


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


def _arch() -> str:
    return os.environ.get("FASTPIXEL_CPU_ARCH") or "native"


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _check_cpu_runs(compiler: str, arch: str) -> None:
    """Refuse an -march this CPU cannot run, which would otherwise die of an illegal
    instruction. Checked where /proc/cpuinfo lists x86 flags (Linux on x86)."""
    if arch == "native":
        return
    have = {flag for line in _cpu().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    if not have:
        return
    try:
        result = subprocess.run([compiler, f"-march={arch}", "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"the C++ compiler {compiler!r} does not run: {err}") from err
    if result.returncode != 0:
        raise BuildError(f"FASTPIXEL_CPU_ARCH={arch}: the compiler rejects -march={arch}:\n{result.stderr.strip()}")
    macros = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("#define ")}
    missing = sorted(flag for macro, flag in _X86_FEATURES.items() if macro in macros and flag not in have)
    if missing:
        raise BuildError(f"FASTPIXEL_CPU_ARCH={arch}: this CPU cannot run code built for -march={arch}, "
                         f"it lacks {', '.join(missing)}")


def _library_path(compiler: str, arch: str) -> Path:
    missing = [str(source) for source in SOURCES if source not in _SOURCE_TEXT]
    if missing:
        raise BuildError(f"the C++ engine's sources are missing from this installation: {', '.join(missing)}")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"the C++ compiler {compiler!r} does not run: {err}") from err
    # not OpenMP: whether the compiler has it is decided by building, and follows from its version
    key = hashlib.sha256()
    for part in [*_SOURCE_TEXT.values(), version.encode(), " ".join(FLAGS).encode(),
                 arch.encode(), (_cpu() if arch == "native" else "").encode()]:
        key.update(part)
        key.update(b"\0")
    return build_dir() / f"fastpixel_step_{key.hexdigest()[:16]}.so"


def _run_compiler(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"compiling csrc/ failed ({command[0]}): {err}") from err
    if result.returncode != 0:
        raise BuildError(f"compiling csrc/ failed ({command[0]}):\n{result.stderr.strip()}")


def _compile(compiler: str, target: Path, arch: str) -> None:
    print(f"fastpixel: compiling the C++ engine for -march={arch} into {target.parent} (once, a few seconds)",
          file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    tree = Path(tempfile.mkdtemp(prefix="fastpixel_csrc_"))
    for source, text in _SOURCE_TEXT.items():
        (tree / source.name).write_bytes(text)
    command = [compiler, *FLAGS, f"-march={arch}", "-o", temporary, *(str(tree / source.name) for source in SOURCES)]
    try:
        try:
            _run_compiler([*command, OPENMP])
        except BuildError:  # no OpenMP here (else the build without fails too, and says why)
            _run_compiler([*command, NO_OPENMP])
            print(f"fastpixel: {compiler} has no OpenMP ({OPENMP} fails): the C++ engine runs on one thread",
                  file=sys.stderr)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
        shutil.rmtree(tree, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _build() -> ctypes.CDLL | BuildError:
    """The loaded engine, or why there is none: tried once per process (see `forget`)."""
    try:
        compiler, arch = _compiler(), _arch()
        _check_cpu_runs(compiler, arch)
        target = _library_path(compiler, arch)
        if not target.exists():
            _compile(compiler, target, arch)
        try:
            library = ctypes.CDLL(str(target))
        except OSError as err:
            raise BuildError(f"the compiled C++ engine {target} does not load: {err}") from err
    except BuildError as err:
        return err
    for name in ("fp_run_float32", "fp_run_float64"):
        getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        getattr(library, name).restype = None
    library.fp_op_slots.restype = library.fp_openmp.restype = library.fp_panel_columns.restype = ctypes.c_int
    library.fp_panel_columns.argtypes = [ctypes.c_int, ctypes.c_int]
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


def threaded() -> bool:
    """Whether the engine shares large products among PyTorch's threads: False where it was
    built without OpenMP (the compiler has none), and runs on one thread."""
    return bool(load().fp_openmp())


def forget() -> None:
    """Forget this process's build outcome, so the next use tries again (tests change $CXX)."""
    _build.cache_clear()
