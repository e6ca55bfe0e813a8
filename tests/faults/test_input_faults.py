"""Bad raw inputs of every format `convert` reads: each is refused with one line that names the file and
says what to do, before anything of it is allocated or written; the good stack beside it converts, and
the store's stack list keeps only what was there plus the good stack.

Also here: DICOM gaps and `--allow-gaps`, library warnings (quiet on success, in the line on failure)
and a few CLI runs (exit code 2, one line per failed stack plus the summary, no traceback).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from stacktrain.errors import ConversionFailed
from stacktrain.stores.convert import convert
from stacktrain.stores.layout import STAGING
from stacktrain.stores.options import ConvertOptions
from stacktrain.testing import tissue
from tests.faults import input_makers as mk

TINY = dict(workers=1, chunk_zyx=(4, 16, 16), shard_zyx=(8, 16, 16), min_patch_zyx=(4, 16, 16))
GOOD = tissue((3, 8, 16, 16), seed=1)
V = mk.VOL


def write_manifest(folder: Path, rows, name: str = "labels.csv") -> Path:
    with (folder / name).open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return folder / name


def registered(store: Path) -> list[str]:
    return [e["stack_id"] for e in json.loads((store / "zarr.json").read_text())["attributes"]["stacktrain"]["stacks"]]


@pytest.fixture(scope="module")
def prior_store(tmp_path_factory):
    """A store that already holds one stack ('prior'), from an earlier manifest."""
    folder = tmp_path_factory.mktemp("prior")
    np.save(folder / "p.npy", tissue((3, 8, 16, 16), seed=9))
    convert(write_manifest(folder, [("p.npy", "prior", "SAIN", "p0")]), folder / "s.zarr", ConvertOptions(**TINY))
    return folder / "s.zarr"


@pytest.fixture
def store(prior_store, tmp_path):
    shutil.copytree(prior_store, tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def convert_bad(folder: Path, store: Path, bad: str, **opts) -> str:
    """Convert a good stack and `bad`; check the run's failure contract and return bad's error line."""
    np.save(folder / "good.npy", GOOD)
    manifest = write_manifest(folder, [("good.npy", "good", "SAIN", "p1"), (bad, "bad", "MALADE", "p2")])
    with pytest.raises(ConversionFailed) as info:
        convert(manifest, store, ConvertOptions(**{**TINY, **opts}))
    assert "\n" not in str(info.value) and "1 of 2 stacks failed and were not written (bad)" in str(info.value)
    outcomes = {o.stack_id: o for o in info.value.report.outcomes}
    assert outcomes["good"].status == "converted" and outcomes["bad"].status == "failed"
    error = outcomes["bad"].error
    assert "\n" not in error and Path(bad).name in error and "manifest line 3" in error
    assert registered(store) == ["prior", "good"] and not (store / "bad").exists()
    assert all(p.name.endswith(".lock") for p in (store / STAGING).iterdir())
    return error


R3 = {"replicate_channels": True}
# (id, maker(folder) -> manifest path, convert options, words the error line must hold)
CASES = [
    # .npy
    ("npy-truncated", lambda d: mk.cut(d / mk.npy(d, "a.npy", V)).name, {}, ["holds only", "truncated"]),
    ("npy-claims-larger", lambda d: mk.npy_lying(d, (3, 16, 16, 16)), {}, ["(3, 16, 16, 16)", "holds only"]),
    ("npy-claims-smaller", lambda d: mk.npy_lying(d, (3, 4, 16, 16)), {}, ["(3, 4, 16, 16)", "does not describe"]),
    ("npy-memory-bomb", lambda d: mk.npy_lying(d, mk.BOMB), {}, ["(3, 100000, 100000, 100000)", "holds only"]),
    ("npy-zero-slices-pad", lambda d: mk.npy(d, "e.npy", np.zeros((3, 0, 16, 16), np.uint8)), {"pad": True},
     ["(3, 0, 16, 16)", "empty", "--pad cannot"]),
    ("npy-zero-x-pad", lambda d: mk.npy(d, "e.npy", np.zeros((3, 8, 16, 0), np.uint8)), {"pad": True}, ["empty"]),
    ("npy-complex", lambda d: mk.npy(d, "c.npy", V.astype(np.complex64)), {}, ["complex64 cannot be stored"]),
    ("npy-bool", lambda d: mk.npy(d, "b.npy", V > 100), {}, ["dtype bool", "--scale"]),
    ("npy-int64", lambda d: mk.npy(d, "i.npy", V.astype(np.int64)), {}, ["dtype int64", "--scale"]),
    ("npy-float64", lambda d: mk.npy(d, "f.npy", V.astype(np.float64)), {}, ["dtype float64", "--scale minmax"]),
    ("npy-unicode", lambda d: mk.npy(d, "u.npy", np.full((3, 8, 16, 16), "a")), {},
     ["cannot be stored"]),
    ("npy-object", lambda d: mk.npy(d, "o.npy", np.empty((3, 8, 16, 16), object)), {}, ["object arrays"]),
    ("npy-nan-minmax", lambda d: mk.npy(d, "n.npy", np.where(V == V[1, 5, 3, 3], np.nan, V).astype(np.float32)),
     {"scale": "minmax"}, ["NaN"]),
    ("npy-inf-clip", lambda d: mk.npy(d, "n.npy", np.where(V == V[2, 6, 3, 3], np.inf, V).astype(np.float32)),
     {"scale": "clip"}, ["infinite"]),
    ("npy-two-channels", lambda d: mk.npy(d, "two.npy", V[:2]), {}, ["has 2 channels"]),
    ("npy-one-channel", lambda d: mk.npy(d, "one.npy", V[0]), {}, ["has 1 channel", "--replicate-channels"]),
    ("npy-2d", lambda d: mk.npy(d, "flat.npy", V[0, 0]), {}, ["cannot tell the axes", "(16, 16)"]),
    ("npy-garbage", lambda d: (d / "g.npy").write_bytes(b"not numpy at all\n" * 20) and "g.npy", {}, ["cannot read"]),
    ("npy-empty-file", lambda d: (d / "z.npy").write_bytes(b"") or "z.npy", {}, ["cannot read"]),
    # .npz
    ("npz-bomb-deflated", mk.npz_bomb, {}, ["(3, 100000, 100000, 100000)", "1032:1"]),
    ("npz-bomb-stored", lambda d: mk.npz_bomb(d, compressed=False), {}, ["(3, 100000, 100000, 100000)", "holds only"]),
    ("npz-claims-larger", lambda d: mk.npz_member(d, (3, 16, 16, 16)), {}, ["(3, 16, 16, 16)", "zip member"]),
    ("npz-claims-smaller", lambda d: mk.npz_member(d, (3, 4, 16, 16)), {}, ["(3, 4, 16, 16)", "does not describe"]),
    ("npz-truncated", lambda d: mk.cut(d / "a.npz").name if np.savez(d / "a.npz", V) is None else "", {},
     ["cannot read"]),
    ("npz-corrupt-stream", mk.npz_corrupt_stream, {}, ["corrupt"]),
    ("npz-no-array", mk.npz_text_only, {}, ["no array inside"]),
    ("npz-zero-dim-pad", lambda d: np.savez(d / "e.npz", np.zeros((3, 8, 0, 16), np.uint8)) or "e.npz",
     {"pad": True}, ["empty"]),
    ("npz-garbage", lambda d: (d / "g.npz").write_bytes(b"PK\x03\x04garbage" * 9) and "g.npz", {}, ["cannot read"]),
    # NIfTI
    ("nii-truncated", lambda d: mk.cut(d / mk.nifti(d, "a.nii", V[0].T.copy())).name, {}, ["holds only"]),
    ("niigz-truncated", lambda d: mk.cut(d / mk.nifti(d, "a.nii.gz", V[0].T.copy())).name, {}, ["gzip"]),
    ("niigz-bomb", lambda d: mk.nifti_with_dims(d, "bomb.nii.gz", (30000, 30000, 30000)), {},
     ["(30000, 30000, 30000)", "1032:1"]),
    ("nii-claims-larger", lambda d: mk.nifti_with_dims(d, "big.nii", (16, 16, 12)), {}, ["(16, 16, 12)", "holds only"]),
    ("nii-claims-smaller", lambda d: mk.nifti_with_dims(d, "small.nii", (16, 16, 4)), {},
     ["(16, 16, 4)", "does not describe"]),
    ("niigz-claims-smaller", lambda d: mk.nifti_with_dims(d, "small.nii.gz", (16, 16, 4)), {},
     ["gzip stream", "does not describe"]),
    ("nii-zero-dim-pad", lambda d: mk.nifti_with_dims(d, "e.nii", (16, 16, 0)), {"pad": True}, ["empty"]),
    ("nii-complex", lambda d: mk.nifti(d, "c.nii", V[0].T.astype(np.complex64)), R3, ["cannot be stored"]),
    ("nii-5d", lambda d: mk.nifti(d, "t.nii", np.zeros((16, 16, 8, 2, 3), np.uint8)), {}, ["NIfTI of shape"]),
    ("nii-garbage", lambda d: (d / "g.nii").write_bytes(os.urandom(600)) and "g.nii", {}, ["cannot read"]),
    ("niigz-garbage", lambda d: (d / "g.nii.gz").write_bytes(mk.gzip.compress(os.urandom(600))) and "g.nii.gz", {},
     ["cannot read"]),
    ("nii-empty-file", lambda d: (d / "z.nii").write_bytes(b"") or "z.nii", {}, ["cannot read"]),
    # TIFF
    ("tiff-truncated", lambda d: mk.cut(d / mk.tiff(d), 0.5).name, {}, ["truncated"]),
    ("tiff-missing-strip", lambda d: mk.tiff_patched(d, "StripByteCounts", 0), {}, ["strip/tile 0 of TIFF page 3"]),
    ("tiff-missing-strip-zlib", lambda d: mk.tiff_patched(d, "StripByteCounts", 0, compression="zlib"), {},
     ["TIFF page 3", "missing"]),
    ("tiff-strip-past-end", lambda d: mk.tiff_patched(d, "StripOffsets", 10**6), {}, ["past the end"]),
    ("tiff-claims-wider", lambda d: mk.tiff_patched(d, "ImageWidth", 40, pages=range(8)), {},
     ["(16, 40, 3)", "strips hold 768 bytes"]),
    ("tiff-bomb-zlib", lambda d: mk.tiff_patched(d, "ImageWidth", 60000, pages=range(8), compression="zlib"), {},
     ["1032:1"]),
    ("tiff-page-of-other-shape", mk.tiff_two_shapes, {}, ["holds 8 image series", "5 x YXS (16, 16, 3) uint8", "3 x YXS (16, 20, 3)"]),
    ("tiff-float32", lambda d: mk.tiff(d, arr=V.transpose(1, 2, 3, 0).astype(np.float32)), {}, ["float32", "--scale"]),
    ("tiff-two-channels", lambda d: mk.tiff(d, arr=V[:2].transpose(1, 0, 2, 3).copy()), {}, ["axes"]),
    ("tiff-garbage", lambda d: (d / "g.tif").write_bytes(b"II*\x00" + os.urandom(500)) and "g.tif", {},
     ["damaged"]),
    ("tiff-empty-file", lambda d: (d / "z.tif").write_bytes(b"") or "z.tif", {}, ["cannot read"]),
    # folders of slices
    ("png-truncated-slice", lambda d: mk.cut(mk.pngs(d) / "img5.png", 0.5).parent.name, {}, ["img5.png"]),
    ("png-corrupt-slice", lambda d: mk.flip(mk.pngs(d) / "img2.png", 0.5).parent.name, {}, ["img2.png"]),
    ("png-garbage-slice", lambda d: (mk.pngs(d) / "img4.png").write_bytes(b"\x89PNG junk") and "s", {},
     ["img4.png", "cannot read"]),
    ("png-empty-slice", lambda d: (mk.pngs(d) / "img1.png").write_bytes(b"") or "s", {}, ["img1.png"]),
    ("png-header-lie", mk.png_header_lie, {}, ["img3.png", "(12000, 12000, 3)", "1032:1"]),
    ("png-ragged", lambda d: mk.pngs(d, arr=[V[:, 0].transpose(1, 2, 0)] * 3 + [np.zeros((16, 20, 3), np.uint8)] * 5)
     .name, {}, ["img3.png", "same size"]),
    ("png-mixed-channels", lambda d: mk.pngs(d, arr=[V[:, 0].transpose(1, 2, 0)] * 4 + [V[0, 0]] * 4).name, {},
     ["img4.png", "same size, channels"]),
    ("png-palette", lambda d: mk.pngs(d, mode="P", arr=[V[0, z] for z in range(8)]).name, {}, ["mode 'P'"]),
    ("png-two-channels", lambda d: mk.pngs(d, mode="LA", arr=V[:2].transpose(1, 2, 3, 0)).name, {},
     ["has 2 channels"]),
    ("png-stray-file", lambda d: (mk.pngs(d) / "notes.txt").write_text("x") and "s", {}, ["notes.txt", "remove it"]),
    ("jpeg-truncated-slice", lambda d: mk.cut(_jpegs(d) / "img6.jpg", 0.3).parent.name, {}, ["img6.jpg"]),
    ("tiff-slice-is-3d", lambda d: _tiff_slices(d, 3), {}, ["a slice must be one 2-D image"]),
    ("folder-named-npy", lambda d: (d / "dir.npy").mkdir() or "dir.npy", {}, ["folder named like a .npy file"]),
    ("folder-named-tif", lambda d: (d / "dir.ome.tif").mkdir() or "dir.ome.tif", {}, ["folder named like a .ome.tif"]),
    ("unknown-suffix", lambda d: (d / "v.raw").write_bytes(b"\0" * 99) and "v.raw", {}, ["unknown input format"]),
    # DICOM
    ("dicom-gap-real-ct", lambda d: mk.real_ct_series(d, drop="2693"), R3,
     ["slices are missing between", "1.2625 mm", "6.2625 mm", "median spacing is 2.5 mm", "--allow-gaps"]),
    ("dicom-gap-written", lambda d: mk.dicom_series(d, zs=[0, 1, 2, 3, 6, 7, 8, 9]).name, {},
     ["s03.dcm at 4.5 mm", "s06.dcm at 9 mm", "--allow-gaps"]),
    ("dicom-two-series", lambda d: mk.dicom_series(d, series=lambda z: f"1.2.{z // 4}").name, {}, ["2 DICOM series"]),
    ("dicom-same-position", lambda d: mk.dicom_edited(mk.dicom_series(d) / "s05.dcm", ImagePositionPatient=[0, 0, 6])
     .parent.name, {}, ["s04.dcm and s05.dcm", "same position"]),
    ("dicom-mixed-geometry", lambda d: mk.dicom_series(d, frames=lambda z: np.zeros((1, 16, 20 if z == 5 else 16, 3),
                                                                               np.uint8)).name, {},
     ["s05.dcm has", "Columns=20", "same size"]),
    ("dicom-missing-rows", lambda d: mk.dicom_edited(mk.dicom_series(d) / "s04.dcm", Rows=None).parent.name, {},
     ["s04.dcm has Rows=None"]),
    ("dicom-multiframe-no-rows", lambda d: mk.dicom_multiframe(d, Rows=None), {}, ["lacks Rows", "no image"]),
    ("dicom-truncated-slice", lambda d: mk.cut(mk.dicom_series(d) / "s02.dcm", 0.7).parent.name, {}, ["s02.dcm"]),
    ("dicom-stray-file", lambda d: (mk.dicom_series(d) / "x.txt").write_text("hi") and "d", {},
     ["x.txt", "not a DICOM file"]),
    ("dicom-multiframe-truncated", lambda d: mk.cut(d / mk.dicom_multiframe(d), 0.6).name, {}, ["mf.dcm"]),
    ("dicom-multiframe-bomb", lambda d: mk.dicom_multiframe(d, Rows=60000, Columns=60000), {},
     ["(8, 60000, 60000, 3)", "holds only"]),
    ("dicom-frames-claim-more", lambda d: mk.dicom_multiframe(d, NumberOfFrames=80), {}, ["(80, 16, 16, 3)"]),
    ("dicom-garbage", lambda d: (d / "g.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(200)) and "g.dcm", {},
     ["g.dcm"]),
]


def _jpegs(folder: Path) -> Path:
    from PIL import Image
    (folder / "j").mkdir()
    for z in range(8):
        Image.fromarray(V[:, z].transpose(1, 2, 0)).save(folder / "j" / f"img{z}.jpg", quality=90)
    return folder / "j"


def _tiff_slices(folder: Path, bad: int) -> str:
    (folder / "t").mkdir()
    for z in range(8):
        mk.tiff(folder / "t", f"z{z}.tif", arr=V.transpose(1, 2, 3, 0)[:2] if z == bad else V[:, z].transpose(1, 2, 0))
    return "t"


@pytest.mark.parametrize("make, opts, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, store, make, opts, words):
    bad = make(tmp_path)
    error = convert_bad(tmp_path, store, bad, **opts)
    for word in words:
        assert word in error
    assert "Traceback" not in error
    if os.environ.get("SHOW_ERRORS"):
        print("\nERROR:", error)
