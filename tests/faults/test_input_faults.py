"""Bad raw inputs of every format `convert` reads: each is refused with one line that names the file and
says what to do, before anything of it is allocated or written; the good stack beside it converts, and
the store's stack list keeps only what was there plus the good stack.

Also here: DICOM gaps and `--allow-gaps`, library warnings (quiet on success, in the line on failure)
and a few CLI runs (exit code 2, one line per failed stack plus the summary, no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from stacktrain.errors import ConversionFailed
from stacktrain.stores.convert import convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.options import ConvertOptions
from stacktrain.testing import tissue
from tests.faults import input_makers as mk

V = mk.VOL
GOOD, TINY, registered, write_manifest = mk.GOOD, mk.TINY, mk.registered, mk.write_manifest




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
    assert all(p.name.endswith(".lock") for p in staging_dir(store).iterdir())
    return error


R3 = {"replicate_channels": True}
CT = {**R3, "scale": "minmax"}  # the real CT is int16
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
    ("tiff-page-of-other-shape", mk.tiff_two_shapes, {},
     ["holds 8 image series", "5 x YXS (16, 16, 3) uint8", "3 x YXS (16, 20, 3)"]),
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
     ["slices are missing between", "1.2625 mm", "6.2625 mm", "median step is 2.5 mm", "--allow-gaps"]),
    ("dicom-gap-written", lambda d: mk.dicom_series(d, zs=[0, 1, 2, 3, 6, 7, 8, 9]).name, {},
     ["s03.dcm at 4.5 mm", "s06.dcm at 9 mm", "--allow-gaps"]),
    ("dicom-gap-instance-numbers",
     lambda d: mk.dicom_without_positions(mk.dicom_series(d, zs=[0, 1, 2, 5, 6, 7, 8, 9])), {},
     ["s05.dcm InstanceNumber 95 and s02.dcm InstanceNumber 98", "median step is 1;", "--allow-gaps"]),
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


# -- DICOM gaps, accepted with --allow-gaps ---------------------------------------------------------
def test_allow_gaps_converts_the_series_and_records_the_gap(tmp_path):
    folder = mk.real_ct_series(tmp_path, drop="2693")
    manifest = write_manifest(tmp_path, [(folder, "ct", "SAIN", "p1")])
    report = convert(manifest, tmp_path / "s.zarr", ConvertOptions(**TINY, **CT, allow_gaps=True))
    meta = report.outcomes[0].meta
    gaps = {"unit": "mm", "median_step": 2.5, "between": [[1.2625, 6.2625]]}
    assert meta.shape == (3, 4, 16, 16) and meta.gaps == gaps
    stored = json.loads((tmp_path / "s.zarr" / "ct" / "zarr.json").read_text())["attributes"]["stacktrain"]
    assert stored["gaps"] == gaps
    (tmp_path / "again").mkdir()
    whole = mk.real_ct_series(tmp_path / "again")  # the same series complete: no gap, 5 slices
    report = convert(write_manifest(tmp_path / "again", [(whole, "full", "SAIN", "p2")]), tmp_path / "s.zarr",
                     ConvertOptions(**TINY, **CT))
    assert report.outcomes[0].meta.gaps is None and report.outcomes[0].meta.shape[1] == 5


# -- library warnings: quiet on success, part of the line on failure ---------------------------------
def test_nibabel_warning_is_logged_quietly_on_success(tmp_path, capfd, caplog):
    name = mk.nifti_with_dims(tmp_path, "odd.nii", (16, 16, 8), sizeof_hdr=349)
    caplog.set_level(logging.INFO, logger="stacktrain.inputs")
    # nibabel's own logger has a stderr handler, bound to whatever stderr was when nibabel was first imported;
    # one bound to this test's stderr stands for it, so the test fails whatever the import order
    own = logging.StreamHandler(sys.stderr)
    logging.getLogger("nibabel.global").addHandler(own)
    try:
        convert(write_manifest(tmp_path, [(name, "odd", "SAIN", "p1")]), tmp_path / "s.zarr",
                ConvertOptions(**TINY, **R3))
    finally:
        logging.getLogger("nibabel.global").removeHandler(own)
    assert "sizeof_hdr" not in capfd.readouterr().err
    assert any("nibabel warned: sizeof_hdr should be 348" in r.getMessage() and "odd.nii" in r.getMessage()
               for r in caplog.records)


def test_pillow_warnings_are_kept_out_of_the_output_and_named_in_the_error(tmp_path, store, monkeypatch, caplog):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16 x 16 = 256 pixels: Pillow warns, but reads
    caplog.set_level(logging.INFO, logger="stacktrain.inputs")
    mk.pngs(tmp_path, "ok")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        convert(write_manifest(tmp_path, [("ok", "ok", "SAIN", "p1")]), tmp_path / "ok.zarr", ConvertOptions(**TINY))
    assert not [w for w in escaped if "decompression bomb" in str(w.message)]
    assert any("PIL warned: Image size (256 pixels) exceeds limit" in r.getMessage() for r in caplog.records)
    mk.cut(mk.pngs(tmp_path, "cut") / "img6.png", 0.5)
    error = convert_bad(tmp_path, store, "cut")
    assert "img6.png: cannot read this slice" in error and "; PIL warned: Image size (256 pixels)" in error


def test_tifffile_warning_joins_the_error_line(tmp_path, store):
    error = convert_bad(tmp_path, store, mk.tiff_patched(tmp_path, "ImageWidth", 40, pages=range(8)))
    assert error.endswith("; tifffile warned: <tifffile.TiffFile 'patched.tif'> shaped series shape does not "
                          "match page shape")


# -- memory and permissions ------------------------------------------------------------------------
def test_a_stack_larger_than_the_free_memory_is_refused_before_reading(tmp_path, store, monkeypatch):
    from stacktrain.stores import guards
    monkeypatch.setattr(guards, "available_memory", lambda: 40_000)  # 6 slabs of the good stack fit, not more
    error = convert_bad(tmp_path, store, mk.tiff(tmp_path, arr=tissue((8, 32, 32, 3))))
    assert "a.tif: a stack of shape (c,z,y,x) = (3, 8, 32, 32) needs about 147472 bytes of memory" in error
    assert "but 40000 bytes are available" in error


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_unreadable_permissions(tmp_path, store, kind):
    """chmod 000: refused by name for a normal user; root reads anyway (CAP_DAC_OVERRIDE), so it converts."""
    path = mk.pngs(tmp_path) if kind == "folder" else tmp_path / mk.tiff(tmp_path)
    path.chmod(0)
    try:
        if os.geteuid() == 0:
            report = convert(write_manifest(tmp_path, [(path.name, "x", "SAIN", "p1")]), store, ConvertOptions(**TINY))
            assert report.outcomes[0].status == "converted" and registered(store) == ["prior", "x"]
        else:
            assert "not readable (permission denied)" in convert_bad(tmp_path, store, path.name)
    finally:
        path.chmod(0o755)


# -- the command line: exit code 2, one line per failed stack and one error line, no traceback -------
CLI_CASES = [
    ("npz-bomb", mk.npz_bomb, [], ["bomb.npz", "1032:1"]),
    ("niigz-bomb", lambda d: mk.nifti_with_dims(d, "bomb.nii.gz", (30000, 30000, 30000)), [],
     ["bomb.nii.gz", "1032:1"]),
    ("npy-empty-with-pad", lambda d: mk.npy(d, "e.npy", np.zeros((3, 0, 16, 16), np.uint8)), ["--pad"],
     ["e.npy", "empty"]),
    ("dicom-gap", lambda d: mk.dicom_series(d, zs=[0, 1, 2, 3, 6, 7, 8, 9]).name, [], ["--allow-gaps"]),
]


def run_cli(manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    small = ["--chunk", "4", "16", "16", "--shard", "8", "16", "16", "--min-patch", "4", "16", "16"]
    return subprocess.run([sys.executable, "-m", "stacktrain", "convert", str(manifest), "--out", str(out), *small,
                           "--workers", "1", "--no-progress", *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


@pytest.mark.parametrize("make, extra, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, make, extra, words):
    bad = make(tmp_path)
    proc = run_cli(write_manifest(tmp_path, [(bad, "bad", "SAIN", "p1")]), tmp_path / "s.zarr", *extra)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 2 and lines[0].startswith("failed: stack 'bad'") and lines[1].startswith("error: 1 of 1")
    assert all(w in lines[0] for w in words)
    assert registered(tmp_path / "s.zarr") == [] and not (tmp_path / "s.zarr" / "bad").exists()


def test_cli_manifest_problem_is_a_single_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,stack_id,label,group\na\0b.npy,a,SAIN,p1\n", encoding="utf-8")
    proc = run_cli(tmp_path / "m.csv", tmp_path / "s.zarr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "contains a NUL character" in proc.stderr and "m.csv" in proc.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_cli_allow_gaps_converts(tmp_path):
    folder = mk.dicom_series(tmp_path, zs=[0, 1, 2, 3, 6, 7, 8, 9])
    proc = run_cli(write_manifest(tmp_path, [(folder.name, "d", "SAIN", "p1")]), tmp_path / "s.zarr", "--allow-gaps")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "s.zarr" / "d" / "zarr.json").read_text())["attributes"]["stacktrain"]
    assert meta["gaps"] == {"unit": "mm", "median_step": 1.5, "between": [[4.5, 9.0]]}
    assert meta["shape"] == [3, 8, 16, 16]
