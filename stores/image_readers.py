"""TIFF stacks (multi-page, OME-TIFF, ImageJ) and folders of 2-D slices (PNG/JPEG/TIFF), read through
tifffile and Pillow. Headers are checked against the bytes on disk before any pixel is decoded
(stores/guards.py): a strip that is missing, runs past the end of the file or claims more pixels than its
bytes can hold is refused by name, instead of tifffile filling it with zeros."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from stacktrain.errors import InputError

from .buffers import pooled
from .guards import check_ratio, declared, one_line, quiet_libraries
from .readers import SLICE_SUFFIXES, FrameReader, _all_or_none, _index, _um, natural_key

TIFF_AXES = {"Z": "z", "Y": "y", "X": "x", "C": "c", "S": "c"}
DEFLATE_TIFF = ("ADOBE_DEFLATE", "DEFLATE")
DAMAGE_WORDS = ("offset", "truncat", "corrupt")


def tiff_axes(letters: str) -> str | None:
    """tifffile's series axes -> ours; one unnamed leading axis (Q, I, T...) is z when z is absent."""
    mapped = [TIFF_AXES.get(a) for a in letters]
    unknown = [i for i, m in enumerate(mapped) if m is None]
    if "z" not in mapped and len(unknown) == 1:
        mapped[unknown[0]] = "z"
    if None in mapped or mapped.count("c") > 1 or not {"z", "y", "x"} <= set(mapped):
        return None
    return "".join(mapped)


def check_tiff_pages(name: str, pages, size: int) -> None:
    """Every strip or tile of every page is present, inside the file, and big enough for its pixels."""
    for p, page in enumerate(pages):
        if page is None:
            raise InputError(f"{name}: TIFF page {p} is missing; the file is truncated, re-export it")
        key = page.keyframe
        offsets, counts = page.dataoffsets, page.databytecounts
        for i, (o, n) in enumerate(zip(offsets, counts)):
            if not o or not n:
                raise InputError(f"{name}: strip/tile {i} of TIFF page {p} is missing (offset {o}, {n} bytes); "
                                 "the file was written incompletely or is damaged, re-export it")
            if o + n > size:
                raise InputError(f"{name}: TIFF page {p} runs past the end of the file ({size} bytes); "
                                 "the file is truncated, re-export it")
        stored, what = int(sum(counts)), f"TIFF page {p}"
        codec = key.compression.name
        if codec == "NONE":
            need = declared(name, key.shape, key.dtype.itemsize, what)
            if stored < need:  # tiles at the edges may be padded (more), never fewer bytes
                raise InputError(f"{name}: {what} says shape {tuple(key.shape)} ({need} bytes) but its strips "
                                 f"hold {stored} bytes; the header is wrong or the file is damaged, re-export it")
        else:
            check_ratio(name, key.shape, key.dtype.itemsize, stored,
                        "deflate" if codec in DEFLATE_TIFF else codec.lower(), what)


class TiffReader:
    """Multi-page TIFF / OME-TIFF / ImageJ TIFF: series 0, read through tifffile's lazy zarr view."""

    def __init__(self, path: Path):
        import tifffile

        self.path, self.name = path, str(path)
        with quiet_libraries(self.name) as heard, tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)  # walks the whole IFD chain: a cut file breaks it
            damage = [text for _, text in heard if any(w in text for w in DAMAGE_WORDS)]
            if damage or not n_pages:
                raise InputError(f"{path}: TIFF structure is damaged ({(damage or ['no pages'])[0]}); the file "
                                 "is truncated or corrupt, re-export it")
            if len(tif.series) > 1:  # pages of other shapes: reading series 0 would silently drop them
                kinds = Counter(f"{s.axes} {tuple(s.shape)} {s.dtype}" for s in tif.series)
                shapes = ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common(4))
                raise InputError(f"{path}: holds {len(tif.series)} image series ({shapes}); a stack is one series of "
                                 "pages of one shape and type: write it with one tifffile.imwrite(path, stack), or "
                                 "export each series to its own file")
            series = tif.series[0]
            self.shape, self.dtype, self.tiff_axes = tuple(series.shape), series.dtype, series.axes
            declared(self.name, self.shape, self.dtype.itemsize, "the TIFF")
            size = path.stat().st_size
            if series.dataoffset is not None:  # contiguous and uncompressed: one run of bytes
                if series.dataoffset + series.nbytes > size:
                    raise InputError(f"{path}: TIFF data runs past the end of the file ({size} bytes); "
                                     "the file is truncated, re-export it")
            pages = series.pages if series.dataoffset is None else [p for p in series.pages if p is not None]
            check_tiff_pages(self.name, pages, size)  # contiguous: tifffile may list only the first page
            self.spacing_zyx = self._spacing(tif)
        self.inferred_axes = tiff_axes(self.tiff_axes)
        # ImageJ / OME metadata name every axis; a bare multi-page TIFF's leading axis is a guess (Q, I)
        self.stated_axes = all(a in TIFF_AXES for a in self.tiff_axes)

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
                for lo, hi in ranges:  # into recycled buffers (reused once nothing holds them)
                    out = pooled((hi - lo, *series.shape[1:]), series.dtype)
                    yield tif.asarray(key=range(lo, hi), series=0, out=out).reshape(hi - lo, *series.shape[1:])
                return
            with series.aszarr(level=0) as store:
                arr = zarr.open_array(store, mode="r")
                for lo, hi in ranges:
                    yield arr[_index(arr.ndim, axis, lo, hi)]




PIL_MODES = {"L": ((), "uint8"), "LA": ((2,), "uint8"), "RGB": ((3,), "uint8"), "RGBA": ((4,), "uint8"),
             "I;16": ((), "uint16"), "I;16L": ((), "uint16"), "I;16B": ((), "uint16"),
             "I": ((), "int32"), "F": ((), "float32")}


def _unreadable(path: Path, e: Exception) -> InputError:
    return InputError(f"{path}: cannot read this slice ({type(e).__name__}: {one_line(e)}); the file "
                      "is truncated, corrupt or not an image, re-export it")


def slice_header(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of one 2-D slice file, from its header only."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                if len(tif.pages) > 1 or series.axes not in ("YX", "YXS", "SYX"):
                    raise InputError(f"{path}: a slice must be one 2-D image, got TIFF axes {series.axes} "
                                     f"shape {series.shape}; give a 3-D TIFF as a file of its own, not in a "
                                     "slice folder")
                check_tiff_pages(str(path), series.pages, path.stat().st_size)
                shape = series.shape[1:] + series.shape[:1] if series.axes == "SYX" else series.shape
                return tuple(shape), str(series.dtype)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in PIL_MODES:
                raise InputError(f"{path}: image mode {im.mode!r} is not supported; save the slices as "
                                 "grayscale (8/16-bit) or RGB")
            extra, dtype = PIL_MODES[im.mode]
            shape = (im.height, im.width, *extra)
            check_ratio(str(path), shape, np.dtype(dtype).itemsize, path.stat().st_size,
                        "deflate" if im.format == "PNG" else (im.format or "image").lower(), f"the {im.format} header")
            return shape, dtype
    except InputError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from e


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
        raise _unreadable(path, e) from e


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
        self.stated_axes = True  # one image per slice: the folder is z
        self.spacing_zyx = None

    def iter_frames(self, indices: range):
        for i in indices:
            yield read_slice(self.files[i], self.dtype)


