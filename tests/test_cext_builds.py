"""The C++ engine's builds (fastpixel/extension.py, csrc/README.md): once into the build
directory; the fallback without a compiler; builds for older x86 CPUs (x86-64-v3: AVX2 and
FMA, no AVX-512; x86-64: SSE2), each passing the engine's exactness tests and keeping to its
instruction set; a compiler without OpenMP; and, where a cross compiler and qemu-aarch64 are
installed, an ARM64 build replaying every engine call of a few samplings."""
import ctypes
import gc
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastpixel
from fastpixel import extension
from fastpixel.backend import BackendError
from fastpixel.sampling.engines import cext
from tests.conftest import cached_run, tiny_model

CXX = os.environ.get("CXX", "c++")
if shutil.which(CXX) is None:
    pytest.skip("no C++ compiler to build the engine with", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
on_x86 = pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                            reason="builds for x86-64 CPUs, checked on Linux (/proc/cpuinfo, ELF)")
# every op against its reference, and whole samplings (every PixelCNN++ option, both masked
# families, float32 and float64) against PyTorch, a forward pass and the naive sampler
EXACTNESS = ["tests/test_cext.py",
             "tests/test_masked_families.py::test_cached_steps_equal_a_forward_pass_and_images_equal_naive_float64",
             "tests/test_masked_families.py::test_cached_sampling_float32"]


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build directory and no build outcome remembered, before and after the test."""
    monkeypatch.setenv("FASTPIXEL_BUILD_DIR", str(tmp_path))
    extension.forget()
    yield tmp_path
    extension.forget()


def test_engine_builds_once_into_the_build_directory(fresh_build, capfd):
    extension.load()
    assert "compiling the C++ engine" in capfd.readouterr().err
    assert len(list(fresh_build.glob("fastpixel_step_*.so"))) == 1
    extension.forget()
    extension.load()  # another process: the cached library, no compiling
    assert capfd.readouterr().err == ""


def test_sources_changed_after_import_do_not_reach_this_processs_engine(fresh_build, monkeypatch, tmp_path_factory):
    """A checkout updated under a running process (a training that samples at each epoch's
    end): the engine it builds is the one its Python, imported before, packs ops for."""
    imported, source = extension._SOURCE_TEXT[extension.SOURCES[0]], tmp_path_factory.mktemp("csrc") / "step.cpp"
    source.write_text("#error the source changed after import\n")
    monkeypatch.setattr(extension, "SOURCES", [source])
    monkeypatch.setattr(extension, "_SOURCE_TEXT", {source: imported})
    model = tiny_model(dtype=torch.float64, image_size=(4, 4))
    images = fastpixel.sample(model, 2, seed=0, backend="cext")
    assert torch.equal(images, fastpixel.sample(model, 2, seed=0, backend="torch"))


def test_without_a_compiler_auto_falls_back_with_a_warning_and_forced_cext_fails(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    model = tiny_model(dtype=torch.float32, image_size=(4, 4))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ engine is unavailable.*no C\\+\\+ compiler"):
        images = fastpixel.sample(model, 2, fast=True, seed=3)
    assert torch.equal(images, fastpixel.sample(model, 2, fast=True, seed=3, backend="torch"))
    with pytest.raises(BackendError, match="backend 'cext' cannot run here: no C\\+\\+ compiler"):
        fastpixel.sample(model, 2, fast=True, backend="cext")
    monkeypatch.setenv("FASTPIXEL_BACKEND", "cext")
    with pytest.raises(BackendError, match="FASTPIXEL_BACKEND=cext cannot run here"):
        fastpixel.sample(model, 2, fast=True)


def test_masked_families_fall_back_alike(fresh_build, monkeypatch):
    from tests.test_masked_families import tiny
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    model = tiny("gated", dtype=torch.float32, image_size=(3, 4))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ engine is unavailable.*no C\\+\\+ compiler"):
        images = fastpixel.sample(model, 2, fast=True, seed=3)
    assert torch.equal(images, fastpixel.sample(model, 2, fast=True, seed=3, backend="torch"))
    with pytest.raises(BackendError, match="backend 'cext' cannot run here: no C\\+\\+ compiler"):
        fastpixel.sample(model, 2, fast=True, backend="cext")


# --------------------------------------------------------------------------- other CPUs, no OpenMP
def run_exactness_tests(build: Path, **env: str) -> None:
    """EXACTNESS in a fresh process whose engine is built into `build` with `env` set."""
    env = {**{k: v for k, v in os.environ.items() if k != "FASTPIXEL_BACKEND"}, "FASTPIXEL_BUILD_DIR": str(build),
           **env}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             "-k", "cext and not without_triton", *EXACTNESS],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]


def instructions(library: Path) -> dict[str, int]:
    """How many of the library's instructions are AVX-512's (an EVEX prefix, 0x62) and AVX's
    (a VEX prefix, 0xc4 or 0xc5): in 64-bit code these bytes open no other instruction."""
    disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    first = [line.split("\t")[1].split()[0] for line in disassembly.splitlines() if line.count("\t") >= 2]
    return {"AVX-512": first.count("62"), "AVX": first.count("c4") + first.count("c5")}


@on_x86
@pytest.mark.parametrize("arch, avx512, avx", [("x86-64-v3", False, True), ("x86-64", False, False)])
def test_builds_for_older_x86_cpus_pass_the_exactness_tests_and_keep_to_their_instructions(arch, avx512, avx,
                                                                                            tmp_path):
    if arch != "x86-64" and "avx2" not in extension._cpu():
        pytest.skip(f"this CPU cannot run -march={arch}")
    run_exactness_tests(tmp_path, FASTPIXEL_CPU_ARCH=arch)
    [library] = tmp_path.glob("fastpixel_step_*.so")
    if shutil.which("objdump") is None:
        pytest.skip("no objdump to look at the instructions with")
    found = instructions(library)
    assert (found["AVX-512"] > 0, found["AVX"] > 0) == (avx512, avx), found


@on_x86
def test_an_arch_this_cpu_cannot_run_is_refused_before_building(fresh_build, monkeypatch):
    monkeypatch.setattr(extension, "_cpu", lambda: "flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt")
    monkeypatch.setenv("FASTPIXEL_CPU_ARCH", "x86-64-v3")
    with pytest.raises(extension.BuildError, match="cannot run code built for -march=x86-64-v3, it lacks abm, avx, "
                                                   "avx2, bmi1, bmi2, f16c, fma, movbe"):
        extension.load()
    monkeypatch.setenv("FASTPIXEL_CPU_ARCH", "no-such-cpu")
    extension.forget()
    with pytest.raises(extension.BuildError, match="FASTPIXEL_CPU_ARCH=no-such-cpu: the compiler rejects"):
        extension.load()
    assert list(fresh_build.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="the stand-in compiler is a shell script")
def test_a_compiler_without_openmp_builds_an_engine_that_runs_on_one_thread_and_samples_alike(fresh_build, capfd,
                                                                                             monkeypatch):
    from tests.test_masked_families import OPTIONS as MASKED, tiny
    compiler = fresh_build / "c++-without-openmp"  # as Apple's clang: "unsupported option '-fopenmp'"
    compiler.write_text("#!/bin/sh\n"
                        "for a in \"$@\"; do [ \"$a\" = -fopenmp ] && { echo unsupported >&2; exit 1; }; done\n"
                        f"exec \"{shutil.which(CXX)}\" \"$@\"\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert not extension.threaded()
    assert "has no OpenMP (-fopenmp fails): the C++ engine runs on one thread" in capfd.readouterr().err
    for model in (tiny_model(channels=3, num_classes=2, nonlocal_block=True, image_size=(8, 8)),
                  tiny("gated", **MASKED["rgb-4-labels"])):
        cached = fastpixel.sample(model, 2, seed=1, backend="cext", progress=True)
        assert "cext backend (one thread: built without OpenMP)" in capfd.readouterr().err
        assert torch.equal(cached, fastpixel.sample(model, 2, seed=1, fast=False))


# --------------------------------------------------------------------------- ARM64, under an emulator
AARCH64_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


class Recorder:
    """Every call into the engine, with the memory its ops point into before and after: whole
    tensor storages (a view's pointer is its storage and an offset, so views keep aliasing)."""

    def __init__(self):
        self.calls: list[tuple[int, np.ndarray, np.ndarray, list[bytes], list[bytes]]] = []
        self.storages: dict[int, torch.UntypedStorage] = {}  # by address; held, so that no address is reused
        self.starts = self.ends = np.zeros(0, dtype=np.int64)

    def load_engine(self, dtype: torch.dtype):
        run, slots = self.real_load_engine(dtype)

        def recorded(address: ctypes.c_void_p, count: int) -> None:
            ops = np.ctypeslib.as_array((ctypes.c_int64 * (count * slots)).from_address(address.value)).copy()
            where = np.full_like(ops, -1)
            where[ops > 1 << 32] = self.storage(ops[ops > 1 << 32])  # addresses are above 4 GiB, other values below
            starts = sorted(set(where[where >= 0].tolist()))
            ops[where >= 0] -= where[where >= 0]
            before = [ctypes.string_at(start, self.storages[start].nbytes()) for start in starts]
            run(address, count)
            after = [ctypes.string_at(start, self.storages[start].nbytes()) for start in starts]
            where[where >= 0] = [starts.index(start) for start in where[where >= 0]]
            self.calls.append((int(dtype == torch.float64), ops, where, before, after))
        return recorded, slots

    def storage(self, addresses: np.ndarray) -> np.ndarray:
        """The start of the live tensor storage that holds each address."""
        for refresh in (False, True):
            if refresh:
                self.storages.update({s.data_ptr(): s for s in (o.untyped_storage() for o in gc.get_objects()
                                      if issubclass(type(o), torch.Tensor) and o.layout == torch.strided)})
                self.starts = np.array(sorted(self.storages), dtype=np.int64)
                self.ends = self.starts + [self.storages[start].nbytes() for start in self.starts.tolist()]
            at = np.searchsorted(self.starts, addresses, side="right") - 1
            if (at >= 0).all() and (addresses < self.ends[at]).all():
                return self.starts[at]
        raise AssertionError("an op points outside every tensor")

    def write(self, path: Path, slots: int) -> None:
        """The calls as csrc/replay.cpp reads them."""
        with open(path, "wb") as f:
            f.write(np.array([slots, len(self.calls)], dtype=np.int64).tobytes())
            for dtype, ops, where, before, _ in self.calls:
                f.write(np.array([dtype, len(before), len(ops) // slots], dtype=np.int64).tobytes())
                for memory in before:
                    f.write(np.array([len(memory)], dtype=np.int64).tobytes() + memory)
                f.write(ops.tobytes() + where.astype(np.int64).tobytes())


@pytest.mark.skipif(not (shutil.which(AARCH64_CXX) and shutil.which(QEMU)),
                    reason="no ARM64 cross compiler and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user)")
def test_arm64_build_under_qemu_replays_every_engine_call_of_samplings_alike(tmp_path, monkeypatch):
    from tests.test_cext import OPTIONS, test_engine_elu_and_gate_stay_within_a_few_ulps_far_from_zero as elu_and_gate
    from tests.test_masked_families import FAMILIES, OPTIONS as MASKED, run_cached, tiny
    recorder = Recorder()
    recorder.real_load_engine = cext.load_engine
    monkeypatch.setattr(cext, "load_engine", recorder.load_engine)
    for dtype in (torch.float32, torch.float64):
        for options in OPTIONS:
            cached_run(tiny_model(**{"image_size": (8, 8), **options, "dtype": dtype}), 1, 1, "cext")
        for family in FAMILIES:
            for option in ("rgb-4-labels", "codes-300-labels"):
                run_cached(tiny(family, dtype=dtype, **MASKED[option]), 1, 1, "cext")
        elu_and_gate(dtype, 2.0 ** -21 if dtype == torch.float32 else 2.0 ** -50)  # e^x, e^x - 1 over 15 decades
    slots = extension.load().fp_op_slots()
    assert {int(k) for _, ops, *_ in recorder.calls for k in ops[::slots]} == set(range(10)), "not every op kind"
    recorder.write(tmp_path / "calls", slots)

    replay = tmp_path / "replay"
    flags = [flag for flag in extension.FLAGS if flag not in ("-shared", "-fPIC")]
    subprocess.run([AARCH64_CXX, *flags, "-march=armv8-a", extension.OPENMP, "-static", "-o", str(replay),
                    str(ROOT / "csrc" / "replay.cpp"), *map(str, extension.SOURCES)], check=True, timeout=300)
    subprocess.run([QEMU, str(replay), str(tmp_path / "calls"), str(tmp_path / "results")], check=True, timeout=600)
    results = (tmp_path / "results").read_bytes()
    assert len(results) == sum(len(memory) for *_, after in recorder.calls for memory in after)
    at = 0
    for dtype, ops, where, _, after in recorder.calls:
        for memory in after:
            assert results[at:at + len(memory)] == memory  # bit for bit: every sum runs in the same order
            at += len(memory)
    for big in ("calls", "results"):  # about 150 MB; kept when the test fails
        (tmp_path / big).unlink()
