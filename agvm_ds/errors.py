"""Failures that come from outside the program, their exit codes, and the one line that reports them.

Why one place: a full disk, a read-only mount, a truncated file or a peer rank that died are not
bugs, so a user should see one line naming the cause and the path, on every rank that has something
to say, and a script should be able to tell them apart by exit status; every command (agvm-train,
agvm-eval, agvm-predict, agvm-export, agvm-plot, agvm-model-info) uses the one table below and lists
it in its ``--help``. A traceback is printed only with ``--debug`` or ``AGVM_DEBUG=1``; an error
that is none of these is a bug and keeps its traceback (exit status 1).
"""
from __future__ import annotations

import argparse
import enum
import errno
import os
import sys
import traceback
from typing import Callable, Optional

__all__ = ["CorruptFile", "ExitCode", "FileAccessFailed", "NoSpace", "OutsideFault", "PeerFailed", "ResumeRefused",
           "RunDirLocked", "add_exit_codes", "classify", "debug_enabled", "exit_codes_help", "report", "run_command"]


class ExitCode(enum.IntEnum):
    """Exit statuses of every agvm command; each one's ``--help`` line is in ``_MEANINGS``."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    DIVERGED = 3
    RESUME_REFUSED = 4
    RUN_DIR_LOCKED = 5
    NO_SPACE = 6
    FILE_ACCESS = 7
    PEER_FAILED = 8
    TERMINATED = 143


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "an unexpected error (a bug: its traceback is printed); agvm-predict: some images could "
                     "not be read (each is named)",
    ExitCode.BAD_INPUT: "bad input: an argument, the config, or a file it names is missing, truncated or not what "
                        "it should be (the line names the file)",
    ExitCode.DIVERGED: "agvm-train: training diverged (the loss stayed non-finite); checkpoints are kept",
    ExitCode.RESUME_REFUSED: "agvm-train: --resume refused: keys that cannot change differ from the "
                             "checkpoint's config",
    ExitCode.RUN_DIR_LOCKED: "agvm-train: another job holds the output directory (its lock names the holder)",
    ExitCode.NO_SPACE: "no space left on the device (or over quota, or over the file-size limit) while writing",
    ExitCode.FILE_ACCESS: "a file or directory cannot be written or read: permission denied, read-only file "
                          "system, I/O error",
    ExitCode.PEER_FAILED: "agvm-train: this rank stopped because another rank failed (that rank names the cause)",
    ExitCode.TERMINATED: "stopped by SIGTERM (128 + 15), e.g. by the launcher or the scheduler",
}


class OutsideFault(Exception):
    """A failure whose cause is outside the program; ``str()`` is the one line that names cause and path."""

    code: ExitCode = ExitCode.FAILED
    #: say nothing: the same failure is reported by another rank
    quiet: bool = False

    def __init__(self, message: str, code: Optional[ExitCode] = None, quiet: bool = False) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.quiet = quiet


class CorruptFile(OutsideFault, ValueError):
    """A file to read is truncated or not what it should be (a ValueError, as bad input always was)."""

    code = ExitCode.BAD_INPUT


class ResumeRefused(OutsideFault, ValueError):
    code = ExitCode.RESUME_REFUSED


class RunDirLocked(OutsideFault):
    code = ExitCode.RUN_DIR_LOCKED


class NoSpace(OutsideFault):
    code = ExitCode.NO_SPACE


class FileAccessFailed(OutsideFault):
    code = ExitCode.FILE_ACCESS


class PeerFailed(OutsideFault):
    """This rank stops because another one failed; the failing rank reports the cause itself."""

    code = ExitCode.PEER_FAILED


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (over the file-size limit)"}
_ACCESS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}
_MISSING = {errno.ENOENT: "no such file or directory", errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory"}
#: what gloo and NCCL say when the rank at the other end of a collective is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "Socket Timeout", "Timed out waiting")


def _os_line(error: OSError) -> str:
    cause = _NO_SPACE.get(error.errno) or _ACCESS.get(error.errno) or _MISSING.get(error.errno) or error.strerror
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"{where}: {cause}" if where else f"{cause} ({error})"


def classify(error: BaseException) -> Optional[tuple[ExitCode, str]]:
    """The exit code and one line for a failure from outside the program, or None for a bug.

    ValueErrors are bad input: the config checks and file readers word them to name the key or file.
    """
    if isinstance(error, OutsideFault):
        return error.code, str(error)
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _NO_SPACE:
            return ExitCode.NO_SPACE, _os_line(error)
        if error.errno in _ACCESS:
            return ExitCode.FILE_ACCESS, _os_line(error)
        return ExitCode.BAD_INPUT, _os_line(error)
    if isinstance(error, (ValueError, OSError)):
        return ExitCode.BAD_INPUT, str(error).strip() or type(error).__name__
    text = str(error)
    if isinstance(error, RuntimeError) and any(sign in text for sign in _PEER_GONE):
        return ExitCode.PEER_FAILED, ("stopped: another rank failed or vanished during a collective "
                                      f"({_first_line(text)}); that rank's own message names the cause")
    return None


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def debug_enabled() -> bool:
    """``--debug`` (which sets it) or ``AGVM_DEBUG=1``: print tracebacks of outside failures too."""
    return os.environ.get("AGVM_DEBUG", "") not in ("", "0")


def report(prog: str, error: BaseException, rank_prefix: str = "") -> int:
    """Prints the one line for ``error`` (its traceback first under debug) and returns its exit code;
    re-raises an error that is a bug, so that it keeps its traceback."""
    known = classify(error)
    if known is None:
        raise error
    if debug_enabled():
        traceback.print_exception(error)
    code, line = known
    if not getattr(error, "quiet", False):
        from tqdm import tqdm

        tqdm.write(f"{prog}: {rank_prefix}{line}", file=sys.stderr)  # on its own line, below a progress bar
    return int(code)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """``body()``, with any outside failure reported as one line and its exit code."""
    try:
        return body()
    except Exception as error:  # noqa: BLE001 - report() re-raises the ones that are bugs
        return report(prog, error)


def exit_codes_help() -> str:
    """The exit-code table every command's ``--help`` ends with."""
    rows = "\n".join(f"  {int(code):>3}  {_MEANINGS[code]}" for code in ExitCode)
    return (f"exit codes (shared by all agvm commands):\n{rows}\n\n"
            "--debug or AGVM_DEBUG=1 adds tracebacks to these errors.")


def add_exit_codes(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--debug`` and the exit-code table to a command's parser."""
    parser.add_argument("--debug", action=_DebugAction, help="print tracebacks of outside failures too (AGVM_DEBUG=1)")
    parser.epilog = "\n\n".join(filter(None, (parser.epilog, exit_codes_help())))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


class _DebugAction(argparse.Action):
    """Sets AGVM_DEBUG, so that the ranks and helpers started from here see it too."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ["AGVM_DEBUG"] = "1"
        setattr(namespace, self.dest, True)

