"""Format readers behind `stores.sources.open_source`: numpy arrays, TIFF / OME-TIFF, NIfTI and folders of
2-D slices (DICOM is in dicom_source.py). Each reads headers when opened and yields raw blocks along z on
demand, so memory follows the slab, never the stack.
"""

from __future__ import annotations

import contextlib
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stacktrain.errors import InputError

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Physical units -> micrometers (OME and NIfTI spellings).
UM_PER_UNIT = {"um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3,
               "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6}


def natural_key(name: str) -> list:
    """slice2 before slice10: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def channel_axes(shape: tuple[int, ...]) -> str | None:
    """Axis order of a bare array: 3-D is zyx; 4-D has a small (<= 4) first or last axis, not both."""
    if len(shape) == 3:
        return "zyx"
    if len(shape) == 4:
        first, last = shape[0] <= 4, shape[-1] <= 4
        if first != last:
            return "czyx" if first else "zyxc"
    return None


def _index(ndim: int, axis: int, lo: int, hi: int) -> tuple:
    idx = [slice(None)] * ndim
    idx[axis] = slice(lo, hi)
    return tuple(idx)


class NpyReader:
    """A .npy file: its header parsed by numpy (a memory map that is dropped), each block read with plain
    reads of its contiguous runs straight into the block's array (no page faults on a mapping, and no
    mapped pages that stay counted in the process's memory until the whole file is read)."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        arr = np.load(path, mmap_mode="r")
        self.shape, self.dtype = arr.shape, arr.dtype
        self.offset, self.fortran = arr.offset, not arr.flags.c_contiguous and arr.ndim > 1
        self.inferred_axes, self.spacing_zyx = channel_axes(self.shape), None
        del arr

    def blocks(self, axis: int, ranges):
        # C order: a block along `axis` is `outer` runs of (hi - lo) * inner bytes (Fortran: the reverse).
        shape = self.shape[::-1] if self.fortran else self.shape
        ax = len(shape) - 1 - axis if self.fortran else axis
        outer, inner = int(np.prod(shape[:ax])), int(np.prod(shape[ax + 1:])) * self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            for lo, hi in ranges:
                block = np.empty((*shape[:ax], hi - lo, *shape[ax + 1:]), self.dtype)
                runs = block.reshape(outer, -1).view(np.uint8)
                for o in range(outer):
                    f.seek(self.offset + (o * shape[ax] + lo) * inner)
                    run, got = memoryview(runs[o]), 0
                    while got < len(run):
                        n = f.readinto(run[got:])
                        if not n:
                            raise InputError(f"{self.name}: truncated inside the array data; re-export it")
                        got += n
                yield block.transpose() if self.fortran else block


class NpzReader:
    """The first array of a .npz: memory-mapped inside the zip when stored, streamed when deflated."""

    def __init__(self, path: Path):
        self.path = path
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            if not members:
                raise InputError(f"{path}: no array inside this .npz")
            self.member = members[0]
            # With several arrays, say which one is used wherever the file is named.
            self.name = f"{path}[{self.member[:-4]}]" if len(members) > 1 else str(path)
            info = zf.getinfo(self.member)
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                self.shape, self.fortran, self.dtype = read(f)
                self.header_len = f.tell()
        if self.dtype.hasobject:
            raise InputError(f"{self.name}: object arrays cannot be read; save a numeric array")
        self.stored = info.compress_type == zipfile.ZIP_STORED
        with open(path, "rb") as raw:  # the member's data follows its local header
            raw.seek(info.header_offset)
            local = raw.read(30)
        self.data_offset = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                            + int.from_bytes(local[28:30], "little") + self.header_len)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.stored and self.data_offset + nbytes > path.stat().st_size:
            raise InputError(f"{self.name}: truncated ({path.stat().st_size} bytes, array needs {nbytes})")
        self.inferred_axes, self.spacing_zyx = channel_axes(self.shape), None

    def blocks(self, axis: int, ranges):
        order = "F" if self.fortran else "C"
        if self.stored:
            arr = np.memmap(self.path, self.dtype, "r", self.data_offset, self.shape, order)
            for lo, hi in ranges:
                yield np.array(arr[_index(arr.ndim, axis, lo, hi)])
            return
        # Deflated: read the contiguous runs a slab is made of (C order; Fortran = reversed C order).
        shape = self.shape[::-1] if self.fortran else self.shape
        ax = len(shape) - 1 - axis if self.fortran else axis
        outer, inner = int(np.prod(shape[:ax])), int(np.prod(shape[ax + 1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            for lo, hi in ranges:
                runs = []
                for o in range(outer):
                    f.seek(self.header_len + (o * shape[ax] + lo) * inner)
                    runs.append(f.read((hi - lo) * inner))
                    if len(runs[-1]) != (hi - lo) * inner:
                        raise InputError(f"{self.name}: truncated inside the array data; re-export it")
                block = np.frombuffer(b"".join(runs), self.dtype).reshape(*shape[:ax], hi - lo, *shape[ax + 1:])
                yield block.transpose() if self.fortran else block


def _um(value, unit: str | None) -> float | None:
    factor = UM_PER_UNIT.get((unit or "um").strip())
    try:
        if not factor or value is None or not float(value) > 0:
            return None
        return float(f"{float(value) * factor:.6g}")  # float32 headers: 2.2 is stored as 2.1999991
    except ValueError:
        return None


def _all_or_none(values) -> tuple[float, float, float] | None:
    return None if any(v is None for v in values) else tuple(values)


@contextlib.contextmanager
def _tifffile_warnings():
    """tifffile reports broken IFDs and tags only as log warnings: collect them (and keep them quiet)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("tifffile"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


TIFF_AXES = {"Z": "z", "Y": "y", "X": "x", "C": "c", "S": "c"}


def tiff_axes(letters: str) -> str | None:
    """tifffile's series axes -> ours; one unnamed leading axis (Q, I, T...) is z when z is absent."""
    mapped = [TIFF_AXES.get(a) for a in letters]
    unknown = [i for i, m in enumerate(mapped) if m is None]
    if "z" not in mapped and len(unknown) == 1:
        mapped[unknown[0]] = "z"
    if None in mapped or mapped.count("c") > 1 or not {"z", "y", "x"} <= set(mapped):
        return None
    return "".join(mapped)


class TiffReader:
    """Multi-page TIFF / OME-TIFF / ImageJ TIFF: series 0, read through tifffile's lazy zarr view."""

    def __init__(self, path: Path):
        import tifffile

        self.path, self.name = path, str(path)
        with _tifffile_warnings() as warnings, tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)  # walks the whole IFD chain: a cut file breaks it
            series = tif.series[0]
            self.shape, self.dtype, self.tiff_axes = tuple(series.shape), series.dtype, series.axes
            self.spacing_zyx = self._spacing(tif)
        damage = [w for w in warnings if "offset" in w or "truncat" in w or "corrupt" in w]
        if damage or not n_pages:
            raise InputError(f"{path}: TIFF structure is damaged ({(damage or ['no pages'])[0]}); the file is "
                             "truncated or corrupt, re-export it")
        with tifffile.TiffFile(path) as tif:
            self._check_complete(tif.series[0], path.stat().st_size)
        self.inferred_axes = tiff_axes(self.tiff_axes)

    def _check_complete(self, series, size: int) -> None:
        if series.dataoffset is not None:  # contiguous, uncompressed
            ends = [series.dataoffset + series.nbytes]
        else:
            if any(page is None for page in series.pages):
                raise InputError(f"{self.path}: TIFF pages are missing; the file is truncated, re-export it")
            ends = [o + n for page in series.pages for o, n in zip(page.dataoffsets, page.databytecounts)]
        if max(ends) > size:
            raise InputError(f"{self.path}: TIFF data runs past the end of the file ({size} bytes); "
                             "the file is truncated, re-export it")

    @staticmethod
    def _spacing(tif) -> tuple[float, float, float] | None:
        if tif.is_ome and tif.ome_metadata:
            pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
            if pixels is not None:
                return _all_or_none([_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit"))
                                     for a in "ZYX"])
        meta = tif.imagej_metadata
        if meta and "spacing" in meta:
            unit = meta.get("unit", "um")
            res = [tif.pages[0].tags.get(t) for t in ("YResolution", "XResolution")]
            yx = [_um(r.value[1] / r.value[0], unit) if r and r.value[0] else None for r in res]
            return _all_or_none([_um(meta["spacing"], unit), *yx])
        return None

    def blocks(self, axis: int, ranges):
        import tifffile
        import zarr

        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            pages = series.pages
            if axis == 0 and len(pages) == series.shape[0] and all(p is not None for p in pages) \
                    and tuple(pages[0].shape) == tuple(series.shape[1:]):
                # One page per z (multi-page RGB or grayscale): tifffile reads the pages straight into one
                # array, ~10x faster than its zarr view (which copies chunk by chunk).
                for lo, hi in ranges:
                    yield tif.asarray(key=range(lo, hi), series=0).reshape(hi - lo, *series.shape[1:])
                return
            with series.aszarr(level=0) as store:
                arr = zarr.open_array(store, mode="r")
                for lo, hi in ranges:
                    yield arr[_index(arr.ndim, axis, lo, hi)]


class NiftiReader:
    """NIfTI-1/2 (.nii, .nii.gz): x, y, z[, c] by convention; nibabel's proxy reads only the slab."""

    def __init__(self, path: Path):
        import nibabel as nib

        self.path, self.name = path, str(path)
        img = nib.load(path)
        shape = tuple(img.shape)
        self.squeeze_t = len(shape) == 5 and shape[3] == 1  # x, y, z, t=1, c (vector intent)
        if len(shape) not in (3, 4) and not self.squeeze_t:
            raise InputError(f"{path}: NIfTI of shape {shape}; expected x, y, z and at most one channel axis")
        if img.get_data_dtype().names:
            raise InputError(f"{path}: RGB-typed NIfTI is not supported; store channels as a 4th dimension")
        if path.name.lower().endswith(".nii"):
            need = img.dataobj.offset + int(np.prod(shape)) * img.get_data_dtype().itemsize
            if need > path.stat().st_size:
                raise InputError(f"{path}: truncated ({path.stat().st_size} bytes, header says {need})")
        # The dtype after the header's scaling (nibabel applies scl_slope/scl_inter when they are set).
        self.dtype = np.asarray(img.dataobj[(slice(0, 1),) * len(shape)]).dtype
        self.shape = shape[:3] + shape[4:] if self.squeeze_t else shape
        self.inferred_axes = "xyz" if len(self.shape) == 3 else "xyzc"
        unit = img.header.get_xyzt_units()[0]
        unit = "mm" if unit == "unknown" else unit  # NIfTI tools assume millimeters
        self.spacing_zyx = _all_or_none([_um(v, unit) for v in img.header.get_zooms()[2::-1]])

    def blocks(self, axis: int, ranges):
        import nibabel as nib

        img = nib.load(self.path, keep_file_open=True)  # one decompressor for all slabs of a .nii.gz
        full_axis = axis + 1 if self.squeeze_t and axis >= 3 else axis
        for lo, hi in ranges:
            idx = list(_index(len(img.shape), full_axis, lo, hi))
            if self.squeeze_t:
                idx[3] = 0
            yield np.asarray(img.dataobj[tuple(idx)])


class FrameReader:
    """A stack stored frame by frame along axis 0 (slice files, DICOM): subclasses yield frames."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def iter_frames(self, indices: range) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def blocks(self, axis: int, ranges):
        for lo, hi in ranges:
            if axis == 0:
                out = np.empty((hi - lo, *self.shape[1:]), self.dtype)
                for k, frame in enumerate(self.iter_frames(range(lo, hi))):
                    out[k] = frame
            else:  # z is inside the frames (explicit unusual axes): every frame, one part of each
                idx = _index(len(self.shape) - 1, axis - 1, lo, hi)
                out = np.stack([frame[idx] for frame in self.iter_frames(range(self.shape[0]))])
            yield out


PIL_MODES = {"L": ((), "uint8"), "LA": ((2,), "uint8"), "RGB": ((3,), "uint8"), "RGBA": ((4,), "uint8"),
             "I;16": ((), "uint16"), "I;16L": ((), "uint16"), "I;16B": ((), "uint16"),
             "I": ((), "int32"), "F": ((), "float32")}


def slice_header(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of one 2-D slice file, from its header only."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                if len(tif.pages) > 1 or series.axes not in ("YX", "YXS", "SYX"):
                    raise InputError(f"{path}: a slice must be one 2-D image, got TIFF axes {series.axes} "
                                     f"shape {series.shape}")
                shape = series.shape[1:] + series.shape[:1] if series.axes == "SYX" else series.shape
                return tuple(shape), str(series.dtype)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in PIL_MODES:
                raise InputError(f"{path}: image mode {im.mode!r} is not supported; save the slices as "
                                 "grayscale (8/16-bit) or RGB")
            extra, dtype = PIL_MODES[im.mode]
            return (im.height, im.width, *extra), dtype
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read this slice ({type(e).__name__}: {e})") from e


def read_slice(path: Path, dtype: np.dtype) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                arr, axes = tif.asarray(), tif.series[0].axes
            return np.moveaxis(arr, 0, -1) if axes == "SYX" else arr
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im).astype(dtype, copy=False)
    except Exception as e:
        raise InputError(f"{path}: cannot read this slice ({type(e).__name__}: {e}); the file is truncated "
                         "or corrupt, re-export it") from e


class SliceFolderReader(FrameReader):
    """A folder of 2-D slices (PNG/JPEG/TIFF) in natural name order; all must have one shape."""

    def __init__(self, folder: Path):
        self.path, self.name = folder, str(folder)
        files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
        for p in files:
            if p.suffix.lower() not in SLICE_SUFFIXES:
                raise InputError(f"{p}: not a slice image ({', '.join(SLICE_SUFFIXES)}); remove it from "
                                 f"the slice folder {folder}")
        first = slice_header(files[0])
        for p in files[1:]:
            header = slice_header(p)
            if header != first:
                raise InputError(f"{folder}: slice {p.name} has shape {header[0]} {header[1]} but "
                                 f"{files[0].name} has {first[0]} {first[1]}; all slices must have the "
                                 "same size, channels and bit depth")
        self.files = files
        self.shape, self.dtype = (len(files), *first[0]), np.dtype(first[1])
        self.inferred_axes = "zyx" if len(first[0]) == 2 else "zyxc"
        self.spacing_zyx = None

    def iter_frames(self, indices: range):
        for i in indices:
            yield read_slice(self.files[i], self.dtype)


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False
