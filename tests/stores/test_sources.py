"""Raw-stack readers: every format round-trips exactly, axes are inferred or asked for, bad input is named."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from stacktrain.errors import InputError
from stacktrain.stores.sources import open_source, source_sha256
from stacktrain.testing import tissue

VOL = tissue((3, 10, 24, 20), seed=3)  # (C, Z, Y, X) uint8
VOL16 = tissue((3, 10, 24, 20), seed=4, dtype=np.uint16)


def read_all(src, depth=4) -> np.ndarray:
    return np.concatenate([slab for _, slab in src.slabs(depth)], axis=1)


def write_dicom(path: Path, frames: np.ndarray, *, z: int | None = None, series: str = "1.2.3.4") -> None:
    """A minimal valid DICOM file: frames (n, Y, X) uint16 grayscale or (n, Y, X, 3) uint8 RGB."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rgb = frames.ndim == 4
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.PatientID = series, "OT", "p0"
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    bits = frames.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelSpacing, ds.SliceThickness = [0.25, 0.5], 3.0
    if z is None:
        ds.NumberOfFrames = frames.shape[0]
    else:
        ds.InstanceNumber = 100 - z  # deliberately opposite to the position order
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 1.5 * z]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


# -- writers: (name, write(tmp) -> path, expected (C, Z, Y, X) array, expected spacing) ------------------
def npy_zyx(tmp):
    np.save(tmp / "a.npy", VOL[0])
    return tmp / "a.npy", VOL[:1], None


def npy_czyx(tmp):
    np.save(tmp / "a.npy", VOL16)
    return tmp / "a.npy", VOL16, None


def npz_stored_zyxc(tmp):
    np.savez(tmp / "a.npz", VOL.transpose(1, 2, 3, 0))
    return tmp / "a.npz", VOL, None


def npz_deflated_fortran_czyx(tmp):
    np.savez_compressed(tmp / "a.npz", vol=np.asfortranarray(VOL))
    return tmp / "a.npz", VOL, None


def tiff_rgb(tmp):
    tifffile.imwrite(tmp / "a.tif", VOL.transpose(1, 2, 3, 0), photometric="rgb")
    return tmp / "a.tif", VOL, None


def tiff_gray(tmp):
    tifffile.imwrite(tmp / "a.tiff", VOL16[1], photometric="minisblack", compression="zlib")
    return tmp / "a.tiff", VOL16[1:2], None


def ome_tiff_czyx(tmp):
    meta = {"axes": "CZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.25}
    tifffile.imwrite(tmp / "a.ome.tif", VOL16, ome=True, photometric="minisblack", metadata=meta)
    return tmp / "a.ome.tif", VOL16, (2.0, 0.5, 0.25)


def ome_tiff_nm_units(tmp):
    meta = {"axes": "ZCYX", "PhysicalSizeZ": 800, "PhysicalSizeZUnit": "nm", "PhysicalSizeY": 200,
            "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 200, "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(tmp / "a.ome.tif", VOL.transpose(1, 0, 2, 3), ome=True, photometric="minisblack",
                     metadata=meta)
    return tmp / "a.ome.tif", VOL, (0.8, 0.2, 0.2)


def imagej_tiff(tmp):
    tifffile.imwrite(tmp / "a.tif", VOL.transpose(1, 0, 2, 3), imagej=True, resolution=(4.0, 2.0),
                     metadata={"axes": "ZCYX", "spacing": 3.0, "unit": "um"})
    return tmp / "a.tif", VOL, (3.0, 0.5, 0.25)


def png_rgb_slices(tmp):
    (tmp / "s").mkdir()
    for z in range(VOL.shape[1]):
        Image.fromarray(VOL[:, z].transpose(1, 2, 0)).save(tmp / "s" / f"img{z}.png")
    return tmp / "s", VOL, None


def png16_slices(tmp):
    (tmp / "s").mkdir()
    for z in range(VOL16.shape[1]):
        Image.fromarray(VOL16[0, z]).save(tmp / "s" / f"img{z:03d}.png")
    return tmp / "s", VOL16[:1], None


def tiff_slices(tmp):
    (tmp / "s").mkdir()
    for z in range(VOL.shape[1]):
        tifffile.imwrite(tmp / "s" / f"z{z}.tif", VOL[:, z].transpose(1, 2, 0), photometric="rgb")
    return tmp / "s", VOL, None


def nifti_mm(tmp):
    img = nib.Nifti1Image(VOL16[2].transpose(2, 1, 0), np.diag([0.3, 0.4, 1.2, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp / "a.nii")
    return tmp / "a.nii", VOL16[2:3], (1200.0, 400.0, 300.0)


def nifti_gz_channels(tmp):
    img = nib.Nifti1Image(VOL.transpose(3, 2, 1, 0), np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp / "a.nii.gz")
    return tmp / "a.nii.gz", VOL, (2.0, 0.5, 0.5)


def dicom_multiframe_gray16(tmp):
    write_dicom(tmp / "a.dcm", VOL16[0])
    return tmp / "a.dcm", VOL16[:1], (3000.0, 250.0, 500.0)


def dicom_series_rgb(tmp):
    (tmp / "d").mkdir()
    for z in range(VOL.shape[1]):  # names hashed: only ImagePositionPatient gives the order
        name = hashlib.sha1(str(z).encode()).hexdigest()[:8]
        write_dicom(tmp / "d" / f"{name}.dcm", VOL[:, z].transpose(1, 2, 0)[None], z=z)
    return tmp / "d", VOL, (1500.0, 250.0, 500.0)


WRITERS = [npy_zyx, npy_czyx, npz_stored_zyxc, npz_deflated_fortran_czyx, tiff_rgb, tiff_gray, ome_tiff_czyx,
           ome_tiff_nm_units, imagej_tiff, png_rgb_slices, png16_slices, tiff_slices, nifti_mm,
           nifti_gz_channels, dicom_multiframe_gray16, dicom_series_rgb]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_round_trip_is_exact(tmp_path, writer):
    path, expected, spacing = writer(tmp_path)
    src = open_source(path)
    assert src.shape == expected.shape and src.dtype == expected.dtype
    assert src.spacing_zyx == (pytest.approx(spacing) if spacing else None)
    got = read_all(src, depth=3)
    assert got.flags.c_contiguous and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    again = pickle.loads(pickle.dumps(src))  # convert's workers receive sources by pickling
    np.testing.assert_array_equal(read_all(again, depth=10), expected)


def test_jpeg_slices_match_pillow(tmp_path):
    (tmp_path / "s").mkdir()
    for z in range(4):
        Image.fromarray(VOL[:, z].transpose(1, 2, 0)).save(tmp_path / "s" / f"{z}.jpg", quality=90)
    expected = np.stack([np.asarray(Image.open(tmp_path / "s" / f"{z}.jpg")) for z in range(4)])
    np.testing.assert_array_equal(read_all(open_source(tmp_path / "s")), expected.transpose(3, 0, 1, 2))


def test_slices_in_natural_order(tmp_path):
    for z in range(12):  # slice2 must come before slice10
        Image.fromarray(np.full((8, 8), z, np.uint8)).save(tmp_path / f"slice{z}.png")
    got = read_all(open_source(tmp_path), depth=5)
    assert got[0, :, 0, 0].tolist() == list(range(12))


def test_slabs_stream_in_z_order_within_depth(tmp_path):
    big = np.zeros((3, 70, 16, 16), np.uint8)
    big[:] = np.arange(70, dtype=np.uint8)[None, :, None, None]
    np.save(tmp_path / "a.npy", big)
    tifffile.imwrite(tmp_path / "a.tif", big.transpose(1, 2, 3, 0), photometric="rgb")
    for path in (tmp_path / "a.npy", tmp_path / "a.tif"):
        starts, depths = [], []
        for z0, slab in open_source(path).slabs(16):
            starts.append(z0)
            depths.append(slab.shape[1])
            assert slab[0, :, 0, 0].tolist() == list(range(z0, z0 + slab.shape[1]))
        assert starts == [0, 16, 32, 48, 64] and max(depths) <= 16 and sum(depths) == 70


def test_ambiguous_axes_ask_for_an_axes_column(tmp_path):
    np.save(tmp_path / "amb.npy", np.zeros((3, 10, 12, 3), np.uint8))
    with pytest.raises(InputError, match=r"amb\.npy.*\(3, 10, 12, 3\).*axes"):
        open_source(tmp_path / "amb.npy")
    np.savez(tmp_path / "two.npz", first=np.zeros((4, 5, 6, 4), np.uint8), second=np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match=r"two\.npz\[first\]"):  # several arrays: says which one
        open_source(tmp_path / "two.npz")


def test_explicit_axes(tmp_path):
    arr = np.arange(3 * 10 * 12 * 3, dtype=np.uint8).reshape(3, 10, 12, 3)
    np.save(tmp_path / "amb.npy", arr)
    src = open_source(tmp_path / "amb.npy", axes="czyx")
    assert src.shape == (3, 10, 12, 3)
    np.testing.assert_array_equal(read_all(src), arr)
    src = open_source(tmp_path / "amb.npy", axes="ZYXC")
    np.testing.assert_array_equal(read_all(src), arr.transpose(3, 0, 1, 2))
    src = open_source(tmp_path / "amb.npy", axes="yzxc")  # z inside: still exact
    np.testing.assert_array_equal(read_all(src), arr.transpose(3, 1, 0, 2))
    for bad in ("zyx", "czyq", "cczy"):
        with pytest.raises(InputError, match=rf"amb\.npy: axes '{bad}' do not fit"):
            open_source(tmp_path / "amb.npy", axes=bad)


def test_ragged_folder_names_the_first_odd_slice(tmp_path):
    for z in range(6):
        Image.fromarray(np.zeros((8, 9 if z in (3, 5) else 8), np.uint8)).save(tmp_path / f"s{z}.png")
    with pytest.raises(InputError, match=r"slice s3\.png has shape \(8, 9\).*s0\.png has \(8, 8\)"):
        open_source(tmp_path)


def test_mixed_channels_in_folder_are_ragged(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s1.png")
    with pytest.raises(InputError, match=r"slice s1\.png has shape \(8, 8, 3\)"):
        open_source(tmp_path)


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("keep", [0.5, 0.97])
@pytest.mark.parametrize("writer", [npy_czyx, npz_stored_zyxc, npz_deflated_fortran_czyx, tiff_rgb, tiff_gray,
                                    ome_tiff_czyx, imagej_tiff, nifti_mm, nifti_gz_channels,
                                    dicom_multiframe_gray16], ids=lambda w: w.__name__)
def test_truncated_file_is_named(tmp_path, writer, keep):
    path, _, _ = writer(tmp_path)
    truncate(path, keep)
    # At open when the header tells (most formats), else while reading (.nii.gz): never silently short.
    with pytest.raises(InputError, match=rf"{re.escape(path.name)}: .*(truncated|corrupt)"):
        read_all(open_source(path))


def test_truncated_slice_is_named(tmp_path):
    path, _, _ = png_rgb_slices(tmp_path)
    truncate(path / "img7.png", 0.5)
    with pytest.raises(InputError, match=r"img7\.png"):
        read_all(open_source(path))


def test_missing_unreadable_and_unknown_inputs(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        open_source(tmp_path / "nope.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(InputError, match=r"junk\.tif: cannot read this tiff"):
        open_source(tmp_path / "junk.tif")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match=r"junk\.nii\.gz: cannot read"):
        open_source(tmp_path / "junk.nii.gz")
    (tmp_path / "vol.raw").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match=r"vol\.raw: unknown input format"):
        open_source(tmp_path / "vol.raw")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder"):
        open_source(tmp_path / "empty")
    path, _, _ = png_rgb_slices(tmp_path)
    (path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: not a slice image"):
        open_source(path)


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    write_dicom(tmp_path / "a.dcm", VOL16[0, :1], z=0, series="1.2.3")
    write_dicom(tmp_path / "b.dcm", VOL16[0, 1:2], z=1, series="1.2.4")
    with pytest.raises(InputError, match="2 DICOM series"):
        open_source(tmp_path)


def test_source_sha256(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"abc" * 1000)
    assert source_sha256(tmp_path / "f.bin") == hashlib.sha256(b"abc" * 1000).hexdigest()
    path, _, _ = png_rgb_slices(tmp_path)
    first = source_sha256(path)
    assert source_sha256(path) == first and len(first) == 64
    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(path / "img4.png")
    assert source_sha256(path) != first
    with pytest.raises(InputError, match="file not found"):
        source_sha256(tmp_path / "missing")


# -- real volumes shipped inside installed packages ---------------------------------------------
def test_real_dicom_multiframe_ybr_jpeg():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("examples_ybr_color.dcm")  # ships in the pydicom wheel, no download
    assert path is not None and Path(path).is_file()
    src = open_source(path)
    assert (src.format, src.shape, src.dtype, src.axes) == ("dicom", (3, 30, 240, 320), np.uint8, "zyxc")
    np.testing.assert_array_equal(read_all(src, depth=8), np.moveaxis(pydicom.dcmread(path).pixel_array, -1, 0))


def test_real_dicom_series_sorted_by_position():
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("examples_ybr_color.dcm")).parent / "dicomdirtests/98892001/CT5N"
    datasets = [pydicom.dcmread(p) for p in folder.iterdir()]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    src = open_source(folder)
    assert src.shape == (1, 5, 16, 16) and src.spacing_zyx == pytest.approx((2500.0, 488.281, 488.281))
    np.testing.assert_array_equal(read_all(src, depth=2)[0], np.stack([ds.pixel_array for ds in datasets]))


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii"])
def test_real_nifti_from_nibabel(name):
    path = Path(nib.__file__).parent / "tests" / "data" / name
    assert path.is_file(), f"{path} should ship in the nibabel wheel"
    img = nib.load(path)
    ref = np.asarray(img.dataobj)
    src = open_source(path)
    expected = ref.transpose(3, 2, 1, 0) if ref.ndim == 4 else ref.transpose(2, 1, 0)[None]
    assert src.shape == expected.shape and src.dtype == ref.dtype.newbyteorder("=")
    assert src.spacing_zyx == pytest.approx([1000 * z for z in img.header.get_zooms()[2::-1]], rel=1e-5)
    np.testing.assert_array_equal(read_all(src, depth=7), expected)


def test_inputs_compressed_to_the_deflate_limit_are_accepted(tmp_path):
    """All-zero stacks deflate to ~1030:1, just under the 1032:1 bound the size checks use: never refused."""
    zeros = np.zeros((3, 64, 256, 256), np.uint8)  # 12.6 MB
    np.savez_compressed(tmp_path / "z.npz", zeros)
    nib.save(nib.Nifti1Image(zeros[0].T.copy(), np.eye(4)), tmp_path / "z.nii.gz")
    tifffile.imwrite(tmp_path / "z.tif", zeros[0], compression="zlib", compressionargs={"level": 9})
    (tmp_path / "png").mkdir()
    Image.fromarray(np.zeros((4096, 3072), np.uint8)).save(tmp_path / "png" / "s0.png", optimize=True)
    for name in ("z.npz", "z.nii.gz", "z.tif", "png"):
        src = open_source(tmp_path / name)
        assert 0 not in src.shape and src.nbytes >= 4 * 2**20


def test_enhanced_dicom_spacing_from_per_frame_groups():
    """An enhanced (multi-frame) file that keeps its pixel measures and positions per frame, as MR
    scanners write them: spacing comes from the first frame's groups and the frames' positions."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from stacktrain.stores.dicom_source import _spacing

    def frame(z):
        f = Dataset()
        f.PixelMeasuresSequence = Sequence([Dataset()])
        f.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.25]
        f.PixelMeasuresSequence[0].SliceThickness = 3.0
        f.PlanePositionSequence = Sequence([Dataset()])
        f.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, z]
        return f

    ds = Dataset()
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame(0.0), frame(2.0), frame(4.0)])
    assert _spacing(ds) == (2000.0, 500.0, 250.0)  # the 2 mm step between frames, not the 3 mm thickness
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame(0.0)])
    assert _spacing(ds) == (3000.0, 500.0, 250.0)  # one frame: its thickness
