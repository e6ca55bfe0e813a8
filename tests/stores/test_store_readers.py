"""A converted store read by others: ome-zarr-models, plain zarr-python, tensorstore, a plain LZ4 block
decoder (the GPU's contract), and real volumes shipped inside PyPI packages."""

from __future__ import annotations

import csv
import os

import lz4.block
import numpy as np
import pytest
import zarr

from stacktrain.stores import chunks
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import IMAGE
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue

TINY = dict(chunk_zyx=(4, 16, 16), shard_zyx=(8, 32, 32), min_patch_zyx=(4, 16, 16))
SPACING_MM_XYZ = (0.5, 0.25, 2.0)


def _manifest(folder, rows):
    path = folder / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """An .npy stack (no spacing) and a NIfTI stack with voxel sizes; returns (manifest, arrays)."""
    import nibabel as nib
    folder = tmp_path_factory.mktemp("raw")
    a = tissue((3, 12, 40, 36), seed=1)
    b = tissue((3, 9, 24, 33), seed=2)
    np.save(folder / "a.npy", a)
    img = nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(b, 0, -1).transpose(2, 1, 0, 3)), np.eye(4))
    img.header.set_zooms((*SPACING_MM_XYZ, 1.0))
    img.header.set_xyzt_units("mm")
    nib.save(img, folder / "b.nii.gz")
    return _manifest(folder, [("a.npy", "a", "SAIN", "p0"), ("b.nii.gz", "b", "MALADE", "p1")]), {"a": a, "b": b}


@pytest.fixture(scope="module")
def stores(raw, tmp_path_factory):
    """The raw stacks converted once per codec: {codec: store path}."""
    manifest, _ = raw
    out = {}
    for codec in ("lz4", "zstd"):
        out[codec] = tmp_path_factory.mktemp(codec) / "s.zarr"
        convert(manifest, out[codec], ConvertOptions(codec=codec, **TINY))
    return out


@pytest.fixture(params=["lz4", "zstd"])
def converted(request, raw, stores):
    return stores[request.param], raw[1], request.param


def test_every_stack_is_a_valid_ome_zarr_05_image(converted):
    from ome_zarr_models.v05.image import Image
    out, arrays, _ = converted
    for sid in arrays:
        image = Image.from_zarr(zarr.open_group(out / sid / IMAGE, mode="r"))
        (ms,) = image.ome_attributes.multiscales
        assert [(ax.name, ax.type) for ax in ms.axes] == [("c", "channel"), ("z", "space"), ("y", "space"),
                                                          ("x", "space")]
        assert [d.path for d in ms.datasets] == ["0"]
        arr = zarr.open_array(out / sid / IMAGE / "0", mode="r")
        assert arr.metadata.dimension_names == ("c", "z", "y", "x")
    scale = lambda sid: Image.from_zarr(zarr.open_group(out / sid / IMAGE, mode="r")) \
        .ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert list(scale("a")) == [1.0, 1.0, 1.0, 1.0]  # no spacing in an .npy
    x, y, z = SPACING_MM_XYZ  # NIfTI millimeters -> micrometers, in z, y, x order
    assert list(scale("b")) == pytest.approx([1.0, z * 1000, y * 1000, x * 1000])
    assert Store(out).meta("b").spacing_zyx == pytest.approx((z * 1000, y * 1000, x * 1000))


def test_every_image_has_an_omero_block_from_its_stored_percentiles(converted):
    from ome_zarr_models.common.omero import Omero
    out, arrays, _ = converted
    for sid in arrays:
        ome = zarr.open_group(out / sid / IMAGE, mode="r").attrs["ome"]
        omero = Omero.model_validate(ome["omero"])  # the same model ome-zarr-models checks v0.4 images with
        meta = Store(out).meta(sid)
        assert [c["label"] for c in ome["omero"]["channels"]] == ["ch0", "ch1", "ch2"]
        assert [c.color for c in omero.channels] == ["FF0000", "00FF00", "0000FF"]
        for ch, channel in enumerate(omero.channels):
            assert channel.window.start == meta.percentiles["p1"][ch]
            assert channel.window.end >= meta.percentiles["p99"][ch] and channel.window.end > channel.window.start
            assert channel.window.max == {"uint8": 255, "uint16": 65535}[meta.dtype]


def test_plain_zarr_python_reads_identical_arrays(converted):
    out, arrays, _ = converted
    root = zarr.open_group(out, mode="r")
    assert root.attrs["stacktrain"]["format_version"] == 1
    for sid, want in arrays.items():
        arr = zarr.open_array(out / sid / IMAGE / "0", mode="r")
        assert arr.shape == want.shape and arr.dtype == want.dtype
        np.testing.assert_array_equal(arr[...], want)
        np.testing.assert_array_equal(root[f"{sid}/{IMAGE}/0"][2, 3:7, 5:21, 1:30], want[2, 3:7, 5:21, 1:30])


def test_tensorstore_reads_the_zstd_store(raw, stores):
    """numcodecs LZ4 is not a core Zarr codec: tensorstore (like any Zarr v3 reader) reads the zstd store."""
    import tensorstore as ts
    out, arrays = stores["zstd"], raw[1]
    for sid, want in arrays.items():
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / sid / IMAGE / "0")}},
                    read=True).result()
        assert tuple(t.domain.labels) == ("c", "z", "y", "x")
        np.testing.assert_array_equal(t.read().result(), want)


@pytest.mark.parametrize("box", [((0, 8), (0, 32), (0, 32)), ((2, 11), (5, 39), (3, 35)), ((4, 12), (16, 40), (0, 36))])
def test_byte_contract_raw_lz4_blocks(stores, box):
    """What the GPU inflates: raw LZ4 blocks, decoded one by one, reassembled, equal zarr's region."""
    out = stores["lz4"]
    store = Store(out)
    region = store.chunk_region("a", box, raw_lz4=True)
    cz, cy, cx = region.chunk_zyx
    blocks = [np.frombuffer(lz4.block.decompress(region.data[o:o + s].tobytes(), uncompressed_size=cz * cy * cx),
                            np.uint8).reshape(cz, cy, cx) for o, s in zip(region.offsets, region.sizes)]
    vox = chunks.reassemble(np.stack(blocks), region.grid)
    oz, oy, ox = region.origin_zyx
    (z0, z1), (y0, y1), (x0, x1) = box
    want = zarr.open_array(out / "a" / IMAGE / "0", mode="r")[:, z0:z1, y0:y1, x0:x1]
    np.testing.assert_array_equal(vox[:, z0 - oz:z1 - oz, y0 - oy:y1 - oy, x0 - ox:x1 - ox], want)


def test_real_dicom_from_pydicom(tmp_path):
    """pydicom's multi-frame RGB example (30 x 240 x 320 x 3, YBR_FULL_422) against pydicom's own read."""
    import pydicom
    from pydicom.data import get_testdata_file
    path = get_testdata_file("examples_ybr_color.dcm")
    assert path and os.path.exists(path)
    manifest = _manifest(tmp_path, [(path, "ybr", "SAIN", "p")])
    convert(manifest, tmp_path / "s.zarr", ConvertOptions(min_patch_zyx=(16, 64, 64)))
    got = Store(tmp_path / "s.zarr").read("ybr")
    want = np.moveaxis(pydicom.dcmread(path).pixel_array, -1, 0)  # (frames, rows, cols, 3) -> c, z, y, x
    assert got.shape == (3, 30, 240, 320)
    np.testing.assert_array_equal(got, want)


def test_real_nifti_from_nibabel(tmp_path):
    """nibabel's anatomical.nii (x, y, z = 33, 41, 25, big-endian int16, 2 mm): one channel, scaled, padded."""
    import nibabel as nib
    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    assert os.path.exists(path)
    manifest = _manifest(tmp_path, [(path, "anat", "MALADE", "p")])
    convert(manifest, tmp_path / "s.zarr", ConvertOptions(replicate_channels=True, scale="minmax", pad=True,
                                                          min_patch_zyx=(32, 32, 32), chunk_zyx=(8, 16, 16),
                                                          shard_zyx=(16, 32, 32)))
    store = Store(tmp_path / "s.zarr")
    vol = np.asarray(nib.load(path).dataobj).transpose(2, 1, 0).astype(np.float64)  # x, y, z -> z, y, x
    want = (vol - vol.min()) / (vol.max() - vol.min()) * 255
    got = store.read("anat")
    assert got.shape == (3, 32, 41, 33) and store.meta("anat").dtype == "uint8"
    for ch in range(3):
        np.testing.assert_allclose(got[ch, :25], want, atol=0.51)
    assert not got[:, 25:].any()  # zero padding after the last slice
    assert store.meta("anat").spacing_zyx == pytest.approx((2000.0, 2000.0, 2000.0))
