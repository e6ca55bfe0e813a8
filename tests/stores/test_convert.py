"""`stacktrain convert`: round trips for every input format, options, resume, overwrite, root list."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.stores import convert as conv
from stacktrain.stores.convert import ConversionFailed, ConvertOptions, convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.stores.sources import open_source
from stacktrain.testing import tissue

TINY = dict(chunk_zyx=(8, 16, 16), shard_zyx=(16, 32, 32), min_patch_zyx=(4, 16, 16))


def write_manifest(folder, rows, name="labels.csv"):
    """rows: (path, stack_id, label, group[, axes]); returns the CSV path."""
    header = ["path", "stack_id", "label", "group"] + (["axes"] if any(len(r) > 4 for r in rows) else [])
    path = folder / name
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([list(r) + [""] * (len(header) - len(r)) for r in rows])
    return path


@pytest.fixture
def npy_stacks(tmp_path):
    """Three .npy stacks of uneven tiny shapes; returns (manifest, {stack_id: array})."""
    arrays = {f"s{i}": tissue((3, z, y, x), seed=i)
              for i, (z, y, x) in enumerate([(20, 40, 40), (9, 33, 17), (16, 32, 48)])}
    for sid, a in arrays.items():
        np.save(tmp_path / f"{sid}.npy", a)
    rows = [(f"{sid}.npy", sid, "MALADE" if i % 2 else "SAIN", f"p{i // 2}") for i, sid in enumerate(arrays)]
    return write_manifest(tmp_path, rows), arrays


def source_array(path, axes=None):
    src = open_source(path, axes=axes)
    return np.concatenate([slab for _, slab in src.slabs(7)], axis=1)


def test_npy_round_trip_and_metadata(npy_stacks, tmp_path):
    manifest, arrays = npy_stacks
    report = convert(manifest, tmp_path / "s.zarr", ConvertOptions(**TINY))
    assert [o.status for o in report.outcomes] == ["converted"] * 3
    store = Store(tmp_path / "s.zarr")
    assert store.stack_ids == ["s0", "s1", "s2"]  # manifest order
    for sid, a in arrays.items():
        np.testing.assert_array_equal(store.read(sid), a)
        m = store.meta(sid)
        assert m.shape == a.shape and m.dtype == "uint8" and m.codec == "lz4"
        assert m.source == str((tmp_path / f"{sid}.npy").resolve()) and len(m.source_sha256) == 64
    assert store.meta("s1").label == "MALADE" and store.meta("s2").group == "p1"
    fg = store.stats("s0")["foreground"]  # the empty corner of tissue() shows in the patch statistics
    assert fg.shape == (3, 2, 2) and fg[0, 0, 0] < 1.0 == fg[0, 1, 1]
    assert fg[0, 0, 0] == pytest.approx((arrays["s0"][:, :8, :32, :32] > 0).any(axis=0).mean())
    assert sorted(p.name for p in staging_dir(tmp_path / "s.zarr").iterdir()) == [conv.LOCK_NAME, conv.WRITERS_LOCK]


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_every_synth_format_round_trips(tmp_path, codec):
    from stacktrain.stores.synth import synth
    labels = synth(tmp_path / "raw", stacks=8, shape_zyx=(12, 40, 40), seed=3, progress=False)
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    formats = {open_source(labels.parent / r["path"], axes=r.get("axes") or None).format for r in rows}
    assert {"tiff", "slices", "nifti", "npy", "dicom"} <= formats
    convert(labels, tmp_path / "s.zarr", ConvertOptions(codec=codec, **TINY))
    store = Store(tmp_path / "s.zarr")
    assert store.stack_ids == [r["stack_id"] for r in rows]
    for r in rows:
        want = source_array(labels.parent / r["path"], r.get("axes") or None)
        np.testing.assert_array_equal(store.read(r["stack_id"]), want, err_msg=r["path"])
        assert store.meta(r["stack_id"]).codec == codec


def test_hand_written_formats_round_trip(tmp_path):
    """Files written with each format's own library (independent of synth) come back unchanged."""
    import nibabel as nib
    import tifffile
    from PIL import Image
    a = tissue((3, 10, 24, 20), seed=5)
    zyxc = np.ascontiguousarray(np.moveaxis(a, 0, -1))
    tifffile.imwrite(tmp_path / "t.tif", zyxc, photometric="rgb")
    (tmp_path / "png").mkdir()
    for z in range(a.shape[1]):  # slice10 must come after slice9 (natural order)
        Image.fromarray(zyxc[z]).save(tmp_path / "png" / f"slice{z}.png")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyxc.transpose(2, 1, 0, 3)), np.eye(4)), tmp_path / "n.nii.gz")
    np.savez(tmp_path / "z.npz", volume=a)
    rows = [("t.tif", "tif", "SAIN", "p"), ("png", "png", "SAIN", "p"), ("n.nii.gz", "nii", "MALADE", "q"),
            ("z.npz", "npz", "MALADE", "q")]
    convert(write_manifest(tmp_path, rows), tmp_path / "s.zarr", ConvertOptions(**TINY))
    store = Store(tmp_path / "s.zarr")
    for sid in ("tif", "png", "nii", "npz"):
        np.testing.assert_array_equal(store.read(sid), a, err_msg=sid)


def test_parallel_workers_match_serial(npy_stacks, tmp_path):
    manifest, arrays = npy_stacks
    convert(manifest, tmp_path / "par.zarr", ConvertOptions(workers=2, **TINY))
    store = Store(tmp_path / "par.zarr")
    assert store.stack_ids == list(arrays)
    for sid, a in arrays.items():
        np.testing.assert_array_equal(store.read(sid), a)


def test_rerun_skips_unchanged_and_overwrite_redoes(npy_stacks, tmp_path):
    manifest, arrays = npy_stacks
    out = tmp_path / "s.zarr"
    convert(manifest, out, ConvertOptions(**TINY))
    stamp = (out / "s0" / "zarr.json").stat().st_ino
    report = convert(manifest, out, ConvertOptions(**TINY))
    assert [o.status for o in report.outcomes] == ["skipped"] * 3
    assert (out / "s0" / "zarr.json").stat().st_ino == stamp  # not rewritten
    report = convert(manifest, out, ConvertOptions(overwrite=True, **TINY))
    assert [o.status for o in report.outcomes] == ["converted"] * 3
    assert (out / "s0" / "zarr.json").stat().st_ino != stamp
    np.testing.assert_array_equal(Store(out).read("s0"), arrays["s0"])


def test_changed_source_or_label_needs_overwrite(npy_stacks, tmp_path):
    manifest, arrays = npy_stacks
    out = tmp_path / "s.zarr"
    convert(manifest, out, ConvertOptions(**TINY))
    np.save(tmp_path / "s1.npy", arrays["s1"][:, ::-1].copy())
    manifest.write_text(manifest.read_text().replace("s2.npy,s2,SAIN", "s2.npy,s2,MALADE"))
    with pytest.raises(ConversionFailed) as e:
        convert(manifest, out, ConvertOptions(**TINY))
    errors = {o.stack_id: o.error for o in e.value.report.outcomes if o.error}
    assert set(errors) == {"s1", "s2"}
    assert "source sha256" in errors["s1"] and "--overwrite" in errors["s1"]
    assert "label is 'SAIN' in the store but 'MALADE' now" in errors["s2"]
    np.testing.assert_array_equal(Store(out).read("s1"), arrays["s1"])  # the old stack is kept
    convert(manifest, out, ConvertOptions(overwrite=True, **TINY))
    np.testing.assert_array_equal(Store(out).read("s1"), arrays["s1"][:, ::-1])
    assert Store(out).meta("s2").label == "MALADE"


def test_pad_replicate_and_scale(tmp_path):
    one = tissue((1, 5, 12, 20), seed=1)[0]  # 3-D: one channel, smaller than the minimum patch
    floats = tissue((3, 6, 16, 16), seed=2).astype(np.float64) * 3.5 - 100.0
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "f.npy", floats)
    manifest = write_manifest(tmp_path, [("one.npy", "one", "SAIN", "a"), ("f.npy", "f", "SAIN", "b")])
    opts = dict(chunk_zyx=(4, 8, 8), shard_zyx=(8, 16, 16), min_patch_zyx=(8, 16, 16))
    convert(manifest, tmp_path / "mm.zarr", ConvertOptions(pad=True, replicate_channels=True, scale="minmax", **opts))
    store = Store(tmp_path / "mm.zarr")
    got = store.read("one")
    assert got.shape == (3, 8, 16, 20) and store.meta("one").shape == (3, 8, 16, 20)
    for ch in range(3):
        np.testing.assert_array_equal(got[ch, :5, :12, :20], one)
    assert not got[:, 5:].any() and not got[:, :, 12:].any()
    lo, hi = floats.min(), floats.max()
    want = (floats - lo) / (hi - lo) * 255.0
    f = store.read("f")
    assert f.shape == (3, 8, 16, 16) and not f[:, 6:].any()
    f = f[:, :6]
    assert store.meta("f").dtype == "uint8" and f.min() == 0 and f.max() == 255
    np.testing.assert_allclose(f, want, atol=0.51)
    convert(manifest, tmp_path / "clip.zarr", ConvertOptions(pad=True, replicate_channels=True, scale="clip", **opts))
    np.testing.assert_array_equal(Store(tmp_path / "clip.zarr").read("f")[:, :6],
                                  np.rint(np.clip(floats, 0, 255)).astype(np.uint8))


def test_uint16_is_kept(tmp_path):
    a = tissue((3, 8, 16, 16), seed=4, dtype=np.uint16)
    np.save(tmp_path / "a.npy", a)
    convert(write_manifest(tmp_path, [("a.npy", "a", "SAIN", "g")]), tmp_path / "s.zarr",
            ConvertOptions(**TINY))
    store = Store(tmp_path / "s.zarr")
    assert store.meta("a").dtype == "uint16"
    np.testing.assert_array_equal(store.read("a"), a)


def test_stacks_from_other_manifests_stay_listed(npy_stacks, tmp_path):
    manifest, arrays = npy_stacks
    out = tmp_path / "s.zarr"
    np.save(tmp_path / "extra.npy", tissue((3, 8, 16, 16), seed=9))
    convert(write_manifest(tmp_path, [("extra.npy", "extra", "SAIN", "x")], "other.csv"), out,
            ConvertOptions(**TINY))
    convert(manifest, out, ConvertOptions(**TINY))
    assert Store(out).stack_ids == ["extra", "s0", "s1", "s2"]


def test_stale_staging_is_cleaned(npy_stacks, tmp_path):
    manifest, _ = npy_stacks
    out = tmp_path / "s.zarr"
    (staging_dir(out) / "s0.deadbeef" / "image").mkdir(parents=True)  # what a killed run leaves behind
    out.mkdir()
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "stacktrain": {"format_version": 1, "stacks": []}}}))
    convert(manifest, out, ConvertOptions(**TINY))
    assert sorted(p.name for p in staging_dir(out).iterdir()) == [conv.LOCK_NAME, conv.WRITERS_LOCK]


def test_cli_convert_then_info(npy_stacks, tmp_path, capsys):
    manifest, arrays = npy_stacks
    out = tmp_path / "s.zarr"
    code = main(["convert", str(manifest), "--out", str(out), "--codec", "zstd", "--chunk", "8", "16", "16",
                 "--shard", "16", "32", "32", "--min-patch", "4", "16", "16", "--foreground-threshold", "10"])
    assert code == 0
    captured = capsys.readouterr()
    assert "3 converted, 0 skipped (unchanged), 0 failed of 3 stacks" in captured.out
    assert "3/3 stacks" in captured.err and "/s" in captured.err  # the bar's last state: stacks and MB/s
    m = Store(out).meta("s2")
    assert (m.codec, m.chunk_zyx, m.shard_zyx, m.foreground_threshold) == ("zstd", (8, 16, 16), (16, 32, 32), 10)


def test_axes_column_and_option(tmp_path):
    a, b = tissue((3, 4, 16, 16), seed=6), tissue((3, 4, 16, 16), seed=7)
    for name, arr in (("a.npy", a), ("b.npy", b)):  # (4, 16, 16, 3): z=4 and c=3 are both "small"
        np.save(tmp_path / name, np.ascontiguousarray(np.moveaxis(arr, 0, -1)))
    manifest = write_manifest(tmp_path, [("a.npy", "by_column", "SAIN", "g", "zyxc"),
                                         ("b.npy", "by_option", "SAIN", "g")])
    with pytest.raises(ConversionFailed) as e:
        convert(manifest, tmp_path / "a.zarr", ConvertOptions(**TINY))
    (failed,) = [o for o in e.value.report.outcomes if o.error]
    assert failed.stack_id == "by_option" and "cannot tell the axes" in failed.error and "--axes" in failed.error
    convert(manifest, tmp_path / "b.zarr", ConvertOptions(axes="zyxc", **TINY))
    store = Store(tmp_path / "b.zarr")
    np.testing.assert_array_equal(store.read("by_column"), a)
    np.testing.assert_array_equal(store.read("by_option"), b)


def test_stats_cells_span_shards_thinner_than_a_cell(tmp_path):
    """Shard depth 4 < stats cell depth 8: slabs are regrouped so every statistics cell sees all its slices."""
    a = tissue((3, 20, 32, 32), seed=7)
    a[:, 4:8, :16, :16] = 0  # the second half (in z) of the first stats cell is empty
    np.save(tmp_path / "a.npy", a)
    convert(write_manifest(tmp_path, [("a.npy", "a", "SAIN", "g")]), tmp_path / "s.zarr",
            ConvertOptions(chunk_zyx=(4, 16, 16), shard_zyx=(4, 32, 32), min_patch_zyx=(4, 16, 16)))
    stats = Store(tmp_path / "s.zarr").stats("a")
    assert stats["foreground"][0, 0, 0] == pytest.approx((a[:, :8, :32, :32] > 0).any(axis=0).mean())
    np.testing.assert_allclose(stats["mean"][:, 2, 0, 0], a[:, 16:20, :32, :32].reshape(3, -1).mean(axis=1), rtol=1e-5)


def test_cli_synth_prints_the_stacks(tmp_path, capsys):
    code = main(["synth", str(tmp_path / "raw"), "--stacks", "3", "--shape", "8", "32", "32", "--seed", "2"])
    assert code == 0
    out = capsys.readouterr().out
    with (tmp_path / "raw" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and str(tmp_path / "raw" / "labels.csv") in " ".join(out.split())
    for r in rows:
        line = next(line for line in out.splitlines() if f" {r['stack_id']} " in line and "│" in line)
        assert r["label"] in line and r["group"] in line and "3x8x32x32" in line


def test_a_second_convert_waits_for_a_stack_another_process_is_writing(npy_stacks, tmp_path):
    """Converts share a store: a stack another process holds (what a running convert holds while it writes
    it) is waited for, the others go ahead meanwhile; once it is free the stack is converted."""
    import threading
    import time

    from stacktrain.stores import convert_lock, writer
    manifest, _ = npy_stacks
    out = writer.init_store(tmp_path / "s.zarr")
    done: list = []
    with convert_lock.stack_lock(out, "s2"):
        worker = threading.Thread(target=lambda: done.append(convert(manifest, out, ConvertOptions(**TINY,
                                                                                                   workers=1))))
        worker.start()
        deadline = time.monotonic() + 60
        while Store(out).stack_ids != ["s0", "s1"]:  # the free stacks are converted while s2 is held
            assert time.monotonic() < deadline and worker.is_alive(), "s0 and s1 were not converted"
            time.sleep(0.01)
        assert worker.is_alive() and not (out / "s2").exists()
    worker.join(60)
    assert done and done[0].count("converted") == 3 and Store(out).stack_ids == ["s0", "s1", "s2"]


def test_peak_memory_does_not_grow_with_stack_depth(tmp_path):
    """Streaming: a 6x deeper stack converts within the same traced peak (numpy and zarr buffers). Both
    stacks span several 32-slice slabs, so both have the reader thread's slab in flight: a one-slab stack
    as the baseline made the comparison depend on whether that thread was ahead."""
    import tracemalloc
    rng = np.random.default_rng(0)
    for depth in (64, 384):
        arr = np.lib.format.open_memmap(tmp_path / f"d{depth}.npy", mode="w+", dtype=np.uint8, shape=(3, depth, 48, 48))
        for z0 in range(0, depth, 32):
            arr[:, z0:z0 + 32] = rng.integers(0, 200, (3, 32, 48, 48), dtype=np.uint8)
        arr.flush()
        del arr
    options = ConvertOptions(chunk_zyx=(8, 48, 48), shard_zyx=(16, 48, 48), min_patch_zyx=(4, 16, 16))
    convert(write_manifest(tmp_path, [("d64.npy", "warm", "SAIN", "g")], "warm.csv"), tmp_path / "warm.zarr", options)
    peaks = {}
    for depth in (64, 384):
        manifest = write_manifest(tmp_path, [(f"d{depth}.npy", f"d{depth}", "SAIN", "g")], f"{depth}.csv")
        tracemalloc.start()
        convert(manifest, tmp_path / f"{depth}.zarr", options)
        peaks[depth] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    stack_bytes = 3 * 384 * 48 * 48
    assert peaks[384] < 1.25 * peaks[64] and peaks[384] < stack_bytes / 2, (peaks, stack_bytes)


def test_staging_lives_beside_the_store_so_zarr_lists_it_without_a_warning(npy_stacks, tmp_path):
    import warnings

    import zarr
    manifest, _ = npy_stacks
    out = tmp_path / "s.zarr"
    (out / ".staging" / "s0.deadbeef").mkdir(parents=True)  # an older stacktrain's staging, inside the store
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "stacktrain": {"format_version": 1, "stacks": []}}}))
    convert(manifest, out, ConvertOptions(**TINY))
    assert not (out / ".staging").exists()  # cleared under the convert lock
    assert staging_dir(out) == tmp_path / ".s.zarr.staging" and staging_dir(out).is_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr-python warns on any folder that is not a group or an array
        members = dict(zarr.open_group(out, mode="r").members())
    assert sorted(members) == ["OME", "s0", "s1", "s2"]  # OME: the collection's series list
