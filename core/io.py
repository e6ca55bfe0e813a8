"""Files that matter, written and read one way.

`atomic_write` writes a temp file beside the target, fsyncs it, renames it over the target and fsyncs
the folder: readers, and runs killed with -9, never see a partial file. The file gets the permissions
`open()` would give it (0o666 less the umask), so the rest of a lab's group can read stores, results
and checkpoints. Readers of user files raise `ConfigError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from stacktrain.errors import ConfigError

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "build_once", "current_umask", "read_json",
           "read_toml"]


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


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temp file beside `path`, then make it `path` in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0o600; give what open() gives
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


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
        raise ConfigError(f"{path}: is a folder; give the {what} file itself")
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
