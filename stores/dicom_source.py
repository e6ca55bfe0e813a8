"""DICOM inputs: a multi-frame file, or a series folder with one file per slice, read frame by frame.

Slices of a series are ordered by their position along the slice normal (ImagePositionPatient ·
(row × column direction)), else by InstanceNumber, else by natural file name. Pixel values are the
stored values as pydicom decodes them (YBR is converted to RGB; no modality rescale is applied).
Spacing comes from PixelSpacing and the slice positions, SpacingBetweenSlices or SliceThickness (mm),
reported in micrometers. A gap between neighbouring positions wider than GAP_FACTOR times the median
spacing means slices are missing: refused, unless `allow_gaps`, which keeps the gaps in `.gaps`.
Rows x Columns x frames are held against the file's size before a frame is decoded (guards.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import iter_pixels

from stacktrain.errors import InputError

from .guards import check_fits, check_ratio, one_line
from .readers import FrameReader, _all_or_none, _um, is_dicom_file, natural_key

GEOMETRY = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelRepresentation")
GAP_FACTOR = 1.5


def open_dicom(path: Path, *, allow_gaps: bool = False) -> FrameReader:
    if not path.is_dir():
        return DicomFile(path)
    files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name.upper() != "DICOMDIR"), key=lambda p: natural_key(p.name))
    for p in files:
        if not is_dicom_file(p):
            raise InputError(f"{p}: not a DICOM file; remove it from the series folder {path}")
    return DicomSeries(path, files, allow_gaps=allow_gaps)


def _spacing(ds, z_mm=None) -> tuple[float, float, float] | None:
    """(z, y, x) micrometers from the top level, else the shared, else the first frame's functional groups
    of a multi-frame (enhanced) file; z from the frames' positions when they have them."""
    pixel, thick, between = ds.get("PixelSpacing"), ds.get("SliceThickness"), ds.get("SpacingBetweenSlices")
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        if pixel is None and groups and groups[0].get("PixelMeasuresSequence"):
            measures = groups[0].PixelMeasuresSequence[0]
            pixel = measures.get("PixelSpacing")
            thick, between = thick or measures.get("SliceThickness"), between or measures.get("SpacingBetweenSlices")
    z = z_mm or _frame_step(ds) or between or thick
    if pixel is None or z is None:
        return None
    return _all_or_none([_um(z, "mm"), _um(pixel[0], "mm"), _um(pixel[1], "mm")])


def _frame_step(ds) -> float | None:
    """The distance (mm) between the first two frames' ImagePositionPatient of an enhanced file."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    try:
        a, b = (f.PlanePositionSequence[0].ImagePositionPatient for f in frames[:2])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    step = sum((float(u) - float(v)) ** 2 for u, v in zip(a, b)) ** 0.5
    return step or None


def _read_header(path: Path, folder: Path | None = None):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:
        where = f"; remove it from the series folder {folder}" if folder else ""
        raise InputError(f"{path}: not a readable DICOM file ({type(e).__name__}: {one_line(e)}){where}") from e


def _check_pixels(path: Path, ds, frames: int) -> None:
    """The pixel data a header claims (Rows x Columns x SamplesPerPixel x frames) fits in the file."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) is None]
    if missing:
        raise InputError(f"{path}: DICOM header lacks {', '.join(missing)}; this file holds no image (a report or "
                         "a DICOMDIR?), remove it or give the image files")
    rows, cols, spp, bits = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    shape, itemsize = ((frames, rows, cols, spp), bits // 8) if bits % 8 == 0 else \
        ((frames, rows, -(-cols * spp * bits // 8)), 1)  # bit-packed (1-bit) pixels, in whole bytes per row
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    size = path.stat().st_size
    if syntax is not None and (syntax.is_compressed or syntax.is_deflated):
        codec = "deflate" if syntax.is_deflated else (syntax.name or "compressed")
        check_ratio(str(path), shape, itemsize, size, codec, "the DICOM header")
    else:
        check_fits(str(path), shape, itemsize, size, what="the DICOM header")


class DicomFile(FrameReader):
    """A single DICOM file; its frames (NumberOfFrames, 1 when absent) are the z axis."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        ds = _read_header(path)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        _check_pixels(path, ds, n)
        first = next(iter_pixels(path, indices=[0]))
        if n > 1:  # decoding the last frame is a cheap check that the file is complete
            next(iter_pixels(path, indices=[n - 1]))
        self.shape, self.dtype = (n, *first.shape), first.dtype
        self.inferred_axes = "zyx" if first.ndim == 2 else "zyxc"
        self.stated_axes = True  # frames are slices; samples per pixel are channels
        self.spacing_zyx = _spacing(ds)

    def iter_frames(self, indices: range):
        yield from iter_pixels(self.path, indices=list(indices))


class DicomSeries(FrameReader):
    """A folder of single-frame DICOM files of one series; one file per z slice."""

    def __init__(self, folder: Path, files: list[Path], *, allow_gaps: bool = False):
        self.path, self.name = folder, str(folder)
        self.allow_gaps, self.gaps = allow_gaps, None
        headers = [_read_header(p, folder) for p in files]
        series = {str(ds.get("SeriesInstanceUID")) for ds in headers}
        if len(series) > 1:
            raise InputError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
        for p, ds in zip(files, headers):
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise InputError(f"{p}: a multi-frame file inside a series folder; give the file itself "
                                 "as the stack's path")
            if [ds.get(k) for k in GEOMETRY] != [headers[0].get(k) for k in GEOMETRY]:
                raise InputError(
                    f"{folder}: slice {p.name} has {', '.join(f'{k}={ds.get(k)}' for k in GEOMETRY)} but "
                    f"{files[0].name} has {', '.join(f'{k}={headers[0].get(k)}' for k in GEOMETRY)}; "
                    "all slices of a series must have the same size and pixel format")
            _check_pixels(p, ds, 1)
        order, z_mm = self._order(files, headers)
        self.files = [files[i] for i in order]
        first = self._read(self.files[0])
        self.shape, self.dtype = (len(files), *first.shape), first.dtype
        self.inferred_axes = "zyx" if first.ndim == 2 else "zyxc"
        self.stated_axes = True  # frames are slices; samples per pixel are channels
        self.spacing_zyx = _spacing(headers[order[0]], z_mm)

    def _order(self, files, headers) -> tuple[list[int], float | None]:
        n = len(files)
        orient = [ds.get("ImageOrientationPatient") for ds in headers]
        origin = [ds.get("ImagePositionPatient") for ds in headers]
        if all(o is not None for o in orient) and all(p is not None for p in origin):
            normal = np.cross(np.asarray(orient[0][:3], float), np.asarray(orient[0][3:], float))
            pos = [float(np.dot(np.asarray(p, float), normal)) for p in origin]
            order = sorted(range(n), key=lambda i: pos[i])
            gaps = np.diff([pos[i] for i in order])
            if n > 1 and np.any(np.isclose(gaps, 0.0)):
                k = int(np.argmax(np.isclose(gaps, 0.0)))
                raise InputError(f"{self.path}: slices {files[order[k]].name} and {files[order[k + 1]].name} "
                                 "lie at the same position; the folder mixes several acquisitions")
            if n < 2:
                return order, None
            median = float(np.median(gaps))
            self._check_gaps([files[i].name for i in order], [pos[i] for i in order], "mm")
            return order, median
        numbers = [ds.get("InstanceNumber") for ds in headers]
        if all(v is not None for v in numbers):
            order = sorted(range(n), key=lambda i: int(numbers[i]))
            self._check_gaps([files[i].name for i in order], [int(numbers[i]) for i in order], "InstanceNumber")
            return order, None
        return list(range(n)), None  # files are already in natural name order

    def _check_gaps(self, names: list[str], pos: list[float], unit: str) -> None:
        """Missing slices show as a step wider than GAP_FACTOR x the median step (positions in mm, else
        InstanceNumbers): refused unless allowed, then kept in `self.gaps`."""
        if len(pos) < 3:  # two slices have one step: nothing to compare it with
            return
        steps = np.diff(pos)
        median = float(np.median(steps))
        wide = [k for k, g in enumerate(steps) if g > GAP_FACTOR * median]
        if not wide:
            return
        if self.allow_gaps:
            self.gaps = {"unit": unit, "median_step": round(median, 6),
                         "between": [[round(float(pos[k]), 6), round(float(pos[k + 1]), 6)] for k in wide]}
            return
        k, at = wide[0], ("at " if unit == "mm" else f"{unit} ")
        sfx = " mm" if unit == "mm" else ""
        more = f" (and {len(wide) - 1} more gap(s))" if len(wide) > 1 else ""
        raise InputError(f"{self.path}: slices are missing between {names[k]} {at}{pos[k]:.6g}{sfx} and {names[k + 1]} "
                         f"{at}{pos[k + 1]:.6g}{sfx}: a step of {steps[k]:.6g}{sfx} where the series' median step is "
                         f"{median:.6g}{sfx}{more}; add the missing files, or pass --allow-gaps to convert it with the "
                         "gaps recorded in the stack's metadata")

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            return pydicom.dcmread(path).pixel_array
        except Exception as e:
            raise InputError(f"{path}: cannot decode this slice ({type(e).__name__}: {one_line(e)}); the file is "
                             "truncated or corrupt, re-export it") from e

    def iter_frames(self, indices: range):
        for i in indices:
            yield self._read(self.files[i])
