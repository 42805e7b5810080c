"""How much memory this process can still take, counted the way the kernel will enforce it:
the machine's available memory, a container's cgroup limit and the address-space rlimit, the
least of them. Every tool checks its estimate against it before any long work, so that a
request that cannot fit is a one-line refusal instead of an allocation traceback or the OOM
killer."""
from __future__ import annotations

import os
import resource


def refuse_beyond_memory(needed: int, what: str, advice: str) -> None:
    """Raise a ValueError naming both sizes when `needed` bytes exceed what is available."""
    available = available_memory()
    if needed > available:
        raise ValueError(f"{what} needs about {needed / 2**30:.3g} GiB of memory, more than the "
                         f"{available / 2**30:.3g} GiB available here: {advice}")


def available_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int:
    """Bytes this process can still allocate: the least of the machine's MemAvailable, its
    cgroup's limit less its usage (a container's; cgroup v2 or v1), and the address-space
    rlimit (`ulimit -v`) less what the process already maps."""
    rooms = [_meminfo_available(proc), _cgroup_room(proc, cgroups), _rlimit_room(proc)]
    return min(room for room in rooms if room is not None)


def _meminfo_available(proc: str) -> int:
    try:
        with open(f"{proc}/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room(proc: str, cgroups: str) -> int | None:
    """The cgroup's limit less its usage, or None without a limit (or a readable cgroup)."""
    try:
        lines = open(f"{proc}/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files, folders = ("memory.max", "memory.current"), (f"{cgroups}{path}", cgroups)
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            files, folders = ("memory.limit_in_bytes", "memory.usage_in_bytes"), (f"{cgroups}/memory{path}", f"{cgroups}/memory")
        else:
            continue
        for folder in folders:  # the process's own cgroup, or the root a namespaced mount shows
            try:
                limit, usage = (open(f"{folder}/{name}").read().strip() for name in files)
            except OSError:
                continue
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                return max(0, int(limit) - int(usage))
            break
    return None


def _rlimit_room(proc: str) -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open(f"{proc}/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        mapped = 0
    return max(0, soft - mapped)
