"""`stacktrain verify`, the completeness record, and what `convert` does with what it finds: reruns
redo incomplete stacks, the next convert clears leftovers and waits for an earlier run's writers,
a full disk is one line, and train refuses a damaged store (the corruption table: tests/faults)."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.errors import ConversionFailed, StoreError, user_message
from stacktrain.stores import convert_lock, writer
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import NO_RECORD, check_stack, verify_store
from stacktrain.testing import tissue
from tests.stores.test_convert import TINY, write_manifest

CLI_TINY = ["--chunk", "8", "16", "16", "--shard", "16", "32", "32", "--min-patch", "4", "16", "16"]


@pytest.fixture
def npy(tmp_path):
    """Three .npy stacks and their manifest; returns (manifest, arrays)."""
    arrays = {f"q{i}": tissue((3, 24, 40, 40), seed=i) for i in range(3)}
    for sid, a in arrays.items():
        np.save(tmp_path / f"{sid}.npy", a)
    rows = [(f"{sid}.npy", sid, "SAIN" if i % 2 else "MALADE", f"p{i}") for i, sid in enumerate(arrays)]
    return write_manifest(tmp_path, rows), arrays


def _tree(store):
    """Every file of a store (its staging folder and locks live beside it), with its bytes."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _drop_record(store, sid):
    path = store / sid / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["stacktrain"].pop("record")
    path.write_text(json.dumps(doc))


def test_record_lists_every_shard_with_size_and_checksums(npy, tmp_path):
    manifest, arrays = npy
    convert(manifest, tmp_path / "s.zarr", ConvertOptions(**TINY))
    store = Store(tmp_path / "s.zarr")
    for sid in arrays:
        record = store.meta(sid).record
        files = {p.relative_to(store.array_path(sid)).as_posix(): p.stat().st_size
                 for p in store.array_path(sid).rglob("c/**/*") if p.is_file()}
        assert record["grid"] == [2, 2, 2] and {k: v[0] for k, v in record["shards"].items()} == files
    checks = verify_store(tmp_path / "s.zarr", deep=True)
    assert [(c.stack_id, c.ok, c.note) for c in checks] == [(sid, True, None) for sid in arrays]


def test_verify_cli_reports_each_stack_and_exits_2_when_damaged(npy, tmp_path, capsys):
    manifest, _ = npy
    out = tmp_path / "s.zarr"
    convert(manifest, out, ConvertOptions(**TINY))
    assert main(["verify", str(out), "--deep"]) == 0
    assert "3 stacks ok" in capsys.readouterr().out
    (out / "q1" / "image" / "0" / "c" / "0" / "0" / "0" / "0").unlink()
    assert main(["verify", str(out)]) == 2
    captured = capsys.readouterr()
    table = " ".join(captured.out.split())
    assert "damaged" in table and "missing" in table and table.count(" ok ") == 2
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "1 of 3 stacks are damaged (q1)" in err


def test_old_stores_without_a_record_are_checked_as_far_as_possible(npy, tmp_path, capsys):
    manifest, _ = npy
    out = tmp_path / "s.zarr"
    convert(manifest, out, ConvertOptions(**TINY))
    _drop_record(out, "q0")
    assert check_stack(out, "q0", deep=True).note == NO_RECORD and check_stack(out, "q0", deep=True).ok
    assert main(["verify", str(out)]) == 0
    assert "reconvert to get checksums" in " ".join(capsys.readouterr().out.split())
    shard = out / "q0" / "image" / "0" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-1])  # without a record, the index still has its checksum
    assert not check_stack(out, "q0").ok
    with pytest.raises(StoreError, match="'q0'.*does not match"):
        Store(out).read("q0")


@pytest.mark.parametrize("damage", ["shard-deleted", "shard-truncated", "no-record", "stack-zarr-json-garbled"])
def test_a_rerun_reconverts_an_incomplete_stack(npy, tmp_path, capsys, damage):
    manifest, arrays = npy
    out, clean = tmp_path / "s.zarr", tmp_path / "clean.zarr"
    convert(manifest, clean, ConvertOptions(**TINY))
    shutil.copytree(clean, out)
    array = out / "q1" / "image" / "0"
    if damage == "shard-deleted":
        (array / "c" / "0" / "1" / "1" / "1").unlink()
    elif damage == "shard-truncated":
        (array / "c" / "0" / "0" / "0" / "0").write_bytes(b"")
        (array / "zarr.json").unlink()
    elif damage == "no-record":
        _drop_record(out, "q1")
    else:
        (out / "q1" / "zarr.json").write_text("{")
    assert main(["convert", str(manifest), "--out", str(out), "--no-progress", *CLI_TINY]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "q1: reconverted, the stored stack was incomplete:" in said and "q0: reconverted" not in said
    assert "0 converted, 1 reconverted (incomplete), 2 skipped (unchanged)" in said
    assert _tree(out) == _tree(clean)  # byte for byte what a clean conversion writes


def test_the_next_convert_removes_leftover_temp_files(npy, tmp_path):
    manifest, _ = npy
    out = tmp_path / "s.zarr"
    convert(manifest, out, ConvertOptions(**TINY))
    leftovers = [out / ".zarr.json.k1ll3d.tmp", out / "q0" / ".zarr.json.abc123.tmp", staging_dir(out) / "q2.1234"]
    for p in leftovers:
        p.write_text("half")
    keep = out / "q0" / "notes.txt"  # not ours: left alone
    keep.write_text("mine")
    convert(manifest, out, ConvertOptions(**TINY))
    assert not any(p.exists() for p in leftovers) and keep.exists()


def test_convert_waits_for_an_earlier_runs_writer_and_says_so(npy, tmp_path, monkeypatch):
    manifest, _ = npy
    out = tmp_path / "s.zarr"
    writer.init_store(out)
    monkeypatch.setattr(convert_lock, "OLD_WRITERS_WAIT_S", 0.3)
    with convert_lock.stack_lock(out, "q0"):  # what a worker of a killed run holds while it writes q0
        stale = staging_dir(out) / "q0.deadbeef"
        stale.mkdir()
        with pytest.raises(ConversionFailed) as e:  # in this process, where the shorter wait applies
            convert(manifest, out, ConvertOptions(**TINY, workers=1))
        why = " ".join(o.error for o in e.value.report.outcomes if o.error)
        assert "still writing stack 'q0'" in why and "q0.lock" in why
        assert stale.exists() and e.value.report.count("converted") == 2  # nothing of q0 cleaned under its writer
    report = convert(manifest, out, ConvertOptions(**TINY))  # the writer ended: the run goes ahead
    assert report.count("converted") == 1 and report.count("skipped") == 2 and not stale.exists()


def test_a_full_disk_while_writing_the_stack_list_is_one_line(tmp_path, monkeypatch):
    out = writer.init_store(tmp_path / "s.zarr")
    before = (out / "zarr.json").read_bytes()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "atomic_write_text", full)
    with pytest.raises(StoreError) as e:
        writer.register(out, [])
    text = str(e.value)
    assert "\n" not in text and str(out / "zarr.json") in text and "bytes free" in text
    assert (out / "zarr.json").read_bytes() == before


def _worker_wrapped(message: str) -> list[BaseException]:
    """A StoreError as torch's DataLoader and DALI's parallel external source hand it back."""
    torch_style = StoreError(f"Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             f"call last):\n  File \"x.py\", line 1, in f\nstacktrain.errors.StoreDamaged: {message}\n")
    try:
        try:
            raise StoreError(message)
        except StoreError as original:
            raise Exception("\n\nException traceback received from worker thread:\n\n...") from original
    except Exception as dali_style:
        return [torch_style, dali_style]


@pytest.mark.parametrize("which", [0, 1], ids=["torch-dataloader", "dali-parallel-source"])
def test_a_loader_workers_error_reaches_the_user_as_its_one_line(which, capsys, monkeypatch):
    line = "stack 's0': /x/c/0/0/0/0: chunk (0, 0, 0, 0): does not decode (LZ4 decompression error: -23017)"
    error = _worker_wrapped(line)[which]
    assert user_message(error) == line
    assert user_message(ValueError("a bug")) is None

    def fail(args):
        raise error
    monkeypatch.setattr("stacktrain.commands.info", fail)
    assert main(["info", "x.zarr"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {line}"
