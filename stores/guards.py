"""What a reader checks before it allocates or decodes anything, and how library chatter is kept quiet.

A header is a claim: `.npy` shape, NIfTI dims, TIFF tags, DICOM Rows/Columns. Before a voxel is read
the claim is held against the bytes that are really there:
- uncompressed data must fit in the file (npy, stored npz, .nii, raw TIFF strips, native DICOM);
- compressed data cannot inflate beyond its codec's ratio: deflate (npz, .nii.gz, zlib TIFF, PNG)
  never exceeds 1032:1 (a 258-byte match per two bits is its best case), so a claim above that is a
  lie; other codecs (LZW, zstd, JPEG, ...) get a generous 10000:1;
- the conversion's working set (about SLAB_COPIES slabs of the convert slab depth, plus the stored
  statistics grid) must fit in the memory this machine has available now;
- no dimension may be zero (an empty stack is refused, --pad does not make one up).

Warnings that tifffile, nibabel, pydicom or Pillow log or `warnings.warn` while reading are collected
instead of printed: on failure they are appended to the error line ('...; tifffile warned: ...'), on
success they go to the `stacktrain.inputs` logger at INFO (silent unless logging is configured).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from stacktrain.errors import InputError

DEFLATE_MAX_RATIO = 1032
OTHER_MAX_RATIO = 10_000
SLAB_COPIES = 6  # read-ahead (2), its converted copy, the writer's regrouped slab, shard buffers
STATS_BYTES_PER_CELL = 4  # float32 per channel and per stats cell, plus the foreground fraction
LIBRARIES = ("tifffile", "nibabel", "pydicom", "PIL")
log = logging.getLogger("stacktrain.inputs")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n} bytes"


def declared(name: str, shape: Sequence[int], itemsize: int, what: str = "") -> int:
    """The bytes a header claims; refuses a zero dimension first (an empty stack is never converted)."""
    shape = tuple(int(n) for n in shape)
    if any(n <= 0 for n in shape):
        raise InputError(f"{name}: {what or 'the header'} says shape {shape}: the stack is empty (a zero-length "
                         "axis); export the stack with its slices (--pad cannot fill an empty stack)")
    return math.prod(shape) * int(itemsize)


def check_fits(name: str, shape: Sequence[int], itemsize: int, available: int, *, exact: bool = False,
               what: str = "", where: str = "the file") -> int:
    """Uncompressed data: the claimed bytes must be in the file (`exact`: and nothing after them)."""
    need = declared(name, shape, itemsize, what)
    if need > available:
        raise InputError(f"{name}: {what or 'the header'} says shape {tuple(shape)} ({_gib(need)} of data) but "
                         f"{where} holds only {_gib(max(available, 0))}; the file is truncated or its header is "
                         "wrong, re-export it")
    if exact and need < available:
        raise InputError(f"{name}: {what or 'the header'} says shape {tuple(shape)} ({need} bytes of data) but "
                         f"{where} holds {available} bytes; the header does not describe the data, re-export it")
    return need


def check_ratio(name: str, shape: Sequence[int], itemsize: int, compressed: int, codec: str = "deflate",
                what: str = "") -> int:
    """Compressed data: the claimed bytes cannot exceed what `compressed` bytes of `codec` inflate to."""
    need = declared(name, shape, itemsize, what)
    limit = DEFLATE_MAX_RATIO if codec == "deflate" else OTHER_MAX_RATIO
    if need > limit * max(compressed, 1):
        raise InputError(f"{name}: {what or 'the header'} says shape {tuple(shape)} ({_gib(need)}) from "
                         f"{_gib(compressed)} of {codec} data, more than the {limit}:1 that {codec} can inflate "
                         "to; the header is wrong or the file is damaged, re-export it")
    return need


def check_gzip_size(name: str, expected: int) -> None:
    """A gzip file ends with its uncompressed size (mod 2**32): a cut file, or a header that claims more
    or less data than the stream holds, shows up here before anything is inflated. BGZF files (several
    members, each with an extra field) end with an empty member and are left to the streaming read."""
    with open(name, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if len(head) < 4 or head[:2] != b"\x1f\x8b" or head[3] & 4:
        return
    if isize != expected % 2**32:
        raise InputError(f"{name}: the gzip stream says it inflates to {isize} bytes (mod 4 GiB) but the header "
                         f"needs {expected}; the file is truncated or its header does not describe the data, "
                         "re-export it")


def available_memory() -> int:
    """Bytes this machine can give now (MemAvailable; all physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(name: str, shape_czyx: Sequence[int], itemsize: int, slab_depth: int) -> None:
    """The conversion's working set for a (C, Z, Y, X) stack must fit in the available memory."""
    from .layout import STATS_CELL_ZYX

    c, z, y, x = (int(n) for n in shape_czyx)
    slab = c * min(z, slab_depth) * y * x * max(int(itemsize), 1)
    cells = math.prod(-(-n // k) for n, k in zip((z, y, x), STATS_CELL_ZYX))
    need = SLAB_COPIES * slab + cells * (c + 1) * STATS_BYTES_PER_CELL
    free = available_memory()
    if need > free:
        raise InputError(f"{name}: a stack of shape (c,z,y,x) = {(c, z, y, x)} needs about {_gib(need)} of memory "
                         f"to convert ({SLAB_COPIES} slabs of {min(z, slab_depth)} slices and its statistics) but "
                         f"{_gib(free)} are available; check that the header is right, free memory, or convert "
                         "with a smaller --shard Z on a larger machine")


# -- library warnings -------------------------------------------------------------------------------

_LOCK = threading.RLock()  # warnings.catch_warnings is process-wide state: one reader at a time


def _library_of(filename: str) -> str | None:
    parts = filename.replace("\\", "/").split("/")
    return next((lib for lib in LIBRARIES if lib in parts), None)


def one_line(text, limit: int = 300) -> str:
    """`text` (or an exception's message) on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_warnings(message: str, heard: list[tuple[str, str]]) -> str:
    """`message` with the first distinct library warnings appended, still one line."""
    seen = [(lib, text) for lib, text in dict.fromkeys(heard) if one_line(text, 160) not in message][:2]
    return message + "".join(f"; {lib} warned: {one_line(text, 160)}" for lib, text in seen)


@contextlib.contextmanager
def quiet_libraries(name: str) -> Iterator[list[tuple[str, str]]]:
    """Collect the input libraries' warnings (logged or warned) while reading `name`. An InputError raised
    inside comes out with them appended; otherwise they are logged quietly. Other warnings pass through."""
    heard: list[tuple[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record):
            heard.append((record.name.split(".")[0], record.getMessage()))

    handler = Collect(logging.WARNING)
    names = [n for n in logging.root.manager.loggerDict
             if any(n == lib or n.startswith(lib + ".") for lib in LIBRARIES)]
    loggers = [logging.getLogger(n) for n in sorted({*LIBRARIES, *names})]
    with _LOCK:
        saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
        for lg in loggers:  # nibabel.global has a stderr handler of its own: every handler is set aside
            lg.handlers = [handler]
            lg.propagate = False  # not also to the root logger (or Python's last-resort stderr print)
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    yield heard
                except InputError as e:
                    _sort(caught, heard)
                    raise InputError(with_warnings(str(e), heard)) from e
        finally:
            for lg, (p, handlers) in zip(loggers, saved):
                lg.handlers = handlers
                lg.propagate = p
    for w in _sort(caught, heard):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    for lib, text in dict.fromkeys(heard):
        log.info("%s: %s warned: %s", name, lib, one_line(text, 1000))


def _sort(caught: list, heard: list[tuple[str, str]]) -> list:
    """Move the input libraries' warnings from `caught` into `heard`; return the others (once)."""
    others = []
    while caught:
        w = caught.pop(0)
        lib = _library_of(w.filename)
        if lib:
            heard.append((lib, str(w.message)))
        else:
            others.append(w)
    return others


def header_array(f, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran, dtype) from an open .npy stream, positioned after the header on return."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
            (3, 0): np.lib.format.read_array_header_2_0}.get(version)  # 3.0 differs only in utf-8 names
    if read is None:
        raise InputError(f"{name}: .npy format version {version} is not supported; save it with numpy.save")
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise InputError(f"{name}: object arrays cannot be read; save a numeric array")
    return tuple(shape), bool(fortran), dtype
