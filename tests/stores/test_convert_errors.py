"""Bad input to `stacktrain convert`: one clear error naming the file, exit 2, nothing written for it.

Data errors fail their stack only (the good stack beside it is converted); manifest errors abort the
run before the store is even created.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.stores.layout import staging_dir
from stacktrain.testing import tissue

SMALL = ["--min-patch", "4", "16", "16", "--chunk", "4", "16", "16", "--shard", "8", "16", "16", "--no-progress"]


def write_manifest(folder, rows):
    path = folder / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return path


def run(capsys, manifest, out, *extra):
    code = main(["convert", str(manifest), "--out", str(out), *SMALL, *extra])
    captured = capsys.readouterr()
    return code, " ".join(captured.err.split())  # rich may wrap; compare on single spaces


def registered(out):
    return [e["stack_id"] for e in json.loads((out / "zarr.json").read_text())["attributes"]["stacktrain"]["stacks"]]


def _png_folder(folder, sizes):
    from PIL import Image
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 + i, np.uint8)).save(folder / f"s{i}.png")
    return folder.name


def _npy(folder, name, arr):
    np.save(folder / name, arr)
    return name


def _truncated_npy(folder):
    np.save(folder / "cut.npy", tissue((3, 8, 16, 16)))
    data = (folder / "cut.npy").read_bytes()
    (folder / "cut.npy").write_bytes(data[: len(data) // 2])
    return "cut.npy"


def _truncated_tiff(folder):
    import tifffile
    tifffile.imwrite(folder / "cut.tif", np.moveaxis(tissue((3, 8, 16, 16)), 0, -1), photometric="rgb")
    data = (folder / "cut.tif").read_bytes()
    (folder / "cut.tif").write_bytes(data[: len(data) // 2])
    return "cut.tif"


def _garbage(folder):
    (folder / "junk.npy").write_bytes(b"this is not a numpy file\n" * 10)
    return "junk.npy"


def _nan(folder):
    a = tissue((3, 8, 16, 16)).astype(np.float32)
    a[1, 5, 3, 3] = np.nan
    return _npy(folder, "nan.npy", a)


# (case id, file maker, extra options, words the error must contain)
DATA_CASES = [
    ("unreadable", _garbage, [], ["junk.npy", "cannot read"]),
    ("truncated-npy", _truncated_npy, [], ["cut.npy"]),
    ("truncated-tiff", _truncated_tiff, [], ["cut.tif", "truncated"]),
    ("ragged-slices", lambda d: _png_folder(d / "ragged", [(16, 16), (16, 16), (16, 20), (16, 16)]), [],
     ["ragged", "s2.png", "same size"]),
    ("too-few-slices", lambda d: _npy(d, "thin.npy", tissue((3, 3, 16, 16))), [], ["thin.npy", "z=3 < 4", "--pad"]),
    ("yx-too-small", lambda d: _npy(d, "small.npy", tissue((3, 8, 10, 16))), [], ["small.npy", "y=10 < 16", "--pad"]),
    ("wrong-channels", lambda d: _npy(d, "two.npy", tissue((2, 8, 16, 16))), [], ["two.npy", "has 2 channels"]),
    ("one-channel", lambda d: _npy(d, "gray.npy", tissue((1, 8, 16, 16))[0]), [],
     ["gray.npy", "has 1 channel", "--replicate-channels"]),
    ("float-dtype", lambda d: _npy(d, "f.npy", tissue((3, 8, 16, 16)).astype(np.float32)), [],
     ["f.npy", "dtype float32", "--scale minmax"]),
    ("int16-dtype", lambda d: _npy(d, "i.npy", tissue((3, 8, 16, 16)).astype(np.int16)), [],
     ["i.npy", "dtype int16", "--scale"]),
    ("nan", _nan, [], ["nan.npy", "dtype float32"]),
    ("nan-minmax", _nan, ["--scale", "minmax"], ["nan.npy", "NaN", "z=5"]),
    ("nan-clip", _nan, ["--scale", "clip"], ["nan.npy", "NaN", "z=5"]),
]


@pytest.mark.parametrize("make, extra, words", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_stack_fails_alone(tmp_path, capsys, make, extra, words):
    bad = make(tmp_path)
    good = _npy(tmp_path, "good.npy", tissue((3, 8, 16, 16), seed=1))
    manifest = write_manifest(tmp_path, [(good, "good", "SAIN", "p1"), (bad, "bad", "MALADE", "p2")])
    out = tmp_path / "s.zarr"
    code, err = run(capsys, manifest, out, *extra)
    assert code == 2
    for word in words:
        assert word in err
    assert "stack 'bad'" in err and "manifest line 3" in err
    assert "1 of 2 stacks failed and were not written (bad);" in err
    assert registered(out) == ["good"] and (out / "good" / "zarr.json").exists()
    assert not (out / "bad").exists()
    assert {p.name for p in staging_dir(out).iterdir()} <= {"convert.lock", "writers.lock"}


# (case id, rows -> (path, stack_id, label), words the error must contain)
MANIFEST_CASES = [
    ("duplicate-id", [("a.npy", "a", "SAIN"), ("b.npy", "a", "SAIN")], ["line 3", "duplicate stack_id 'a'", "line 2"]),
    ("slash-id", [("a.npy", "a/b", "SAIN")], ["line 2", "stack_id 'a/b' is not safe"]),
    ("dotdot-id", [("a.npy", "..", "SAIN")], ["stack_id '..' is not safe"]),
    ("hidden-id", [("a.npy", ".x", "SAIN")], ["stack_id '.x' is not safe"]),
    ("space-id", [("a.npy", "a b", "SAIN")], ["stack_id 'a b' is not safe"]),
    ("unknown-label", [("a.npy", "a", "MALIGNANT")], ["line 2", "unknown label 'MALIGNANT'", "SAIN, MALADE"]),
    ("missing-file", [("a.npy", "a", "SAIN"), ("gone.npy", "g", "SAIN")], ["line 3", "'gone.npy' not found"]),
]


@pytest.mark.parametrize("rows, words", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_error_aborts_before_writing(tmp_path, capsys, rows, words):
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, tissue((3, 8, 16, 16)))
    manifest = write_manifest(tmp_path, [(p, sid, label, "g") for p, sid, label in rows])
    out = tmp_path / "s.zarr"
    code, err = run(capsys, manifest, out)
    assert code == 2
    assert str(manifest) in err and "nothing was converted" in err
    for word in words:
        assert word in err
    assert not out.exists()


def test_every_manifest_problem_is_listed_at_once(tmp_path, capsys):
    np.save(tmp_path / "a.npy", tissue((3, 8, 16, 16)))
    manifest = write_manifest(tmp_path, [("a.npy", "a", "sick", "g"), ("nope.npy", "a/b", "SAIN", "")])
    code, err = run(capsys, manifest, tmp_path / "s.zarr")
    assert code == 2 and "4 problem(s)" in err
    assert all(w in err for w in ("unknown label 'sick'", "'a/b' is not safe", "empty group", "'nope.npy' not found"))


@pytest.mark.parametrize("header, words", [
    (["path", "id", "label", "group"], ["missing column(s) stack_id"]),
    (["path", "stack_id", "label", "group"], ["has no rows"]),
])
def test_malformed_manifest(tmp_path, capsys, header, words):
    manifest = tmp_path / "labels.csv"
    manifest.write_text(",".join(header) + "\n")
    code, err = run(capsys, manifest, tmp_path / "s.zarr")
    assert code == 2 and all(w in err for w in words) and str(manifest) in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("extra, words", [
    (["--shard", "8", "16", "24"], ["--shard (8, 16, 24) must be a multiple of --chunk (4, 16, 16)"]),
    (["--workers", "0"], ["--workers 0"]),
    (["--axes", "zyxq"], ["--axes", "not an axis order"]),
    (["--chunk", "0", "16", "16"], ["--chunk", "three positive integers"]),
])
def test_bad_options(tmp_path, capsys, extra, words):
    np.save(tmp_path / "a.npy", tissue((3, 8, 16, 16)))
    code, err = run(capsys, write_manifest(tmp_path, [("a.npy", "a", "SAIN", "g")]), tmp_path / "s.zarr", *extra)
    assert code == 2 and all(w in err for w in words)
    assert not (tmp_path / "s.zarr").exists()


def test_out_that_is_not_a_store_is_refused(tmp_path, capsys):
    np.save(tmp_path / "a.npy", tissue((3, 8, 16, 16)))
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "precious.txt").write_text("keep me")
    code, err = run(capsys, write_manifest(tmp_path, [("a.npy", "a", "SAIN", "g")]), tmp_path / "s.zarr")
    assert code == 2 and "is not a stacktrain store" in err
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir()) == ["precious.txt"]
