"""DICOM inputs: a multi-frame file, or a series folder with one file per slice, read frame by frame.

Slices of a series are ordered by their position along the slice normal (ImagePositionPatient ·
(row × column direction)), else by InstanceNumber, else by natural file name. Pixel values are the
stored values as pydicom decodes them (YBR is converted to RGB; no modality rescale is applied).
Spacing comes from PixelSpacing and the slice positions, SpacingBetweenSlices or SliceThickness (mm),
reported in micrometers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import iter_pixels

from stacktrain.errors import InputError

from .readers import FrameReader, _all_or_none, _um, is_dicom_file, natural_key

GEOMETRY = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelRepresentation")


def open_dicom(path: Path) -> FrameReader:
    if not path.is_dir():
        return DicomFile(path)
    files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name.upper() != "DICOMDIR"), key=lambda p: natural_key(p.name))
    for p in files:
        if not is_dicom_file(p):
            raise InputError(f"{p}: not a DICOM file; remove it from the series folder {path}")
    return DicomSeries(path, files)


def _spacing(ds, z_mm=None) -> tuple[float, float, float] | None:
    """(z, y, x) micrometers from the top level or the shared functional groups of a multi-frame file."""
    pixel, thick, between = ds.get("PixelSpacing"), ds.get("SliceThickness"), ds.get("SpacingBetweenSlices")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if pixel is None and shared and shared[0].get("PixelMeasuresSequence"):
        measures = shared[0].PixelMeasuresSequence[0]
        pixel = measures.get("PixelSpacing")
        thick, between = thick or measures.get("SliceThickness"), between or measures.get("SpacingBetweenSlices")
    z = z_mm or between or thick
    if pixel is None or z is None:
        return None
    return _all_or_none([_um(z, "mm"), _um(pixel[0], "mm"), _um(pixel[1], "mm")])


def _read_header(path: Path, folder: Path | None = None):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:
        where = f"; remove it from the series folder {folder}" if folder else ""
        raise InputError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}){where}") from e


class DicomFile(FrameReader):
    """A single DICOM file; its frames (NumberOfFrames, 1 when absent) are the z axis."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        ds = _read_header(path)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        first = next(iter_pixels(path, indices=[0]))
        if n > 1:  # decoding the last frame is a cheap check that the file is complete
            next(iter_pixels(path, indices=[n - 1]))
        self.shape, self.dtype = (n, *first.shape), first.dtype
        self.inferred_axes = "zyx" if first.ndim == 2 else "zyxc"
        self.spacing_zyx = _spacing(ds)

    def iter_frames(self, indices: range):
        yield from iter_pixels(self.path, indices=list(indices))


class DicomSeries(FrameReader):
    """A folder of single-frame DICOM files of one series; one file per z slice."""

    def __init__(self, folder: Path, files: list[Path]):
        self.path, self.name = folder, str(folder)
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
        order, z_mm = self._order(files, headers)
        self.files = [files[i] for i in order]
        first = self._read(self.files[0])
        self.shape, self.dtype = (len(files), *first.shape), first.dtype
        self.inferred_axes = "zyx" if first.ndim == 2 else "zyxc"
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
            return order, (float(np.median(gaps)) if n > 1 else None)
        numbers = [ds.get("InstanceNumber") for ds in headers]
        if all(v is not None for v in numbers):
            return sorted(range(n), key=lambda i: int(numbers[i])), None
        return list(range(n)), None  # files are already in natural name order

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            return pydicom.dcmread(path).pixel_array
        except Exception as e:
            raise InputError(f"{path}: cannot decode this slice ({type(e).__name__}: {e}); the file is "
                             "truncated or corrupt, re-export it") from e

    def iter_frames(self, indices: range):
        for i in indices:
            yield self._read(self.files[i])
