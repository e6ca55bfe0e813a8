"""Manifests as real spreadsheets write them, and paths that are not files: caught before any write."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.errors import InputError
from stacktrain.stores.manifest import read_manifest
from stacktrain.testing import tissue


@pytest.fixture
def two_stacks(tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", tissue((3, 8, 16, 16)))
    return tmp_path


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_delimiters_case_and_labels_from_a_spreadsheet(two_stacks, sep):
    text = sep.join(["Path", "Stack_ID", "LABEL", "Group", "Axes"]) + "\n"
    text += sep.join(["a.npy", "a", "sain", "p1", "czyx"]) + "\n" + sep.join(["b.npy", "b", "Malade", "p2", ""]) + "\n"
    (two_stacks / "m.csv").write_text(text)
    rows = read_manifest(two_stacks / "m.csv")
    assert [(r.stack_id, r.label, r.group, r.axes) for r in rows] == [("a", "SAIN", "p1", "czyx"),
                                                                      ("b", "MALADE", "p2", None)]


def test_an_unknown_column_is_an_error_listing_the_known_ones(two_stacks):
    (two_stacks / "m.csv").write_text("path,stack_id,label,group,patient_age\na.npy,a,SAIN,p1,40\n")
    with pytest.raises(InputError, match="unknown column.*'patient_age'.*known ones are path, stack_id, label, "
                                         "group, axes"):
        read_manifest(two_stacks / "m.csv")


def test_a_fifo_a_socket_and_a_symlink_loop_are_refused_up_front(two_stacks, tmp_path, capsys):
    os.mkfifo(two_stacks / "pipe.npy")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(two_stacks / "sock.npy"))
    os.symlink(two_stacks / "loop2.npy", two_stacks / "loop1.npy")
    os.symlink(two_stacks / "loop1.npy", two_stacks / "loop2.npy")
    rows = ["path,stack_id,label,group", "pipe.npy,p,SAIN,g1", "sock.npy,s,SAIN,g2", "loop1.npy,l,MALADE,g3",
            "a.npy,a,MALADE,g4"]
    (two_stacks / "m.csv").write_text("\n".join(rows) + "\n")
    try:
        code = main(["convert", str(two_stacks / "m.csv"), "--out", str(tmp_path / "s.zarr"), "--no-progress"])
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert code == 2 and "3 problem(s), nothing was converted" in err
    assert "'pipe.npy' is not a regular file" in err and "'sock.npy' is not a regular file" in err
    assert "'loop1.npy' is a symlink loop" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("sid", ["zarr.json", "image", "Stats", ".staging", ".hidden"])
def test_reserved_stack_ids_are_refused_and_the_store_is_untouched(small_store, tmp_path, capsys, sid):
    store, _ = small_store
    before = (store / "zarr.json").read_bytes()
    np.save(tmp_path / "a.npy", tissue((3, 8, 16, 16)))
    (tmp_path / "m.csv").write_text(f"path,stack_id,label,group\na.npy,{sid},SAIN,g\n")
    assert main(["convert", str(tmp_path / "m.csv"), "--out", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert sid in err and "nothing was converted" in err
    assert (store / "zarr.json").read_bytes() == before
    assert main(["info", str(store)]) == 0


def test_a_crafted_root_list_cannot_name_paths_outside_the_store(small_store, capsys):
    import json
    store, _ = small_store
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["stacktrain"]["stacks"][0]["stack_id"] = "../../escape/stack000"
    (store / "zarr.json").write_text(json.dumps(root))
    assert main(["info", str(store)]) == 2
    err = capsys.readouterr().err
    assert "'../../escape/stack000' is not safe" in err and "stack list is damaged" in err


def test_a_label_map_covers_the_labs_own_words(two_stacks, tmp_path, capsys):
    (two_stacks / "m.csv").write_text("path,stack_id,label,group\na.npy,a,Healthy,p1\nb.npy,b,diseased,p2\n")
    with pytest.raises(InputError, match="unknown label 'Healthy'.*--label-map"):
        read_manifest(two_stacks / "m.csv")
    rows = read_manifest(two_stacks / "m.csv", label_map={"healthy": "SAIN", "diseased": "MALADE"})
    assert [r.label for r in rows] == ["SAIN", "MALADE"]
    out = tmp_path / "store.zarr"
    code = main(["convert", str(two_stacks / "m.csv"), "--out", str(out), "--min-patch", "8", "16", "16",
                 "--label-map", " healthy=sain , DISEASED=Malade", "--workers", "1", "--no-progress"])
    assert code == 0
    from stacktrain.stores.reader import Store
    assert [m.label for m in Store(out).stacks] == ["SAIN", "MALADE"]


@pytest.mark.parametrize("bad", ["healthy", "healthy=ILL", "=SAIN", "a=SAIN,b"])
def test_a_malformed_label_map_is_one_line(two_stacks, tmp_path, capsys, bad):
    (two_stacks / "m.csv").write_text("path,stack_id,label,group\na.npy,a,SAIN,p1\n")
    code = main(["convert", str(two_stacks / "m.csv"), "--out", str(tmp_path / "s.zarr"), "--label-map", bad])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--label-map" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
