"""One description of the machine for every benchmark file: the CPU's model and its vector
extensions (numbers are compared only within one machine), its cores, and the software,
from /proc/cpuinfo where there is one."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# vector extensions worth naming: /proc/cpuinfo's "flags" on x86, "Features" on ARM
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "asimd", "sve")


def describe_machine() -> dict:
    """The CPU's model and vector extensions, the cores, and the software, as a record."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return dict(cpu=cpu, vector_extensions=[f for f in VECTOR_FLAGS if f in flags], cores=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                system=f"{platform.system()} {platform.release()}")


def machine_line(described: dict | None = None) -> str:
    """The same record as one line, for a results file's header."""
    m = described or describe_machine()
    vectors = " ".join(m["vector_extensions"]) or "none listed"
    return (f"{m['cpu']}, {m['cores']} cores, vector extensions {vectors}; {m['system']}, Python {m['python']}, "
            f"torch {m['torch']} ({m['threads']} threads)")
