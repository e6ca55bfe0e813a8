"""Bad raw inputs, made in the test's own folder: each maker writes one input and returns the path the
manifest names (relative to the folder). Small: 8 slices of 16 x 16 voxels, 3 channels. Also the
fault suite's manifests and stores (a store that already holds one stack, 'prior')."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import tifffile
from PIL import Image

from stacktrain.stores.convert import convert
from stacktrain.stores.options import ConvertOptions
from stacktrain.testing import tissue
from tests.stores.test_sources import write_dicom

SHAPE = (3, 8, 16, 16)  # c, z, y, x
VOL = tissue(SHAPE, seed=5)
BOMB = (3, 100_000, 100_000, 100_000)  # 3e15 bytes claimed
TINY = dict(workers=1, chunk_zyx=(4, 16, 16), shard_zyx=(8, 16, 16), min_patch_zyx=(4, 16, 16))
GOOD = tissue((3, 8, 16, 16), seed=1)


def write_manifest(folder: Path, rows, name: str = "labels.csv") -> Path:
    with (folder / name).open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return folder / name


def registered(store: Path) -> list[str]:
    return [e["stack_id"] for e in json.loads((store / "zarr.json").read_text())["attributes"]["stacktrain"]["stacks"]]


def prior_store(folder: Path) -> Path:
    """A store that already holds one stack ('prior'), from an earlier manifest."""
    np.save(folder / "p.npy", tissue((3, 8, 16, 16), seed=9))
    convert(write_manifest(folder, [("p.npy", "prior", "SAIN", "p0")]), folder / "s.zarr", ConvertOptions(**TINY))
    return folder / "s.zarr"


def copy_store(store: Path, folder: Path) -> Path:
    shutil.copytree(store, folder / "s.zarr")
    return folder / "s.zarr"


def cut(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flip(path: Path, at: float = 0.6, n: int = 16) -> Path:
    """Overwrite n bytes in the middle (keeps the size: the damage is only in the content)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0x5A for b in data[i:i + n])
    path.write_bytes(bytes(data))
    return path


def npy_header(shape, dtype=np.uint8) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


# -- npy / npz ----------------------------------------------------------------------------------------
def npy(folder: Path, name: str, arr) -> str:
    np.save(folder / name, arr)
    return name


def npy_lying(folder: Path, claim, data_shape=SHAPE) -> str:
    (folder / "lie.npy").write_bytes(npy_header(claim) + np.zeros(data_shape, np.uint8).tobytes())
    return "lie.npy"


def npz_bomb(folder: Path, compressed: bool = True) -> str:
    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(folder / "bomb.npz", "w", mode) as z:
        z.writestr("arr_0.npy", npy_header(BOMB) + b"\0" * 4096)
    return "bomb.npz"


def npz_member(folder: Path, claim, data_shape=SHAPE) -> str:
    """A deflated .npz whose array header claims `claim` while the member holds `data_shape`."""
    with zipfile.ZipFile(folder / "lie.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("arr_0.npy", npy_header(claim) + VOL.reshape(-1)[: int(np.prod(data_shape))].tobytes())
    return "lie.npz"


def npz_text_only(folder: Path) -> str:
    with zipfile.ZipFile(folder / "notes.npz", "w") as z:
        z.writestr("readme.txt", "no array here")
    return "notes.npz"


def npz_corrupt_stream(folder: Path) -> str:
    np.savez_compressed(folder / "bad.npz", tissue((3, 8, 32, 32), seed=2))
    flip(folder / "bad.npz", 0.5, 64)  # central directory intact, deflate stream damaged
    return "bad.npz"


# -- NIfTI -------------------------------------------------------------------------------------------
def nifti(folder: Path, name: str, arr_xyz) -> str:
    nib.save(nib.Nifti1Image(arr_xyz, np.eye(4)), folder / name)
    return name


def nifti_rgb(folder: Path) -> str:
    return nifti(folder, "a.nii.gz", np.ascontiguousarray(VOL.transpose(3, 2, 1, 0)))


def nifti_with_dims(folder: Path, name: str, dims, *, sizeof_hdr: int = 348) -> str:
    """A valid .nii(.gz) whose header's dims are then set to `dims` (the data stays as written)."""
    nifti(folder, "src.nii", np.ascontiguousarray(VOL[0].transpose(2, 1, 0)))
    data = bytearray((folder / "src.nii").read_bytes())
    (folder / "src.nii").unlink()
    struct.pack_into("<i", data, 0, sizeof_hdr)
    struct.pack_into("<8h", data, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    (folder / name).write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    return name


# -- TIFF --------------------------------------------------------------------------------------------
def tiff(folder: Path, name: str = "a.tif", compression=None, arr=None) -> str:
    arr = VOL.transpose(1, 2, 3, 0) if arr is None else arr
    tifffile.imwrite(folder / name, arr, photometric="rgb" if arr.shape[-1] == 3 else "minisblack",
                     compression=compression)
    return name


def tiff_patched(folder: Path, tag: str, value: int, pages=(3,), compression=None) -> str:
    """A TIFF with one tag of some pages overwritten in place (its value is inline: one short/long)."""
    name = tiff(folder, "patched.tif", compression)
    data = bytearray((folder / name).read_bytes())
    with tifffile.TiffFile(folder / name) as t:
        for p in pages:
            entry = t.pages[p].tags[tag]
            struct.pack_into("<" + {3: "H", 4: "I"}[entry.dtype], data, entry.valueoffset, value)
    (folder / name).write_bytes(bytes(data))
    return name


def tiff_two_shapes(folder: Path) -> str:
    with tifffile.TiffWriter(folder / "mixed.tif") as w:
        for z in range(8):
            w.write(np.zeros((16, 16 if z < 5 else 20, 3), np.uint8), photometric="rgb", contiguous=False)
    return "mixed.tif"


# -- slice folders -----------------------------------------------------------------------------------
def pngs(folder: Path, name: str = "s", n: int = 8, mode: str | None = None, arr=None) -> Path:
    (folder / name).mkdir()
    for z in range(n):
        img = VOL[:, z].transpose(1, 2, 0) if arr is None else arr[z]
        Image.fromarray(img, mode).save(folder / name / f"img{z}.png")
    return folder / name


def png_header_lie(folder: Path, size: int = 12_000) -> str:
    """Slice 3's IHDR says size x size (CRC fixed, so only the size check can tell)."""
    path = pngs(folder) / "img3.png"
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, size, size)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return "s"


# -- DICOM -------------------------------------------------------------------------------------------
def dicom_series(folder: Path, zs=range(8), name: str = "d", series=lambda z: "1.2.3.4", frames=None) -> Path:
    (folder / name).mkdir()
    for z in zs:
        img = VOL[:, z % 8].transpose(1, 2, 0)[None] if frames is None else frames(z)
        write_dicom(folder / name / f"s{z:02d}.dcm", img, z=z, series=series(z))
    return folder / name


def dicom_without_positions(folder: Path) -> str:
    """The series ordered by InstanceNumber only (write_dicom numbers them 100 - z)."""
    for p in folder.iterdir():
        dicom_edited(p, ImagePositionPatient=None, ImageOrientationPatient=None)
    return folder.name


def dicom_edited(path: Path, **tags) -> Path:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


def dicom_multiframe(folder: Path, **tags) -> str:
    write_dicom(folder / "mf.dcm", VOL.transpose(1, 2, 3, 0))
    dicom_edited(folder / "mf.dcm", **tags)
    return "mf.dcm"


def real_ct_series(folder: Path, drop: str | None = None) -> str:
    """pydicom's shipped 5-slice CT series (16 x 16, 2.5 mm apart), copied, optionally without one file."""
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("examples_ybr_color.dcm")).parent / "dicomdirtests/98892001/CT5N"
    (folder / "ct").mkdir()
    for p in src.iterdir():
        if p.name != drop:
            (folder / "ct" / p.name).write_bytes(p.read_bytes())
    return "ct"
