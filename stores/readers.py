"""Format readers behind `stores.sources.open_source`: numpy arrays, TIFF / OME-TIFF, NIfTI and folders of
2-D slices (DICOM is in dicom_source.py). Each reads headers when opened and yields raw blocks along z on
demand, so memory follows the slab, never the stack.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stacktrain.errors import InputError

from .buffers import pooled
from .guards import check_fits, check_gzip_size, check_ratio, declared, header_array

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
        with open(path, "rb") as f:
            self.shape, fortran, self.dtype = header_array(f, self.name)
            self.offset, size = f.tell(), os.fstat(f.fileno()).st_size
        # numpy.save writes the data right after the header and nothing after it: any other size is a lie
        check_fits(self.name, self.shape, self.dtype.itemsize, size - self.offset, exact=True,
                   what="the .npy header")
        self.fortran = fortran and len(self.shape) > 1
        self.inferred_axes, self.spacing_zyx = channel_axes(self.shape), None

    def blocks(self, axis: int, ranges):
        # C order: a block along `axis` is `outer` runs of (hi - lo) * inner bytes (Fortran: the reverse).
        shape = self.shape[::-1] if self.fortran else self.shape
        ax = len(shape) - 1 - axis if self.fortran else axis
        outer, inner = int(np.prod(shape[:ax])), int(np.prod(shape[ax + 1:])) * self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            for lo, hi in ranges:
                block = pooled((*shape[:ax], hi - lo, *shape[ax + 1:]), self.dtype)  # recycled pages
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
                raise InputError(f"{path}: no array inside this .npz; save the stack with numpy.savez(path, stack)")
            self.member = members[0]
            # With several arrays, say which one is used wherever the file is named.
            self.name = f"{path}[{self.member[:-4]}]" if len(members) > 1 else str(path)
            info = zf.getinfo(self.member)
            with zf.open(info) as f:
                self.shape, self.fortran, self.dtype = header_array(f, self.name)
                self.header_len = f.tell()
        self.stored = info.compress_type == zipfile.ZIP_STORED
        if not self.stored:  # before the sizes: a zip can claim any uncompressed size too
            check_ratio(self.name, self.shape, self.dtype.itemsize, info.compress_size,
                        "deflate" if info.compress_type == zipfile.ZIP_DEFLATED else "zip", "the array header")
        check_fits(self.name, self.shape, self.dtype.itemsize, info.file_size - self.header_len, exact=True,
                   what="the array header", where="its zip member")
        with open(path, "rb") as raw:  # the member's data follows its local header
            raw.seek(info.header_offset)
            local = raw.read(30)
        self.data_offset = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                            + int.from_bytes(local[28:30], "little") + self.header_len)
        if self.stored:
            check_fits(self.name, self.shape, self.dtype.itemsize, path.stat().st_size - self.data_offset,
                       what="the array header")
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
        itemsize, offset, size = img.get_data_dtype().itemsize, img.dataobj.offset, path.stat().st_size
        if path.name.lower().endswith(".nii"):
            check_fits(self.name, shape, itemsize, size - offset, exact=True, what="the NIfTI header")
        else:
            check_ratio(self.name, shape, itemsize, size, "deflate", "the NIfTI header")
            check_gzip_size(self.name, offset + declared(self.name, shape, itemsize))
        # The dtype after the header's scaling (nibabel applies scl_slope/scl_inter when they are set).
        self.dtype = np.asarray(img.dataobj[(slice(0, 1),) * len(shape)]).dtype
        self.shape = shape[:3] + shape[4:] if self.squeeze_t else shape
        self.inferred_axes = "xyz" if len(self.shape) == 3 else "xyzc"
        self.stated_axes = True  # the NIfTI format fixes x, y, z (then t, then the vector dimension)
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


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False
