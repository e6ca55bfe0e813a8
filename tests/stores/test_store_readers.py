"""A converted store read by others: ome-zarr-models and ome-zarr-py (the root collection, every image and
its pyramid), plain zarr-python, tensorstore, a plain LZ4 block decoder (the GPU's contract), and real
volumes shipped inside PyPI packages."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import lz4.block
import numpy as np
import pytest
import zarr

from stacktrain.stores import chunks, writer
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import IMAGE, OME_GROUP, OME_XML
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_store

TINY = dict(chunk_zyx=(4, 16, 16), shard_zyx=(8, 32, 32), min_patch_zyx=(4, 16, 16))
SPACING_MM_XYZ = (0.5, 0.25, 2.0)
LEVELS = 2  # a: (3, 12, 40, 36) -> 12x20x18, 12x10x9 (z stays: under 2 patches deep)
LEVEL_SHAPES = {"a": [(3, 12, 40, 36), (3, 12, 20, 18), (3, 12, 10, 9)],
                "b": [(3, 9, 24, 33), (3, 9, 12, 17), (3, 9, 6, 9)]}


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
        convert(manifest, out[codec], ConvertOptions(codec=codec, levels=LEVELS, **TINY))
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
        assert [d.path for d in ms.datasets] == ["0", "1", "2"]
        for k, want in enumerate(LEVEL_SHAPES[sid]):
            arr = zarr.open_array(out / sid / IMAGE / str(k), mode="r")
            assert arr.metadata.dimension_names == ("c", "z", "y", "x") and arr.shape == want

    def transforms(sid, k):
        dataset = Image.from_zarr(zarr.open_group(out / sid / IMAGE, mode="r")).ome_attributes.multiscales[0] \
            .datasets[k]
        return [list(getattr(t, t.type)) for t in dataset.coordinateTransformations]
    assert transforms("a", 0) == [[1.0, 1.0, 1.0, 1.0]]  # no spacing in an .npy
    # each level: the spacing x its factor, shifted half a level-0 voxel per halving (block centres)
    assert transforms("a", 1) == [[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.5, 0.5]]
    assert transforms("a", 2) == [[1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 1.5, 1.5]]
    x, y, z = SPACING_MM_XYZ  # NIfTI millimeters -> micrometers, in z, y, x order
    assert transforms("b", 0) == [pytest.approx([1.0, z * 1000, y * 1000, x * 1000])]
    assert transforms("b", 2) == [pytest.approx([1.0, z * 1000, y * 4000, x * 4000]),
                                  pytest.approx([0.0, 0.0, y * 1500, x * 1500])]
    assert Store(out).meta("b").spacing_zyx == pytest.approx((z * 1000, y * 1000, x * 1000))


def _series(out) -> list[str]:
    return json.loads((out / OME_GROUP / "zarr.json").read_text())["attributes"]["ome"]["series"]


def test_the_root_is_an_ome_collection_of_every_image(converted):
    """bioformats2raw layout (OME-Zarr 0.5's collection): the root says so, OME/ lists every image path,
    and METADATA.ome.xml has one Image per stack with ID "Image:<path>", what napari-ome-zarr follows."""
    from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw
    from ome_zarr_models.v05.image import Image
    out, arrays, _ = converted
    root = zarr.open_group(out, mode="r")
    BioFormats2Raw.from_zarr(root)  # validates the root's attributes
    assert root.attrs["ome"] == {"version": "0.5", "bioformats2raw.layout": 3}
    assert [s["stack_id"] for s in root.attrs["stacktrain"]["stacks"]] == list(arrays)  # ours are kept
    assert _series(out) == [f"{sid}/{IMAGE}" for sid in arrays]
    assert zarr.open_group(out / OME_GROUP, mode="r").attrs["ome"]["version"] == "0.5"
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    images = ElementTree.parse(out / OME_GROUP / OME_XML).getroot().findall("ome:Image", ns)
    assert [im.get("Name") for im in images] == list(arrays)
    for im, path in zip(images, _series(out)):
        assert im.get("ID") == f"Image:{path}"
        pixels = im.find("ome:Pixels", ns)
        assert tuple(int(pixels.get(f"Size{a}")) for a in "CZYX") == LEVEL_SHAPES[im.get("Name")][0]
        Image.from_zarr(root[path])  # every listed path is a valid image


def test_ome_zarr_py_reads_every_listed_image_with_its_levels(converted):
    """ome-zarr-py's Reader (what `ome_zarr info` and napari-ome-zarr < 0.9 use) on each path of the root's
    series: all levels, their shapes and scales."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    out, arrays, _ = converted
    for path in _series(out):
        (node,) = [n for n in Reader(parse_url(str(out / path)))() if n.specs]
        assert [tuple(d.shape) for d in node.data] == LEVEL_SHAPES[Path(path).parent.name]
        scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
        assert [s[2] / scales[0][2] for s in scales] == [1.0, 2.0, 4.0]
        np.testing.assert_array_equal(node.data[1][:, :2, :3, :4].compute(),
                                      zarr.open_array(out / path / "1", mode="r")[:, :2, :3, :4])


def test_ome_zarr_info_lists_every_level(stores):
    """The `ome_zarr` command itself, once, on an image of the LZ4 store (its levels are zstd)."""
    out = stores["lz4"]
    cli = Path(sys.executable).parent / "ome_zarr"
    done = subprocess.run([str(cli), "info", str(out / "a" / IMAGE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for shape in LEVEL_SHAPES["a"]:
        assert f"- {shape}" in done.stdout


def test_the_collection_follows_the_stack_list(tmp_path):
    """register rewrites OME/ with the root: a removed stack leaves the series and the XML."""
    arr = tissue((3, 8, 32, 32), seed=3)
    out = write_store(tmp_path / "s.zarr", {"x1": (arr, "SAIN", "g1"), "x2": (arr, "MALADE", "g2")},
                      chunk_zyx=(4, 16, 16), shard_zyx=(8, 32, 32))
    assert _series(out) == ["x1/image", "x2/image"]
    writer.register(out, [Store(out).meta("x2")])
    assert _series(out) == ["x2/image"]
    assert "x1" not in (out / OME_GROUP / OME_XML).read_text()
    assert [s["stack_id"] for s in zarr.open_group(out, mode="r").attrs["stacktrain"]["stacks"]] == ["x2"]


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


def test_tensorstore_reads_every_level_of_the_lz4_store(raw, stores):
    """Levels >= 1 are zstd whatever level 0's codec: any Zarr v3 reader opens them."""
    import tensorstore as ts
    out = stores["lz4"]
    for sid in raw[1]:
        for k, shape in enumerate(LEVEL_SHAPES[sid][1:], start=1):
            path = str(out / sid / IMAGE / str(k))
            t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, read=True).result()
            assert tuple(t.shape) == shape
            np.testing.assert_array_equal(t.read().result(), zarr.open_array(path, mode="r")[...])


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
