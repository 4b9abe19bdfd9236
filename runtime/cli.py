"""The wrapper every command-line entry point runs its body in (`runtime.run`, `.checkpoint`, `.plan`, `.parity`,
`.bench`, `export.onnx`), so that every CLI ends the same way:

- a flag argparse cannot parse prints one line (`ArgumentParser`) and exits with status 2;
- a `V4Error` (bad input: a file, a flag, a value, a checkpoint) prints one line `error: ...` on stderr and exits
  with status 2 (EXIT_BAD_INPUT);
- a `CollectiveError` (a peer rank died or hung) prints one line and leaves at once with status 1: a normal
  interpreter exit could wait on the broken process group;
- Ctrl-C prints one line and exits with status 130 (128 + SIGINT, what a shell reports);
- with `crash_status`, any other exception (a bug in the runtime, not in the input) prints its traceback, then
  one line, and exits with that status, so a caller can tell a crash from a verdict (runtime.parity).
In a multi-process run (torchrun sets RANK) only rank 0 prints; every rank exits with the same status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .errors import V4Error

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`prog: error: ... (see --help)`, exit status 2) instead of the usage
    block: a mistyped flag is bad input like any other."""

    def error(self, message: str):
        say(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)")
        self.exit(EXIT_BAD_INPUT)


def is_lead() -> bool:
    """True on rank 0 of a torchrun launch, and in a plain one-process run."""
    rank = os.environ.get("RANK", "0").strip()
    return not rank.isdigit() or int(rank) == 0


def say(line: str) -> None:
    """One line on stderr, from rank 0 only."""
    if is_lead():
        print(line, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """The error's message on one line (a message built from another library's text may hold newlines)."""
    return re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__


def run_cli(body: Callable[[], int], crash_status: int | None = None) -> int:
    """Run `body` (which returns the exit status) and map what escapes it to one line and a status."""
    try:
        return body()
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except V4Error as e:
        say(f"error: {one_line(e)}")
        if getattr(e, "leave_at_once", False):
            sys.stdout.flush()
            os._exit(e.exit_status)
        return getattr(e, "exit_status", EXIT_BAD_INPUT)
    except Exception as e:
        if crash_status is None:
            raise
        import traceback

        if is_lead():
            traceback.print_exc()
        say(f"error: internal error ({type(e).__name__}: {one_line(e)[:200]}); this is a bug in dsv4rt, not in "
            f"the input: please report it with the traceback above (exit status {crash_status})")
        return crash_status


def writable_file(path: "str | Path", flag: str) -> Path:
    """`path` if a file can be written there: its folder exists and is writable, and it is not a folder.
    Checked before a long run so its results are not lost at the end."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise V4Error(f"{flag} {path} is a folder; name a file")
    if not parent.is_dir():
        raise V4Error(f"{flag} {path}: folder {parent} does not exist; create it or name another file")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise V4Error(f"{flag} {path} cannot be written (permission denied); name a writable file")
    return path


def writable_folder(path: "str | Path", flag: str) -> Path:
    """`path` if it is, or can be created as, a writable folder: it is not a file and its nearest existing
    ancestor is a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise V4Error(f"{flag} {path} exists and is not a folder; name a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise V4Error(f"{flag} {path}: {probe} is a file, so the folder cannot be created; name another folder")
    if not os.access(probe, os.W_OK):
        raise V4Error(f"{flag} {path} cannot be written (permission denied on {probe}); name a writable folder")
    return path
