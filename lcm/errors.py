"""Errors that are the user's to fix, and how the entry points report them.

A `UserError` is a problem with what the user gave (config, data folder, model, LoRA, disk): the entry points
(`lcm` and the train scripts) print it as one line naming what to change and exit with status 2. Anything else is a
bug and keeps its traceback. `LCM_DEBUG=1` shows the traceback for user errors too.

Subclass `UserError` (together with the built-in class callers already catch, e.g. `ValueError`) rather than
catching errors by message.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

DEBUG_ENV = "LCM_DEBUG"
USER_ERROR_EXIT = 2  # argparse's status for a bad command line; ours for every other mistake of the same kind


class UserError(Exception):
    """Base class: a mistake in the input that the message says how to fix (exit status 2, no traceback)."""


class DataError(UserError, ValueError):
    """The data source cannot be used as configured (no such folder, no usable image, missing column, …)."""


class LoraMismatchError(UserError, ValueError):
    """A LoRA that does not fit the base model it is loaded into (other base, other rank, missing modules)."""


class ModelError(UserError, ValueError):
    """A base model that cannot be loaded as given (e.g. a single checkpoint file without its configs)."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A path the user gave (a checkpoint to resume, a run folder to export) is not there or not complete."""


class WriteError(UserError, OSError):
    """Writing a checkpoint or an export failed (a full disk, a quota, permissions); says where and how much is free."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def exit_on_user_error(main: Callable[[], Optional[int]], prog: Optional[str] = None) -> int:
    """Run an entry point: a `UserError` becomes one line on stderr and status 2 (plus the traceback with
    LCM_DEBUG=1); any other exception propagates with its traceback, as a bug should."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main() or 0
    except UserError as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_EXIT


# --- write failures -------------------------------------------------------------------------------------------------

# What torch's zip writer and safetensors raise when the disk fills up: not OSError, so matched by message. torch:
# "[enforce fail at inline_container.cc:…] . unexpected pos …" / "PytorchStreamWriter failed writing file …";
# safetensors: "Error while serializing: IoError(…)" / "… (os error 28)".
_IO_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|IoError|I/O error|os error \d+|"
                         r"No space left|Disk quota", re.IGNORECASE)


def is_write_failure(err: BaseException) -> bool:
    """True for an OSError, or a library error whose message is an I/O failure (torch's and safetensors' writers)."""
    return isinstance(err, OSError) or bool(_IO_FAILURE.search(str(err)))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path) -> str:
    """'1.2 GiB free on /mount' for the file system holding `path` (its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return f"{_human_bytes(shutil.disk_usage(where).free)} free on {where}"
    except OSError:
        return f"free space on {where} unknown"


_RESUME_HINT = " — free some space, then resume with --resume latest"


@contextlib.contextmanager
def write_guard(path, last_good: Optional[str] = None) -> Iterator[None]:
    """Turn a failed write under `path` into a `WriteError` naming the path, the free space and, when given, the
    last good checkpoint (`last_good`); a `WriteError` from an inner guard gains `last_good` if it lacked it."""
    try:
        yield
    except WriteError as err:
        if last_good is None or "last good checkpoint" in str(err):
            raise
        raise WriteError(f"{err}; last good checkpoint: {last_good}{_RESUME_HINT}") from err.__cause__
    except Exception as err:  # noqa: BLE001 — only write failures are converted; anything else re-raises as is
        if not is_write_failure(err):
            raise
        detail = one_line(err)
        message = f"could not write {path}: {type(err).__name__}: {detail} ({free_space(path)})"
        if last_good is not None:
            message += f"; last good checkpoint: {last_good}{_RESUME_HINT}"
        raise WriteError(message) from err
