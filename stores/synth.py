"""`stacktrain synth`: deterministic raw stacks in every input format, with lesions in MALADE stacks.

Each stack is tissue-like: a smooth tissue mask with zero background around it, two smooth structure
fields mixed differently into 3 channels, per-voxel noise, and benign confounders in every stack
(small bright spots, thin fibers, dark holes). MALADE stacks also get lesions: compact speckled
spheroids, bright in channels 0 and 2 and dark in channel 1, placed in 30-50% of the 16x32x32 regions
that hold tissue, so many patches of a MALADE stack look healthy. Everything derives from
(seed, stack index): same arguments, same bytes. Stacks are generated and written slab by slab.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from stacktrain.errors import InputError
from stacktrain.ui import byte_progress

FORMATS = ("tiff", "ome-tiff", "png", "nifti", "npy", "dicom", "dicom-series")
REGION_ZYX = (16, 32, 32)  # the demo's patch: lesions are placed per region of this size
SPACING_ZYX_UM = (2.0, 0.5, 0.5)
SLAB = 8
# The smallest stack `convert` takes without --pad: one 32x256x256 patch (tests pass smaller shapes).
DEFAULT_SHAPE_ZYX = (32, 256, 256)
BASE = np.array([120.0, 135.0, 110.0], np.float32)  # channel means inside tissue: room for lesions
# (kind, radii zyx range, channel gains, speckle): lesions differ from confounders in size, shape,
# channel signature and texture, so a tiny 3-D CNN can learn them.
LESION = ((2.5, 4.0), (4.0, 6.5)), (80.0, -70.0, 75.0), 0.45
CONFOUNDERS = {  # kind: (count per tissue region, radii (z, y, x) or None for random, gains, speckle)
    "spot": (1.5, (1.3, 1.8, 1.8), (30.0, 90.0, 10.0), 0.0),
    "fiber": (0.4, None, (40.0, 40.0, 40.0), 0.0),
    "hole": (0.3, (3.0, 5.5, 5.5), (-50.0, -50.0, -50.0), 0.0),
}


class SmoothField:
    """A unit-variance smooth random field: Gaussian bumps on a lattice of `cell` voxels with normal
    amplitudes, evaluated slab by slab (separable weights, so only (k_z, Y, X) is kept in memory)."""

    def __init__(self, rng: np.random.Generator, shape_zyx, cell_zyx):
        self.bases = [self._basis(n, c) for n, c in zip(shape_zyx, cell_zyx)]
        self.amplitudes = rng.standard_normal([b.shape[1] for b in self.bases]).astype(np.float32)
        bz, by, bx = self.bases
        # Two einsum contractions (no BLAS, so bit-reproducible whatever the thread count).
        self.planes = np.einsum("abx,yb->ayx", np.einsum("abc,xc->abx", self.amplitudes, bx), by)

    @staticmethod
    def _basis(n: int, cell: float) -> np.ndarray:
        k = int(np.ceil(n / cell)) + 3
        centers = (np.arange(k) - 1.5) * cell
        w = np.exp(-0.5 * ((np.arange(n)[:, None] + 0.5 - centers[None]) / (0.6 * cell)) ** 2)
        return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        return np.einsum("za,ayx->zyx", self.bases[0][z0:z1], self.planes)

    def at(self, z: int, y: int, x: int) -> float:
        bz, by, bx = self.bases
        return float(np.einsum("abc,a,b,c->", self.amplitudes, bz[z], by[y], bx[x]))


@dataclasses.dataclass
class Blob:
    kind: str
    lo: tuple[int, int, int]  # box corner in voxels (may lie partly outside the stack)
    delta: np.ndarray  # (3, bz, by, bx) float32 intensity change
    weight: np.ndarray  # (bz, by, bx) in [0, 1]: 1 inside, soft edge


def make_blob(rng, kind, center, radii, gains, speckle) -> Blob:
    half = [int(np.ceil(1.5 * r + 1)) for r in radii]
    lo = tuple(int(round(c)) - h for c, h in zip(center, half))
    grids = np.meshgrid(*[np.arange(l, l + 2 * h + 1) for l, h in zip(lo, half)], indexing="ij")
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)))
    weight = (1.0 / (1.0 + np.exp((dist - 1.0) * 8.0))).astype(np.float32)
    texture = 1.0
    if speckle:  # granular interior: fine smoothed noise, normalized
        grain = ndimage.gaussian_filter(rng.standard_normal(weight.shape), 0.7)
        texture = 1.0 + speckle * grain / (grain.std() + 1e-6)
    delta = (np.asarray(gains, np.float32)[:, None, None, None] * (weight * texture)[None]).astype(np.float32)
    return Blob(kind, lo, delta, weight)


class SynthStack:
    """One synthetic stack: its label, group and format, and its voxels generated on demand per slab."""

    def __init__(self, *, index: int, seed: int, shape_zyx, label: str, group: str, dtype: str = "uint8",
                 patient: int = 0, patient_effect: float = 0.0, difficulty: float = 0.0):
        self.index, self.seed, self.shape_zyx = index, seed, tuple(shape_zyx)
        self.stack_id, self.label, self.group = f"stack{index:03d}", label, group
        self.patient, self.patient_effect, self.difficulty = patient, patient_effect, difficulty
        self.format = FORMATS[index % len(FORMATS)]
        self.dtype = np.dtype(dtype)  # one dtype per dataset: the DALI graph decodes one dtype

    @functools.cached_property
    def model(self) -> SimpleNamespace:
        """Random fields, tissue threshold and blobs: built on first use, dropped by `release()`."""
        rng = np.random.default_rng([self.seed, self.index, 1])
        shape = self.shape_zyx
        m = SimpleNamespace(tissue=SmoothField(rng, shape, (24, 48, 48)),
                            coarse=SmoothField(rng, shape, (6, 10, 10)), fine=SmoothField(rng, shape, (3, 5, 5)))
        # Staining varies between stacks, mostly in overall brightness: independent per-channel shifts
        # would sometimes mimic the lesion colour (dark channel 1) over a whole stack.
        m.base = (BASE + rng.normal(0, 8) + rng.normal(0, 3, 3)).astype(np.float32)
        # The patient effect: staining (per-channel shift), brightness and texture shared by a patient's
        # stacks, drawn from the patient's own generator (so stacks of one patient are correlated).
        prng = np.random.default_rng([self.seed, 7, self.patient])
        e = self.patient_effect
        m.base += (e * (prng.normal(0, 10) + prng.normal(0, 8, 3))).astype(np.float32)
        m.texture = float(max(0.3, 1.0 + e * prng.normal(0, 0.3)))
        m.noise = float(8.0 * max(0.5, 1.0 + e * prng.normal(0, 0.3)))
        # Threshold at the 25th percentile: about a quarter of each stack is empty background.
        sample = [m.tissue.slab(k, k + 1)[:, ::4, ::4].ravel() for k in range(0, shape[0], 4)]
        m.threshold = float(np.quantile(np.concatenate(sample), 0.25))
        m.blobs = self._place_blobs(np.random.default_rng([self.seed, self.index, 3]), m)
        return m

    def release(self) -> None:
        self.__dict__.pop("model", None)

    @staticmethod
    def _in_tissue(m, point) -> bool:
        return m.tissue.at(*(int(p) for p in point)) > m.threshold

    def regions(self) -> list[tuple[tuple[int, int], ...]]:
        """The 16x32x32 region boxes ((z0, z1), (y0, y1), (x0, x1)) covering the stack."""
        ranges = [[(a, min(a + r, n)) for a in range(0, n, r)] for n, r in zip(self.shape_zyx, REGION_ZYX)]
        return [(rz, ry, rx) for rz in ranges[0] for ry in ranges[1] for rx in ranges[2]]

    @staticmethod
    def _random_point(rng, box, margin=(0, 0, 0)):
        return [rng.uniform(lo + min(m, (hi - lo) / 2), hi - min(m, (hi - lo) / 2))
                for (lo, hi), m in zip(box, margin)]

    def _place_blobs(self, rng, m) -> list[Blob]:
        blobs = []
        tissue_regions = [b for b in self.regions() if self._in_tissue(m, [(lo + hi - 1) / 2 for lo, hi in b])]
        for box in tissue_regions:
            for kind, (rate, radii, gains, speckle) in CONFOUNDERS.items():
                for _ in range(rng.poisson(rate)):
                    center = self._random_point(rng, box)
                    if kind == "fiber":  # thin and long, along y or x
                        radii = (1.5, 9.0, 1.5) if rng.random() < 0.5 else (1.5, 1.5, 9.0)
                    if self._in_tissue(m, center):
                        blobs.append(make_blob(rng, kind, center, radii, gains, speckle))
        if self.label == "MALADE" and tissue_regions:
            (rz, ryx), gains, speckle = LESION
            d = self.difficulty  # fainter, smaller lesions in fewer regions
            gains = tuple(g * (1 - 0.6 * d) for g in gains)
            n_hit = max(1, int(round(rng.uniform(0.3, 0.5) * (1 - 0.6 * d) * len(tissue_regions))))
            for k in rng.choice(len(tissue_regions), n_hit, replace=False):
                for _ in range(int(rng.integers(1, 3))):
                    radii = tuple(rng.uniform(*r) * (1 - 0.3 * d) for r in (rz, ryx, ryx))
                    box = tissue_regions[k]
                    center = self._random_point(rng, box, [r + 1 for r in radii])
                    for _ in range(10):
                        if self._in_tissue(m, center):
                            break
                        center = self._random_point(rng, box, [r + 1 for r in radii])
                    blobs.append(make_blob(rng, "lesion", center, radii, gains, speckle))
        return blobs

    def _paint(self, z0, z1, target, kind_filter, use_weight=False):
        for blob in self.model.blobs:
            if not kind_filter(blob.kind):
                continue
            src, dst = [], []
            for lo, size, a, b in zip(blob.lo, blob.weight.shape, (z0, 0, 0), (z1, *self.shape_zyx[1:])):
                s0, s1 = max(lo, a), min(lo + size, b)
                if s0 >= s1:
                    break
                src.append(slice(s0 - lo, s1 - lo))
                dst.append(slice(s0 - a, s1 - a))
            else:
                if use_weight:
                    target[tuple(dst)] |= blob.weight[tuple(src)] > 0.5
                else:
                    target[(slice(None), *dst)] += blob.delta[(slice(None), *src)]

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """Voxels (3, z1 - z0, Y, X) in the stack's dtype; background is exactly 0."""
        m = self.model
        tissue_field = m.tissue.slab(z0, z1)
        tissue = tissue_field > m.threshold
        a, b = m.coarse.slab(z0, z1), m.fine.slab(z0, z1)
        # Channel mix of (coarse, fine, tissue field): the coarse direction (25, 28, -18) is nearly
        # orthogonal to the lesion signature (80, -70, 75), so structure does not look like lesions.
        mix = np.array([[25.0, 10.0, 8.0], [28.0, 12.0, 6.0], [-18.0, 10.0, 8.0]], np.float32)
        img = np.empty((3, z1 - z0, *self.shape_zyx[1:]), np.float32)
        for ch in range(3):
            if m.texture == 1.0:  # no patient effect: the same bytes as before it existed
                img[ch] = m.base[ch] + mix[ch, 0] * a + mix[ch, 1] * b + mix[ch, 2] * tissue_field
            else:
                img[ch] = m.base[ch] + m.texture * (mix[ch, 0] * a + mix[ch, 1] * b) + mix[ch, 2] * tissue_field
        for k, z in enumerate(range(z0, z1)):  # per-slice noise: the same whatever the slab depth
            img[:, k] += m.noise * np.random.default_rng([self.seed, self.index, 2, z]).standard_normal(
                (3, *self.shape_zyx[1:]), dtype=np.float32)
        self._paint(z0, z1, img, lambda kind: True)
        out = (np.clip(np.rint(img), 1, 255) * tissue[None]).astype(np.uint8)
        return out.astype(np.uint16) * 257 if self.dtype == np.uint16 else out

    def lesion_mask(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Where lesions are (inside tissue), (z1 - z0, Y, X) bool: the generator's ground truth."""
        z1 = self.shape_zyx[0] if z1 is None else z1
        mask = np.zeros((z1 - z0, *self.shape_zyx[1:]), bool)
        self._paint(z0, z1, mask, lambda kind: kind == "lesion", use_weight=True)
        return mask & (self.model.tissue.slab(z0, z1) > self.model.threshold)

    def slabs(self, depth: int = SLAB):
        for z0 in range(0, self.shape_zyx[0], depth):
            yield z0, self.slab(z0, min(z0 + depth, self.shape_zyx[0]))

    def volume(self) -> np.ndarray:
        return np.concatenate([s for _, s in self.slabs()], axis=1)

    @property
    def nbytes(self) -> int:
        return 3 * int(np.prod(self.shape_zyx)) * self.dtype.itemsize


def plan(stacks: int = 12, shape_zyx=DEFAULT_SHAPE_ZYX, seed: int = 0, dtype: str = "uint8", *,
         prevalence: float = 0.5, patient_effect: float = 0.0, difficulty: float = 0.0) -> list[SynthStack]:
    """The stacks `synth` writes: patients of 1-3 stacks, labels per patient, a share `prevalence` of
    the stacks MALADE; `patient_effect` (0: none, 1: strong) scales the staining, brightness and texture
    a patient's stacks share; `difficulty` (0..1) makes lesions fainter, smaller and rarer."""
    for name, value, hi in (("prevalence", prevalence, 1.0), ("patient-effect", patient_effect, 3.0),
                            ("difficulty", difficulty, 1.0)):
        if not 0 <= value <= hi or (name == "prevalence" and not 0 < value < 1):
            raise InputError(f"--{name} must be in {'(0, 1)' if name == 'prevalence' else f'[0, {hi:g}]'}, "
                             f"got {value}")
    if dtype not in ("uint8", "uint16"):
        raise InputError(f"--dtype must be uint8 or uint16, got {dtype!r}")
    if stacks < 1:
        raise InputError(f"--stacks must be at least 1, got {stacks}")
    if len(shape_zyx) != 3 or min(shape_zyx) < 8:
        raise InputError(f"--shape must be three sizes Z Y X of at least 8, got {tuple(shape_zyx)}")
    rng = np.random.default_rng([seed, 0])
    sizes = []
    while sum(sizes) < stacks:
        sizes.append(min(int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])), stacks - sum(sizes)))
    counts, patient_label = {"SAIN": 0, "MALADE": 0}, {}
    # Largest patients first, each to the class with fewer stacks so far: the classes end up balanced
    # (an imbalance would shift the mean patch probability of healthy-looking patches off 0.5).
    share = {"SAIN": 1 - prevalence, "MALADE": prevalence}
    for p in sorted(range(len(sizes)), key=lambda k: (-sizes[k], rng.random())):
        label = min(counts, key=lambda k: (counts[k] / share[k], rng.random()))
        patient_label[int(p)] = label
        counts[label] += sizes[p]
    out, index = [], 0
    for p, size in enumerate(sizes):
        for _ in range(size):
            out.append(SynthStack(index=index, seed=seed, shape_zyx=tuple(int(v) for v in shape_zyx),
                                  label=patient_label[p], group=f"patient{p:03d}", dtype=dtype, patient=p,
                                  patient_effect=patient_effect, difficulty=difficulty))
            index += 1
    return out


def synth(out_dir: str | Path, *, stacks: int = 12, shape_zyx=DEFAULT_SHAPE_ZYX, seed: int = 0,
          dtype: str = "uint8", prevalence: float = 0.5, patient_effect: float = 0.0, difficulty: float = 0.0,
          progress: bool = True) -> Path:
    """Write the stacks of `plan(...)` under `out_dir` and `out_dir/labels.csv`; return the csv path."""
    out_dir = Path(out_dir)
    items = plan(stacks, shape_zyx, seed, dtype, prevalence=prevalence, patient_effect=patient_effect,
                 difficulty=difficulty)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    rows = []
    with byte_progress(progress, "synth", sum(s.nbytes for s in items)) as advance:
        for item in items:
            name = write(item, staging)
            replace(staging / name, out_dir / name)
            rows.append({"path": name, "stack_id": item.stack_id, "label": item.label, "group": item.group})
            item.release()  # one stack's fields and blobs in memory at a time
            advance(item.nbytes, f"{item.stack_id} {item.format}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "stack_id", "label", "group"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    labels = out_dir / "labels.csv"
    tmp = staging / "labels.csv"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, labels)
    shutil.rmtree(staging, ignore_errors=True)
    return labels


# -- writers: one per format, each streaming slabs where its library allows ---------------------------
NAMES = {"tiff": "{}.tif", "ome-tiff": "{}.ome.tif", "png": "{}-png", "nifti": "{}.nii.gz", "npy": "{}.npy",
         "dicom": "{}.dcm", "dicom-series": "{}-dicom"}


def _uid(item: SynthStack, role: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["stacktrain-synth", str(item.seed), item.stack_id, role])


def _dicom(item: SynthStack, frames: np.ndarray, *, role: str, z: int | None):
    """A Secondary Capture dataset (multi-frame when z is None) holding RGB frames (n, Y, X, 3)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = "1.2.840.10008.5.1.4.1.1.7" if z is not None else "1.2.840.10008.5.1.4.1.1.7.4"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, _uid(item, role)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(item, "study"), _uid(item, "series")
    ds.FrameOfReferenceUID = _uid(item, "frame")
    ds.PatientID = ds.PatientName = item.group
    ds.Modality, ds.ConversionType, ds.SeriesNumber = "OT", "SYN", 1
    ds.InstanceNumber = 1 if z is None else z + 1
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    bits = frames.dtype.itemsize * 8  # 8 or 16: a uint16 dataset's frames are 16-bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    dz, dy, dx = (v / 1000.0 for v in SPACING_ZYX_UM)  # DICOM lengths are millimeters
    ds.PixelSpacing = [dy, dx]
    ds.SliceThickness = ds.SpacingBetweenSlices = dz
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if z is None:
        ds.NumberOfFrames = frames.shape[0]
    else:
        ds.ImagePositionPatient = [0.0, 0.0, round(z * dz, 6)]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds


def write(item: SynthStack, folder: Path) -> str:
    """Write one stack under `folder` in its format; returns its file or folder name."""
    name = NAMES[item.format].format(item.stack_id)
    path = folder / name
    z, y, x = item.shape_zyx
    import tifffile

    if item.format in ("tiff", "ome-tiff"):
        if item.format == "tiff":  # RGB pages: axes inferred as z, y, x, samples
            pages = (s[:, k].transpose(1, 2, 0) for _, s in item.slabs() for k in range(s.shape[1]))
            tifffile.imwrite(path, pages, shape=(z, y, x, 3), dtype=item.dtype, photometric="rgb")
        else:  # one grayscale page per (z, c), with OME axes and physical size
            pages = (s[c, k] for _, s in item.slabs() for k in range(s.shape[1]) for c in range(3))
            digest = hashlib.sha256(f"{item.seed}/{item.stack_id}".encode()).digest()
            meta = {"axes": "ZCYX", "UUID": str(uuid.UUID(bytes=digest[:16])),
                    **{f"PhysicalSize{a}": v for a, v in zip("ZYX", SPACING_ZYX_UM)}}
            tifffile.imwrite(path, pages, shape=(z, 3, y, x), dtype=item.dtype, photometric="minisblack",
                             ome=True, metadata=meta)
    elif item.format == "png":  # slice0.png ... slice47.png: only natural sort gets the order right
        from PIL import Image

        path.mkdir()
        for z0, s in item.slabs():
            for k in range(s.shape[1]):
                rgb = s[:, k].transpose(1, 2, 0)
                if rgb.dtype == np.uint8:
                    Image.fromarray(rgb).save(path / f"slice{z0 + k}.png", compress_level=1)
                else:  # Pillow writes no 16-bit colour PNG: 16-bit RGB TIFF slices, read the same way
                    tifffile.imwrite(path / f"slice{z0 + k}.tif", rgb, photometric="rgb")
    elif item.format == "nifti":
        import nibabel as nib

        img = nib.Nifti1Image(item.volume().transpose(3, 2, 1, 0), np.diag([*SPACING_ZYX_UM[::-1], 1.0]))
        img.header.set_xyzt_units("micron")
        nib.save(img, path)
    elif item.format == "npy":  # channel-first: axes inferred as c, z, y, x
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=item.dtype, shape=(3, z, y, x))
        for z0, s in item.slabs():
            arr[:, z0:z0 + s.shape[1]] = s
        arr.flush()
        del arr
    elif item.format == "dicom":
        _dicom(item, item.volume().transpose(1, 2, 3, 0), role="image", z=None).save_as(
            path, enforce_file_format=True)
    else:  # a series: file names say nothing about order; the reader sorts by slice position
        path.mkdir()
        for z0, s in item.slabs():
            for k in range(s.shape[1]):
                role = f"slice{z0 + k}"
                ds = _dicom(item, s[:, k].transpose(1, 2, 0)[None], role=role, z=z0 + k)
                file = hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()[:12] + ".dcm"
                ds.save_as(path / file, enforce_file_format=True)
    return name


def replace(src: Path, dst: Path) -> None:
    """Move a finished file or folder into place, replacing what a previous run left there."""
    if dst.is_dir() and not dst.is_symlink():
        trash = src.parent / f"{dst.name}.old"
        os.replace(dst, trash)
        shutil.rmtree(trash)
    elif dst.exists() and src.is_dir():
        dst.unlink()
    os.replace(src, dst)


