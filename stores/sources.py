"""Raw stacks in, (C, Z, Y, X) slabs out: one reader per input format, streamed slab by slab.

`open_source(path)` looks at the path (file suffix; a directory is a slice folder or a DICOM series),
reads headers only, settles the axis order and returns a `RawSource`. `RawSource.slabs(depth)` then
reopens the file and yields slabs in z order, so memory follows the slab, never the stack, and the
object stays picklable for worker processes. Every failure is an `InputError` naming the file.
Voxel spacing is reported in micrometers (the unit the store's OME metadata declares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.errors import InputError

from .buffers import pooled
from .guards import check_memory, declared, one_line, quiet_libraries
from .image_readers import SliceFolderReader, TiffReader
from .layout import DEFAULT_SHARD_ZYX, STATS_CELL_ZYX
from .readers import SLICE_SUFFIXES, NiftiReader, NpyReader, NpzReader, is_dicom_file

FORMATS = ("tiff", "slices", "nifti", "npy", "npz", "dicom")
DEFAULT_SLAB_DEPTH = math.lcm(DEFAULT_SHARD_ZYX[0], STATS_CELL_ZYX[0])  # ConvertOptions().slab_depth
FILE_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz", ".dcm", ".ome.tif", ".ome.tiff")
AXES_HINT = "add an `axes` column to the manifest (or pass --axes), e.g. 'zyxc' or 'czyx'"


@dataclasses.dataclass
class RawSource:
    """One raw stack, opened (headers read) but not loaded."""

    path: Path
    format: str  # one of FORMATS
    shape: tuple[int, int, int, int]  # (C, Z, Y, X) after axis handling
    dtype: np.dtype  # the source's dtype, unchanged (in native byte order)
    spacing_zyx: tuple[float, float, float] | None  # micrometers, when the file says
    axes: str = "zyx"  # the source array's own axis order, over {c, z, y, x}
    gaps: dict[str, Any] | None = None  # DICOM series opened with allow_gaps: where slices are missing
    axes_note: str | None = None  # --axes was not applied: the file's own metadata states its axes
    _reader: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        """(z0, array (C, dz, Y, X)) in z order, dz <= depth, C-contiguous, source dtype."""
        if depth < 1:
            raise ValueError(f"slab depth must be >= 1, got {depth}")
        z_axis = self.axes.index("z")
        order = [self.axes.index(a) for a in "czyx" if a in self.axes]
        n_z = self.shape[1]
        ranges = [(z0, min(z0 + depth, n_z)) for z0 in range(0, n_z, depth)]
        blocks = self._reader.blocks(z_axis, ranges)
        try:
            for z0, z1 in ranges:
                with quiet_libraries(str(self.path)):
                    try:
                        block = next(blocks)
                    except InputError:
                        raise
                    except Exception as e:  # a library error mid-file: truncated or corrupt data
                        raise InputError(f"{self.path}: cannot read slices {z0}-{z1 - 1} ({type(e).__name__}: "
                                         f"{one_line(e)}); the file is truncated or corrupt, re-export it") from e
                slab = block.transpose(order)
                if "c" not in self.axes:
                    slab = slab[np.newaxis]
                if slab.shape != (self.shape[0], z1 - z0, *self.shape[2:]):
                    raise InputError(f"{self.path}: slices {z0}-{z1 - 1} came back with shape {slab.shape}; "
                                     "the file is truncated or corrupt, re-export it")
                out = _contiguous(slab, self.dtype)
                del block, slab  # the reader's own array (interleaved channels) goes before the next read
                yield z0, out
                del out
        finally:
            blocks.close()


def _contiguous(slab: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous copy of a (C, dz, Y, X) view, channel by channel: from interleaved channels
    (zyxc sources) numpy copies one strided channel at a time ~3x faster than all at once."""
    if slab.flags.c_contiguous and slab.dtype == dtype:
        return slab
    out = pooled(slab.shape, dtype)  # recycled: a fresh 100 MB slab costs ~20 ms of page faults
    for ch in range(slab.shape[0]):
        np.copyto(out[ch], slab[ch], casting="unsafe")  # as ascontiguousarray(slab, dtype) casts
    return out


def _file_suffix(name: str) -> str | None:
    return next((s for s in FILE_SUFFIXES + SLICE_SUFFIXES if name.endswith(s)), None)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not files:
            what = f"a folder named like a {suffix} file" if (suffix := _file_suffix(name)) else "an empty folder"
            raise InputError(f"{path}: {what}, with no slices inside; give the image file itself, or a folder "
                             f"of 2-D slices ({', '.join(SLICE_SUFFIXES)}) or of one DICOM series")
        if any(is_dicom_file(p) for p in files if p.suffix.lower() not in SLICE_SUFFIXES):
            return "dicom"
        return "slices"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".npz"):
        return "npz"
    if is_dicom_file(path):
        return "dicom"
    raise InputError(f"{path}: unknown input format; use .tif/.tiff/.ome.tif, .nii/.nii.gz, .npy, .npz, "
                     ".dcm, a folder of 2-D slices or a DICOM series folder")


def open_source(path: str | Path, *, axes: str | None = None, axes_from_option: bool = False,
                allow_gaps: bool = False, slab_depth: int = DEFAULT_SLAB_DEPTH) -> RawSource:
    """Open a raw stack: detect the format, read headers, settle the axes (see module docstring and
    `resolve_axes`; `axes_from_option`: `axes` is --axes, not the row's own cell). Headers are held
    against the file's size and the available memory before anything is decoded (guards.py);
    `allow_gaps` accepts a DICOM series with missing slices (recorded in `RawSource.gaps`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the manifest's path column")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")
    try:
        fmt = detect_format(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    with quiet_libraries(str(path)):
        try:
            if fmt == "dicom":
                from .dicom_source import open_dicom  # pydicom is slow to import; only when needed
                reader = open_dicom(path, allow_gaps=allow_gaps)
            else:
                reader = {"tiff": TiffReader, "nifti": NiftiReader, "npy": NpyReader, "npz": NpzReader,
                          "slices": SliceFolderReader}[fmt](path)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: cannot read this {fmt} input ({type(e).__name__}: {one_line(e)}); "
                             "the file is unreadable, truncated or not what its name says") from e
    declared(reader.name, reader.shape, 1)  # every reader checks; this keeps an empty stack out for good
    axes, note = resolve_axes(reader.name, reader.shape, axes, reader.inferred_axes,
                              stated=getattr(reader, "stated_axes", False), from_option=axes_from_option)
    c = reader.shape[axes.index("c")] if "c" in axes else 1
    shape = (c, *(reader.shape[axes.index(a)] for a in "zyx"))
    dtype = np.dtype(reader.dtype).newbyteorder("=")
    check_memory(reader.name, shape, dtype.itemsize, slab_depth)
    # Native byte order (values unchanged), so '>u2' from a big-endian file is plain uint16 downstream.
    return RawSource(path=path, format=fmt, shape=shape, dtype=dtype, spacing_zyx=reader.spacing_zyx, axes=axes,
                     gaps=getattr(reader, "gaps", None), axes_note=note, _reader=reader)


def open_row(row: Any, opts: Any) -> RawSource:
    """The source of a manifest row (stores.manifest.ManifestRow) as convert's options (ConvertOptions) open it."""
    return open_source(row.path, axes=row.axes, axes_from_option=row.axes_from_option, allow_gaps=opts.allow_gaps,
                       slab_depth=opts.slab_depth)


def resolve_axes(name: str, shape: tuple[int, ...], axes: str | None, inferred: str | None, *,
                 stated: bool = False, from_option: bool = False) -> tuple[str, str | None]:
    """(axis order, a note or None): the explicit `axes` (checked against the shape), else the inferred
    order, else an error. When the file's metadata states its axes (`stated`: TIFF with ImageJ/OME axes,
    NIfTI, DICOM, slice folders), --axes (`from_option`) is not applied to it (the note says so), and a
    manifest cell that disagrees is refused: a default meant for ambiguous files never overrides a file
    that says what it holds."""
    if axes is None:
        if inferred is None:
            raise InputError(f"{name}: cannot tell the axes of an array of shape {tuple(shape)}; {AXES_HINT}")
        return inferred, None
    axes = axes.strip().lower()
    if stated and inferred is not None and axes != inferred:
        if from_option:
            return inferred, f"--axes {axes} not applied: the file's metadata states {inferred}, which is used"
        raise InputError(f"{name}: the manifest's axes cell says {axes!r}, but the file's metadata states "
                         f"{inferred!r}; clear the cell (the file's own order is used) or fix the file")
    if (len(set(axes)) != len(axes) or set(axes) - set("czyx") or not set("zyx") <= set(axes)
            or len(axes) != len(shape)):
        raise InputError(f"{name}: axes {axes!r} do not fit an array of shape {tuple(shape)}; give one letter "
                         "per dimension from c, z, y, x, each once, with z, y and x present")
    return axes, None



class StreamingSha256:
    """The source's sha256 (the same digest as `source_sha256`), computed while the source is read:
    `advance(fraction)` hashes the file on to that fraction of its size, so the bytes are hashed
    just after the reader took them from the disk (they are in the page cache) and in the reader's
    thread, not in a second pass before the conversion. A folder (slices, DICOM series) is hashed
    file by file when `hexdigest` is called."""

    BLOCK = 256 << 10  # small: it is the one buffer of the hasher

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder = self.path.is_dir()
        self._digest = hashlib.sha256()
        self._done = 0
        self._buf = bytearray(self.BLOCK)
        try:
            self._file = None if self.folder else open(self.path, "rb")
            self.size = 0 if self.folder else os.fstat(self._file.fileno()).st_size
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from e

    def advance(self, fraction: float) -> None:
        if self.folder:
            return
        target = self.size if fraction >= 1 else int(self.size * fraction)
        view = memoryview(self._buf)
        try:
            while self._done < target:
                n = self._file.readinto(view[:min(self.BLOCK, target - self._done)])
                if not n:
                    raise InputError(f"{self.path}: the file shrank while it was read; rerun when it is complete")
                self._digest.update(view[:n])
                self._done += n
        except OSError as e:
            raise InputError(f"{self.path}: cannot read ({e.strerror or e})") from e

    def hexdigest(self) -> str:
        if self.folder:
            return source_sha256(self.path)
        self.advance(1.0)
        if self._file.read(1):
            raise InputError(f"{self.path}: the file grew while it was read; rerun when it is complete")
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def source_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder (sorted relative names, sizes and contents), streamed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the manifest's path column")
    try:
        if path.is_file():
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()
        files = sorted((p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.relative_to(path).as_posix())
        for p in files:
            digest.update(p.relative_to(path).as_posix().encode() + b"\0")
            digest.update(p.stat().st_size.to_bytes(8, "little"))
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e


_END = object()


def read_ahead(items: Iterator, after: Callable[[Any], None] | None = None) -> Iterator:
    """`items` produced in a reader thread one step ahead of the caller, so that reading the next slab
    overlaps with processing this one; `after(item)` runs in that thread too (hashing, progress).
    At most two items are alive: the caller's and the one being read. Errors surface in the caller;
    closing the returned iterator stops the thread after its current item."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        error = None
        try:
            for item in items:
                if after is not None:
                    after(item)
                handoff.put(item)
                handoff.join()  # read the next one only once the caller has taken this one
                if stop.is_set():
                    break
        except BaseException as e:  # handed to the caller, raised there
            error = e
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        handoff.put((_END, error))

    thread = threading.Thread(target=produce, name="stacktrain-reader", daemon=True)
    thread.start()

    def is_end(item) -> bool:
        return isinstance(item, tuple) and len(item) == 2 and item[0] is _END

    def consume() -> Iterator:
        ended = False
        try:
            while True:
                item = handoff.get()
                handoff.task_done()
                if is_end(item):
                    ended = True
                    if item[1] is not None:
                        raise item[1]
                    return
                yield item
                del item
        finally:
            stop.set()
            while not ended:  # take what the producer hands over until its end marker
                ended = is_end(handoff.get())
                handoff.task_done()
            thread.join()

    return consume()
