"""Checks of the lab commands' output paths, made before any work starts (no torch).

A sweep trains for minutes before it writes its report; a ``--out`` that is a file, a
``--json`` that is a folder or a folder nobody may write to must be refused before the
first run, not after the last. Each check raises :class:`OutputPathError` with one line:
the option, the path, what is wrong and the way out. Nothing is created or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputPathError

__all__ = [
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "check_report_outputs",
    "check_store_path",
]


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _creatable(path: Path, option: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder
    (the commands create missing parent folders)."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputPathError(
            f"{option} {path}: {base} is a file, so no folder can be made under it; "
            "pass another path"
        )
    if not _writable(base):
        raise OutputPathError(
            f"{option} {path}: the folder {base} is not writable; pass a path you can write to"
        )


def check_output_dir(path: str | Path, option: str) -> Path:
    """``path`` can be used (or created) as an output folder; returns it as a Path."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise OutputPathError(
                f"{option} {p}: is a file, not a folder; {option} names the folder the "
                "files are written to. Pass a folder path"
            )
        if not _writable(p):
            raise OutputPathError(
                f"{option} {p}: the folder is not writable; pass a folder you can write to"
            )
        return p
    _creatable(p, option)
    return p


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` can be written (or created) as a file; returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(
            f"{option} {p}: is a folder; {option} needs a file path such as "
            f"{p / 'summary.json' if option == '--json' else p / 'results.csv'}"
        )
    if p.exists():
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{option} {p}: the file is not writable; pass another path")
        return p
    _creatable(p, option)
    return p


def check_report_outputs(out: str | Path, json: str | Path | None) -> None:
    """A report's ``--out`` folder and optional ``--json`` file can be written."""
    check_output_dir(out, "--out")
    if json:
        check_output_file(json, "--json")


def check_store_path(path: str | Path, *, write: bool, option: str = "--db") -> Path:
    """``path`` can hold a run store: written by a sweep (``write``; SQLite also writes a
    journal beside it, so its folder must be writable) or read by ``report``/``compare``."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(
            f"{option} {p}: is a folder; a run store is a file (e.g. {p / 'normlab-sweep.db'})"
        )
    folder = p.absolute().parent
    if not write:
        if p.exists() and not os.access(p, os.R_OK):
            raise OutputPathError(f"{option} {p}: the file is not readable (permissions)")
        return p
    if not folder.exists():
        raise OutputPathError(
            f"{option} {p}: the folder {folder} does not exist; create it or pass another path"
        )
    if not folder.is_dir():
        raise OutputPathError(f"{option} {p}: {folder} is a file, not a folder")
    if not _writable(folder):
        raise OutputPathError(
            f"{option} {p}: the folder {folder} is not writable (the store and SQLite's "
            "journal are written there); pass a path you can write to"
        )
    if p.exists() and not os.access(p, os.R_OK | os.W_OK):
        raise OutputPathError(f"{option} {p}: the store is not writable (permissions)")
    return p
