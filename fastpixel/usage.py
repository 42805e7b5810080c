"""How the command-line tools read their options and treat a user's mistake: one parser for all
of them (`Parser`: both spellings of every multi-word flag, no guessing from prefixes, defaults
shown in --help), mistakes refused before any long work with one line on stderr and exit code
2, and Ctrl-C or SIGTERM, which end a tool with one line and the shell's exit code (130, 143)
instead of a traceback or a silent death, even while it is still importing torch."""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """The description as written (it holds examples); each option under the names its
    command line gave it (not the other spellings `Parser` adds), and its default after its
    help, unless the help already names it or there is none to name."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        typed = getattr(action, "typed_names", None)
        if typed:
            action = copy.copy(action)
            action.option_strings = list(typed)
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unnamed = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or unnamed or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The command lines' parser. Every multi-word flag takes both spellings (`--batch_size`
    and `--batch-size`); an option is only ever the one typed, never a longer one it begins
    (argparse would read `train -n 32` as `-nl`, and `--nr_fil` as `--nr_filters`); --help
    shows the module's whole docstring and every default."""

    def __init__(self, prog: str, doc: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        kwargs.setdefault("epilog", "Every option of more than one word is also accepted with '-' in place of '_'\n"
                                    "(--batch-size for --batch_size), and the other way round.")
        super().__init__(prog=prog, description=doc, allow_abbrev=False, **kwargs)

    def add_argument(self, *names, **kwargs):
        return _with_both_spellings(super().add_argument, names, kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument
        group.add_argument = lambda *names, **options: _with_both_spellings(plain, names, options)
        return group

    def _get_option_tuples(self, option_string: str):
        # Only an option followed by its value (`-n16`), never a longer option the text begins.
        return [match for match in super()._get_option_tuples(option_string) if option_string.startswith(match[1])]


def _with_both_spellings(add, names: tuple, options: dict) -> argparse.Action:
    spelled = list(names)
    for name in names:
        if isinstance(name, str) and name.startswith("--"):
            for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other not in spelled:
                    spelled.append(other)
    action = add(*spelled, **options)
    action.typed_names = names
    return action


class UsageError(Exception):
    """Bad input from the user (a missing file, an impossible option): not a bug."""


def report(program: str, error: BaseException) -> int:
    """Print `error` as one line after the program's name; return the exit code 2."""
    print(f"{program}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def is_special_file(path: str | os.PathLike) -> bool:
    """Whether `path` exists as neither a regular file nor a folder (/dev/null, a FIFO): such a
    path is written into, never replaced (io.checkpoint.write_atomically)."""
    path = Path(path)
    return path.exists() and not path.is_file() and not path.is_dir()


def check_writable(name: str, option: str, directory: bool = False, parents: bool = False,
                   suffix: str | None = None, what: str = "") -> Path:
    """`name` as a Path, once it is clear that a file (or with `directory`, a folder) can be
    written there: folders that do not exist yet are created later when `parents` (always for
    a directory), and must exist otherwise; with `suffix`, `what` is written there, so the name
    must end in it (a special file aside). Raises a UsageError that says why not (a name
    longer than the file system allows among them)."""
    try:
        return _check_writable(name, option, directory, parents, suffix, what)
    except OSError as err:  # os.stat of a name too long for the file system, a folder we may not enter
        raise UsageError(f"cannot write {name}: {err.strerror or err}") from None


def _check_writable(name: str, option: str, directory: bool, parents: bool, suffix: str | None, what: str) -> Path:
    if name == "":
        raise UsageError(f"{option} must not be empty")
    path = Path(name)
    if path.exists() and path.is_dir() != directory:
        raise UsageError(f"{option} {path} is {'not ' if directory else ''}a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {path}: it is read-only")
    if is_special_file(path):
        return path
    if suffix is not None and path.suffix.lower() != suffix:
        raise UsageError(f"{option} {name}: {what} is written there; give it a {suffix} name")
    folder = Path(os.path.realpath(path)).parent if path.is_symlink() else (path if directory else path.parent)
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


def leave_process_group(code: int) -> None:
    """End a `torchrun` rank after its work is written: destroy the process group, flush the
    output and exit with `code` without finalising the interpreter.

    Why not a plain return: DistributedDataParallel keeps gloo's worker threads alive past
    destroy_process_group (torch joins them only when the group object is freed, and the
    reducer holds it), and a worker that drops its last collective's tensors after the main
    thread has begun finalising must take the GIL for them; Python 3.11 answers that with
    pthread_exit, which ends in std::terminate ("terminate called without an active
    exception", SIGABRT) after a complete run. Nothing this process needs runs at
    finalisation: its files are written and closed, and stdout and stderr are flushed here."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: a tool stops the same way, with its
    files closed, its partial outputs removed and its lock released, instead of dying at once."""


def stop_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code a shell gives the signal behind `interrupt`: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def report_stop(program: str, interrupt: KeyboardInterrupt, outcome: str = "nothing was written") -> int:
    """Print which signal stopped the tool, and `outcome`, as one line; return `stop_code`."""
    code = stop_code(interrupt)
    print(f"{program}: stopped by {signal.Signals(code - 128).name}; {outcome}", file=sys.stderr)
    return code


_held = [0, None]  # [depth of signals_held(), the signal that arrived inside it]


def _raise_stop(signum, frame) -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM Terminated, unless signals_held() is keeping
    them: then the stop waits for its end."""
    if _held[0]:
        _held[1] = signum
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def signals_held():
    """Within: a Ctrl-C or SIGTERM that arrives stops the tool only when the block ends.

    Why: Python runs signal handlers between bytecodes, also in Python code that a C++
    library is calling back, and an exception raised there can end in std::terminate, the
    process killed by SIGABRT without a word (Triton's first import, which PyTorch triggers
    on first meta-device work, did that under a SIGTERM). Hold them around such work."""
    _held[0] += 1
    try:
        yield
    finally:
        _held[0] -= 1
        if not _held[0] and _held[1] is not None:
            signum, _held[1] = _held[1], None
            _raise_stop(signum, None)


def _stopped_while_importing(signum, frame) -> None:
    print(f"fastpixel: stopped by {signal.Signals(signum).name} while starting; nothing was written", file=sys.stderr)
    os._exit(128 + signum)


def quiet_interrupt_while_importing() -> None:
    """Under `python -m fastpixel.<tool>` (Python sets sys.argv[0] to "-m" while it imports the
    package), make Ctrl-C or SIGTERM before the tool's main() end quietly with one line;
    `stops_raise` undoes it."""
    command = getattr(sys, "orig_argv", [])
    tool = command[command.index("-m") + 1] if "-m" in command[:-1] else ""
    if sys.argv[:1] == ["-m"] and tool.startswith("fastpixel."):
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                signal.signal(signum, _stopped_while_importing)


@contextlib.contextmanager
def stops_raise():
    """Within: Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated, which each tool's main()
    turns into one line and the shell's exit code; the handlers before are restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    before = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in before.items():
            unset = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, unset if handler is _stopped_while_importing else handler)
