"""Writing the run directory so that a kill or a full disk never leaves a file half written: each file is written
under a temporary name in its own folder, flushed to disk, then renamed over the old one (and the folder's
entry flushed too), so a reader finds the old file whole or the new one whole."""

import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"  # what a write killed midway leaves; `remove_temporaries` clears them on resume


def write_atomically(path: Path, write: Callable) -> None:
    """Replace `path` by what `write(file)` writes into a binary file; an OSError names `path`, and leaves it as it
    was."""
    path = Path(path)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode()))


def append_line(path: Path, text: str) -> None:
    """Add lines to a record file (history.jsonl, exposure.jsonl, ...); a kill may cut the last one short, which
    `whole_lines` leaves out."""
    try:
        with open(path, "a") as file:
            file.write(text)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None


def whole_lines(path: Path) -> list:
    """A record file's lines, without a last line cut short by a kill (one with no newline)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    lines = text.split("\n")
    return lines[:-1]  # the piece after the last newline is empty, or a line whose write was cut short


def remove_temporaries(folder: Path) -> list:
    """Remove what interrupted writes left in a folder and its subfolders; returns the paths removed."""
    removed = sorted(Path(folder).rglob("*" + TEMPORARY_SUFFIX))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries, so that a rename survives a power cut as well as a kill."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
