"""Atomic writes: a file or folder appears whole under its name, or not at all.

A write goes to a temporary name beside the target and is renamed over it only once it is
complete, so a full disk or a crash leaves the previous file (or no file), never half a new
one. An ``OSError`` while writing becomes a :class:`FeditError` naming the path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedit.errors import FeditError


def _write_error(path: Path, e: OSError) -> FeditError:
    return FeditError(f"cannot write {path}: {e.strerror or e}; the previous file (if any) is unchanged.",
                      "free disk space, check the folder's permissions, or choose another path.")


def replace_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: Path) -> None:
    """Remove a temporary file if it is there; a folder that went away (or became a file) under
    it must not hide the write error."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return replace_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def check_writable_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file, or that fedit could not create or write to."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise FeditError(f"{flag} {path} is a file, not a folder.", "give a new folder path.")
    _check_creatable(path, flag)
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """Refuse ``path`` when its nearest existing ancestor is not a folder fedit may write in."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FeditError(f"cannot write {flag} {path}: {parent} is not a writable folder.",
                         "choose a path you can write to.")


def check_out_folder(folder: str | os.PathLike, marker: str) -> Path:
    """Refuse an output folder that is a file, not writable, or holds files fedit did not write
    (no ``marker`` file in it): call before the work, so a bad ``--out`` fails first and
    overwrites nothing."""
    path = check_writable_folder(folder)
    if path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise FeditError(f"--out {path} already holds files that fedit did not write; they would be replaced.",
                         "give a new or empty folder, or one an earlier fedit --out wrote.")
    return path


def check_out_file(path: str | os.PathLike, flag: str = "--save") -> Path:
    """Refuse an output file path that is a folder or lies in a folder fedit cannot write to;
    call before the work."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise FeditError(f"{flag} {p} is a folder, not a file.", f"give a file path, e.g. {p / 'edit.safetensors'}.")
    _check_creatable(p.parent, flag)
    return p


@contextmanager
def new_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``folder`` (the old one is
    removed only after the new one is complete); on failure it is removed and ``folder`` kept."""
    dest = Path(folder).expanduser()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old.exists():
                os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(dest, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
