"""Atomic writes: every file and folder the project writes goes through here.

Why one module: a reader (the server, QuPath, a resumed run) must never see half a file, an
interrupted write must leave the previous version intact and no temporary file behind, and
outputs must get the mode a plain ``open()``/``mkdir()`` gives (a service account must be able
to read a bundle). Each write goes to a uniquely named temporary file or folder beside the
target, which ``os.replace`` then moves into place; on any failure the temporary is removed.
``durable=True`` also flushes the data to disk (fsync) before the rename and the folder entry
after it, for what is expensive to lose: bundles, checkpoints and QuPath projects.

Imports nothing but the standard library, so every layer (serving, training, export) may use it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# tempfile.mkstemp/mkdtemp create their files 0o600/0o700, and os.replace keeps that mode, so
# every output would be readable by its owner only. These create them with the mode a plain
# open()/mkdir() gives: 0o666/0o777 passed to the kernel, which applies the umask (and a
# folder's default ACL) itself. Reading the umask instead (os.umask(0); os.umask(m)) would be a
# race: it is process-wide, so another thread (server workers, data loaders) creating a file in
# that window would get umask 0; and a value cached at import would miss a later umask change.
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
TEMP_MARK = ".tmp"  # every temporary name holds it (bundle manifests skip such files)


def _unique_temp(
    dir: str | os.PathLike[str], prefix: str, suffix: str, create: Callable[[str], Any]
) -> tuple[Any, str]:
    base = os.path.abspath(os.fspath(dir))
    for _ in range(100):
        name = os.path.join(base, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return create(name), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name {prefix}*{suffix} in {base}")


def mkstemp_umask(dir: str | os.PathLike[str], prefix: str = "tmp", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode ``open()`` gives (0o666 & ~umask), not 0o600."""
    return _unique_temp(dir, prefix, suffix, lambda name: os.open(name, _TEMP_FLAGS, 0o666))


def mkdtemp_umask(dir: str | os.PathLike[str], prefix: str = "tmp", suffix: str = "") -> str:
    """``tempfile.mkdtemp`` with the mode ``mkdir()`` gives (0o777 & ~umask), not 0o700."""
    return _unique_temp(dir, prefix, suffix, lambda name: os.mkdir(name, 0o777))[1]


def is_temporary(path: Path) -> bool:
    """A name this module gives its temporaries (hidden, holding ``.tmp``)."""
    return path.name.startswith(".") and TEMP_MARK in path.name


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.name == "nt" and Path(path).is_dir():  # Windows cannot open folders; NTFS journals them
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (files first), then ``folder`` itself."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


def atomic_write(path: Path, write: Callable[[Path], None], *, durable: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place.

    The temporary keeps ``path``'s suffix (writers that pick a format by it, like
    ``cv2.imwrite``, still work). The file ends with the mode a plain ``open()`` would give it,
    also when ``write`` replaces ``tmp`` rather than writing into it (safetensors'
    ``save_file`` saves through its own 0o600 temporary file and a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = mkstemp_umask(path.parent, prefix=f".{path.name}.", suffix=f"{TEMP_MARK}{path.suffix}")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what open() gave: the umask, read race-free
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write, durable=durable)


def write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write, durable=durable)


def write_json(path: Path, data: Any, *, indent: int = 1, durable: bool = False) -> None:
    """JSON (strict: NaN/inf refused) written atomically, with a final newline."""
    write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n", durable=durable)


def replace_dir(stage: Path, dest: Path, *, backup: Path | None = None, durable: bool = False) -> None:
    """Move the finished folder ``stage`` to ``dest``. An existing ``dest`` goes to ``backup``
    (kept) or, without one, to a hidden name that is removed once the new folder is in place.
    ``durable``: every file in ``stage`` reaches the disk before anything is renamed."""
    stage, dest = Path(stage), Path(dest)
    if durable:
        fsync_tree(stage)
    old = backup
    if dest.exists():
        if old is None:
            old = Path(mkdtemp_umask(dest.parent, prefix=f".{dest.name}.", suffix=".old"))
            os.rmdir(old)  # only the unique name is wanted: rename() needs the target absent
        os.replace(dest, old)
        try:
            os.replace(stage, dest)
        except BaseException:
            os.replace(old, dest)  # put the previous folder back
            raise
    else:
        os.replace(stage, dest)
    if durable:
        fsync_path(dest.parent)
    if backup is None and old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(dest: Path, *, durable: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` (the mode ``mkdir()`` gives) to build into;
    it replaces ``dest`` when the block ends normally and is removed when it raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(mkdtemp_umask(dest.parent, prefix=f".{dest.name}.", suffix=TEMP_MARK))
    try:
        yield stage
        replace_dir(stage, dest, durable=durable)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
