"""How the command-line tools report a user's mistake: one line on stderr, exit code 2."""
from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad input from the user (a missing file, an impossible option): not a bug."""


def report(program: str, error: BaseException) -> int:
    """Print `error` as one line after the program's name; return the exit code 2."""
    print(f"{program}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2
