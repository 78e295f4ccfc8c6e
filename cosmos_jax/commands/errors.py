"""One error convention for every command: `error: <one line naming the flag or file>` on stderr, exit status 2.

Commands raise ValueError (every project error class derives from it) or OSError for bad input; `cli.main`
catches them and prints them with `report`. Checks that need no model run before anything is loaded:
`output_path` (the output can be written), `input_path` (an input exists), `finite` (a number flag),
`no_symlink_loops` (a folder to copy does not contain itself).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
HANDLED = (ValueError, OSError, NotImplementedError)
_MAX_CHARS = 400


def one_line(error: BaseException) -> str:
    """The message of `error` on one line: an OSError as `strerror: filename`, newlines folded, at most 400 chars."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        name = str(error.filename)
        if len(name) > 160:
            name = f"{name[:70]}...{name[-70:]}"
        text = f"{error.strerror}: {name}"
    else:
        text = str(error) or type(error).__name__
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 3] + "..."


def report(error: BaseException | str) -> int:
    """Print `error: <one line>` to stderr; return the usage exit status (2)."""
    message = error if isinstance(error, str) else one_line(error)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def input_path(path: str | os.PathLike | None, flag: str, *, folder: bool | None = False) -> None:
    """`path` exists: a file (folder=False), a folder (True) or either (None); ValueError naming `flag`."""
    if path is None:
        return
    p = Path(path)
    if folder is None:
        ok, kind = p.exists(), "path"
    elif folder:
        ok, kind = p.is_dir(), "folder"
    else:
        ok, kind = p.is_file(), "file"
    if not ok:
        raise ValueError(f"{flag}: {kind} not found: {path}")


def output_path(path: str | os.PathLike, flag: str, *, overwrite: bool | None = None) -> None:
    """The output `path` can be created: its nearest existing ancestor is a writable folder. `overwrite`
    False refuses an existing `path` (naming --overwrite); None lets an existing file be replaced."""
    p = Path(os.path.abspath(path))
    if p.exists() and overwrite is False:
        raise ValueError(f"{flag}: {path} already exists; pass --overwrite to replace it")
    if p.is_dir() and overwrite is None:
        raise ValueError(f"{flag}: {path} is a folder; give a file path")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag}: cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write {path}: folder {parent} is not writable")


def finite(value: float | None, flag: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> None:
    """`value` is a finite number in [low, high] ((low, high] with low_open); ValueError naming `flag`."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ValueError(f"{flag} must be <= {high:g}, got {value:g}")


def no_symlink_loops(folder: str | os.PathLike, flag: str) -> None:
    """No symlink inside `folder` points at a folder that contains it (copying would recurse forever)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            link = Path(root) / name
            if not link.is_symlink():
                continue
            target = Path(os.path.realpath(link))
            if target in Path(os.path.realpath(root)).parents or target == Path(os.path.realpath(root)):
                raise ValueError(f"{flag}: symlink loop: {link} points to {os.readlink(link)}, a folder holding it")
