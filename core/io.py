"""Files that matter, written and read one way.

`atomic_write` writes a temp file beside the target, fsyncs it, renames it over the target and fsyncs
the folder: readers, and runs killed with -9, never see a partial file. The file gets the permissions
`open()` would give it (0o666 less the umask), so the rest of a lab's group can read stores, results
and checkpoints. A full disk (ENOSPC, or EDQUOT: over quota) is one `DiskFullError` naming the file, the
bytes it tried to write and the bytes free there; the temp file is removed and the previous file is left
as it was. Give the size (`atomic_write_bytes`, or `size=`) where it is known: serialise to memory first
(torch.save into a BytesIO), so the message is exact and no library wraps the OSError in its own error.
Readers of user files raise `ConfigError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from stacktrain.errors import ConfigError, DiskFullError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "build_once",
           "current_umask", "disk_full", "hold_dir", "make_dir", "is_disk_full", "read_json", "read_toml",
           "remove_stale_temps"]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def disk_full(path: str | Path, size: int, at_least: bool = False) -> DiskFullError:
    """The one message of a full disk: the file, what it needed, what is free on its filesystem."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    need = f"{'at least ' if at_least else ''}{_size(size)}"
    return DiskFullError(f"{path}: disk full writing it ({need} to write, {_size(free)} free on that filesystem); "
                         f"free at least {_size(max(size - free, 1))} there and rerun the same command (the "
                         f"previous {path.name}, if any, is unchanged)")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, size: int | None = None) -> None:
    """Call `write(f)` on a temp file beside `path`, then make it `path` in one rename. `size`: the bytes
    `write` writes, when known (named if the disk is full; else the bytes written before it filled)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0o600; give what open() gives
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if not is_disk_full(e):
            raise
        written = _unlink(tmp)
        raise disk_full(path, size if size is not None else written, at_least=size is None) from None
    finally:
        _unlink(tmp)


def _unlink(tmp: str | None) -> int:
    """Remove a temp file (if any); return how many bytes it held."""
    if tmp is None:
        return 0
    try:
        written = os.path.getsize(tmp)
        os.unlink(tmp)
        return written
    except OSError:
        return 0


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    atomic_write(path, lambda f: f.write(data), size=len(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_write_csv(path: str | Path, rows: Iterable[Iterable[Any]]) -> None:
    """Rows (the header first) as a CSV file with "\n" line ends, atomically."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def build_once(final: str | Path, marker: str) -> Iterator[Path | None]:
    """A cached folder built once, never seen partial: yields None when `final/marker` exists, else a
    fresh staging folder beside `final` that is renamed into place when the block ends without error.
    When a concurrent builder renamed its copy first (pytest -n 2), that copy is kept."""
    final = Path(final)
    if (final / marker).exists():
        yield None
        return
    staging = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        try:
            os.rename(staging, final)
        except OSError:  # another process finished first: use its copy
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_text(path: Path, what: str) -> str:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the {what.removesuffix(' file')} file itself")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_toml(path: str | Path, what: str = "TOML file") -> dict[str, Any]:
    """A TOML file as a dict, or one ConfigError naming the file (missing, a folder, not TOML)."""
    path = Path(path)
    try:
        return tomllib.loads(_read_text(path, what))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid TOML ({e})") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file, or one ConfigError naming the file."""
    path = Path(path)
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid JSON ({e})") from None


LOCK_NAME = ".lock"


def remove_stale_temps(folder: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temp files `atomic_write` left in `folder` when a process was killed mid-write (its own
    cleanup never ran). Call it only while holding `folder` (`hold_dir`): no live writer owns them then;
    in a folder that live processes share, pass `older_than_s` longer than any one write takes."""
    removed = []
    now = time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if older_than_s and now - tmp.stat().st_mtime < older_than_s:
                continue
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def make_dir(folder: Path, what: str) -> bool:
    """Create `folder` (and parents) unless it exists; a file, /dev/null or an unwritable parent in its
    place is one ConfigError line naming it. True when this call created it."""
    created = not folder.exists()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: is a file, not a folder; give a {what} path that is a folder (or new)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file (/dev/null/run), read-only, ...
        raise ConfigError(f"{folder}: cannot make or use it as the {what} folder ({e.strerror}); give a {what} "
                          "path under a writable folder") from None
    return created


@contextlib.contextmanager
def hold_dir(folder: str | Path, what: str, busy: Callable[[Path], str]) -> Iterator[Path]:
    """Hold `folder` (created if missing) for this process with an exclusive lock on `folder/.lock`, then
    remove the temp files a killed writer left in it. Another process gets `RunBusyError(busy(folder))` at
    once. The lock is a POSIX record lock (lockf): the kernel drops it when the process dies (kill -9
    included), and forked children (loader workers, which can outlive a killed parent) never hold it, so
    there is no stale lock to clear. A folder this call created and that holds nothing but the lock on exit
    is removed again."""
    import fcntl  # POSIX only, like the rest of the locking

    from stacktrain.errors import RunBusyError

    folder = Path(folder)
    created = make_dir(folder, what)
    try:
        lock = open(folder / LOCK_NAME, "a+b")
    except OSError as e:  # read-only, ...
        raise ConfigError(f"{folder}: cannot make or use it as the {what} folder ({e.strerror}); give a {what} "
                          "path under a writable folder") from None
    try:
        try:
            fcntl.lockf(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunBusyError(busy(folder)) from None
        remove_stale_temps(folder)
        yield folder
    finally:
        lock.close()  # releases the lock
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
