"""How many threads the C++ engine's draw takes: one per core that no other program is
running on, chosen again before every row, never more than torch's thread count.

Why: OpenMP threads meet at a barrier after every parallel product, and a thread whose core
another program holds arrives a time slice late. With one of two cores busy, two threads
drew the bundled model's 16 digits 20 to 100 times slower than one thread; on idle cores two
are faster. The count changes no image: each output of a product is summed by one thread,
in one order, whatever the number of threads."""
from __future__ import annotations

import os
from typing import Iterator

import torch


def busy_elsewhere(proc: str = "/proc") -> int | None:
    """Threads of other processes running or waiting for a core right now (Linux's count of
    runnable threads, less this process's own), or None where the system does not say."""
    try:
        with open(f"{proc}/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        ours = 0
        for task in os.listdir(f"{proc}/self/task"):
            with open(f"{proc}/self/task/{task}/stat") as f:
                stat = f.read()
            ours += stat[stat.rindex(")") + 2] == "R"  # the state follows the parenthesised name
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - ours)


def idle_cores() -> int | None:
    """Cores this process may use that no other program is running on, or None if unknown."""
    busy = busy_elsewhere()
    return None if busy is None else max(0, len(os.sched_getaffinity(0)) - busy)


def on_idle_cores(rows: Iterator[int], device: torch.device, engine: str) -> Iterator[int]:
    """Run the generator `rows` (a row of a draw per step) with one thread per idle core (at
    least one, at most torch's count before), chosen before each row; torch's count is
    restored after. Only for the C++ engine (`engine` "cext"), which sums each output in one
    order whatever the count: PyTorch's libraries need not (on the project's AMD EPYC VM, a
    codec stream the PyTorch engine encoded with two threads did not decode with one), so
    their draws keep torch's count, as does work on a GPU."""
    most = torch.get_num_threads()
    if device.type != "cpu" or engine != "cext" or most == 1:
        yield from rows
        return
    try:
        while True:
            idle = idle_cores()
            torch.set_num_threads(most if idle is None else min(most, max(1, idle)))
            try:
                row = next(rows)
            except StopIteration:
                return
            yield row
    finally:
        torch.set_num_threads(most)
