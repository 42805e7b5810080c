"""How the command-line tools treat a user's mistake: refused before any long work, with one
line on stderr and exit code 2; and Ctrl-C while they are still importing torch, which ends
quietly with exit code 130 instead of a traceback."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user (a missing file, an impossible option): not a bug."""


def report(program: str, error: BaseException) -> int:
    """Print `error` as one line after the program's name; return the exit code 2."""
    print(f"{program}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def check_writable(name: str, option: str, directory: bool = False, parents: bool = False) -> Path:
    """`name` as a Path, once it is clear that a file (or with `directory`, a folder) can be
    written there: folders that do not exist yet are created later when `parents` (always for
    a directory), and must exist otherwise. Raises a UsageError that says why not."""
    if name == "":
        raise UsageError(f"{option} must not be empty")
    path = Path(name)
    if path.exists() and path.is_dir() != directory:
        raise UsageError(f"{option} {path} is {'not ' if directory else ''}a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {path}: it is read-only")
    folder = path if directory else path.parent
    if not (parents or directory) and not folder.is_dir():
        raise UsageError(f"cannot write {path}: directory {folder} does not exist")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot write {path}: {existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror} ({existing})") from None
    return path


def _interrupted_while_importing(signum, frame) -> None:
    print("fastpixel: interrupted while starting; nothing was written", file=sys.stderr)
    os._exit(130)


def quiet_interrupt_while_importing() -> None:
    """Under `python -m fastpixel.<tool>` (Python sets sys.argv[0] to "-m" while it imports the
    package), make Ctrl-C before the tool's main() end quietly; `interrupts_raise` undoes it."""
    command = getattr(sys, "orig_argv", [])
    tool = command[command.index("-m") + 1] if "-m" in command[:-1] else ""
    if (sys.argv[:1] == ["-m"] and tool.startswith("fastpixel.")
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _interrupted_while_importing)


def interrupts_raise() -> None:
    """Ctrl-C raises KeyboardInterrupt again (each tool's main() handles it)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)
