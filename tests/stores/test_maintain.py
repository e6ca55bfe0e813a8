"""`stacktrain relabel` and `stacktrain remove`: metadata only, atomic, the root list kept consistent."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.errors import StoreError
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.maintain import relabel, remove
from stacktrain.stores.reader import Store


def test_relabel_changes_metadata_only(small_store, capsys):
    store, arrays = small_store
    sid = Store(store).stack_ids[0]
    shards = sorted((p, p.read_bytes()) for p in (store / sid / "image").rglob("c/**/*") if p.is_file())
    before = Store(store).meta(sid)
    new = "SAIN" if before.label == "MALADE" else "MALADE"
    assert main(["relabel", str(store), sid, new.lower(), "--group", "p-new"]) == 0
    after = Store(store).meta(sid)
    assert (after.label, after.group) == (new, "p-new")
    assert after.source_sha256 == before.source_sha256 and after.record == before.record
    assert [(p, p.read_bytes()) for p, _ in shards] == shards  # no voxel rewritten
    root = Store(store)
    assert {m.stack_id: m.label for m in root.stacks}[sid] == new
    np.testing.assert_array_equal(root.read(sid), arrays[sid])


def test_remove_takes_stacks_out_and_drops_folders_deleted_by_hand(small_store):
    store, _ = small_store
    ids = Store(store).stack_ids
    shutil.rmtree(store / ids[1])  # deleted by hand: the store no longer opens
    with pytest.raises(StoreError, match=f"stacktrain remove {store} {ids[1]}"):
        Store(store)
    assert main(["remove", str(store), ids[0], ids[1]]) == 0
    assert Store(store).stack_ids == ids[2:]
    assert not (store / ids[0]).exists()


@pytest.mark.parametrize("case", ["unknown-stack", "bad-label", "empty-group", "not-a-store"])
def test_maintenance_refusals_are_one_line(small_store, tmp_path, capsys, case):
    store, _ = small_store
    sid = Store(store).stack_ids[0]
    argv = {"unknown-stack": ["relabel", str(store), "nope", "SAIN"],
            "bad-label": ["relabel", str(store), sid, "ILL"],
            "empty-group": ["relabel", str(store), sid, "SAIN", "--group", " "],
            "not-a-store": ["remove", str(tmp_path), "x"]}[case]
    before = (store / "zarr.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (store / "zarr.json").read_bytes() == before


def test_relabel_waits_for_no_convert(small_store):
    """Maintenance takes the convert lock: refused while a convert holds the store."""
    import fcntl
    store, _ = small_store
    with open(staging_dir(store) / "convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another `stacktrain convert`"):
            relabel(store, Store(store).stack_ids[0], "SAIN")
        with pytest.raises(StoreError, match="another `stacktrain convert`"):
            remove(store, [Store(store).stack_ids[0]])


def test_info_reports_a_stack_folder_deleted_by_hand(small_store, capsys):
    store, _ = small_store
    ids = Store(store).stack_ids
    shutil.rmtree(store / ids[0])
    assert main(["info", str(store), "--json", str(store.parent / "info.json")]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and f"stacktrain remove {store} {ids[0]}" in out
    import json
    summary = json.loads((store.parent / "info.json").read_text())
    assert list(summary["damaged"]) == [ids[0]] and [r["stack_id"] for r in summary["stacks"]] == ids[1:]


def test_convert_waits_for_no_maintenance(small_store, tmp_path):
    """A convert takes the convert lock shared: refused at once while maintenance holds it exclusive,
    and nothing is written."""
    import fcntl

    from stacktrain.stores.convert import ConvertOptions, convert
    store, _ = small_store
    np.save(tmp_path / "n.npy", np.ones((3, 8, 16, 16), np.uint8))
    (tmp_path / "m.csv").write_text("path,stack_id,label,group\nn.npy,newcomer,SAIN,p1\n")
    before = (store / "zarr.json").read_bytes()
    with open(staging_dir(store) / "convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="`remove` or `export` is changing this store"):
            convert(tmp_path / "m.csv", store, ConvertOptions(workers=1, min_patch_zyx=(8, 16, 16)))
    assert (store / "zarr.json").read_bytes() == before and not (store / "newcomer").exists()
