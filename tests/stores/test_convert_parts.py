"""`convert --part I/N` / `--stacks-from FILE`: several processes convert one manifest into one store at once
and end with the store one process writes (issue 14)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from stacktrain.cli import main
from stacktrain.stores import convert_parts, writer
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.info import summarize
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.stores.synth import synth
from stacktrain.stores.verify import verify_store
from stacktrain.testing import tissue

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--min-patch", "8", "16", "16", "--chunk", "8", "16", "16", "--shard", "16", "48", "48", "--workers", "1",
         "--no-progress"]
OPTIONS = ConvertOptions(min_patch_zyx=(8, 16, 16), chunk_zyx=(8, 16, 16), shard_zyx=(16, 48, 48), workers=1)
DEADLINE_S = 180.0  # for a subprocess to reach a state or end (a loaded 2-core machine)


def _manifest(folder: Path, shapes: list[tuple[int, int, int, int]]) -> Path:
    """One .npy stack per shape (distinct content) and their manifest, ids b0, b1, ..."""
    rows = []
    for i, shape in enumerate(shapes):
        tile = tissue((3, 16, 48, 48), seed=i)
        np.save(folder / f"b{i}.npy", np.tile(tile, (1, shape[1] // 16, shape[2] // 48, shape[3] // 48)))
        rows.append((f"b{i}.npy", f"b{i}", ("SAIN", "MALADE")[i % 2], f"p{i // 2}"))
    path = folder / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return path


def _cmd(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stacktrain.cli", "convert", str(manifest), "--out", str(out), *FLAGS, *extra]


def _tree(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _same_stores(a: Path, b: Path) -> None:
    """Byte for byte (every zarr.json: root attributes and stack metadata; every shard), as zarr-python reads
    them, and as `info` and `verify --deep` report them (the store's own path aside)."""
    assert _tree(a) == _tree(b)
    for sid in Store(b).stack_ids:
        np.testing.assert_array_equal(zarr.open_array(a / sid / "image" / "0", mode="r")[:],
                                      zarr.open_array(b / sid / "image" / "0", mode="r")[:])
    assert {**summarize(a), "store": None} == {**summarize(b), "store": None}
    checks = verify_store(a, deep=True)
    assert len(checks) == len(Store(b).stack_ids) and not any(c.problems for c in checks)


def _summary(text: str) -> str:
    return " ".join(text.split())


# -- the split -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 7, 13], ids=lambda n: f"{n}-rows")
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5], ids=lambda n: f"{n}-parts")
def test_every_row_is_in_exactly_one_part_and_parts_differ_by_at_most_one(rows, count):
    manifest = [f"r{i}" for i in range(rows)]
    parts = [convert_parts.split(manifest, i, count) for i in range(1, count + 1)]
    assert sorted(r for p in parts for r in p) == sorted(manifest)  # each row once
    assert all(p == sorted(p, key=manifest.index) for p in parts)  # manifest order within a part
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/3", (2, 3)), (" 3 / 3 ", (3, 3)), ("10/12", (10, 12))],
                         ids=["one-of-one", "two-of-three", "spaces", "two-digits"])
def test_part_values_parse(text, expected):
    assert convert_parts.parse_part(text) == expected


@pytest.fixture
def small(tmp_path) -> Path:
    return _manifest(tmp_path, [(3, 16, 48, 48)] * 3)


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "3", "1/0", "-1/3", "1/3/3"],
                         ids=["zero", "past-the-end", "word", "no-slash", "zero-parts", "negative", "two-slashes"])
def test_a_bad_part_is_one_line_exit_2_and_nothing_written(small, tmp_path, capsys, value):
    out = tmp_path / "s.zarr"
    assert main(["convert", str(small), "--out", str(out), *FLAGS, f"--part={value}"]) == 2  # = : "-1/3" too
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--part {value}" in err and "I/N" in err
    assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.parametrize("content, why", [
    ("b0\n\nb2  # the last one\n", None),
    ("", "lists no stack_id"),
    ("# only a comment\n", "lists no stack_id"),
], ids=["ids-blank-lines-and-comments", "empty", "comments-only"])
def test_stacks_from_takes_the_named_stacks_in_manifest_order(small, tmp_path, capsys, content, why):
    ids = tmp_path / "ids.txt"
    ids.write_text(content)
    out = tmp_path / "s.zarr"
    code = main(["convert", str(small), "--out", str(out), *FLAGS, "--stacks-from", str(ids)])
    captured = capsys.readouterr()
    if why is None:
        assert code == 0 and Store(out).stack_ids == ["b0", "b2"]
        assert f"stacks from {ids}, 2 of 3 stacks: 2 converted" in _summary(captured.out)
    else:
        assert code == 2 and why in captured.err and str(ids) in _summary(captured.err) and not out.exists()


def test_part_and_stacks_from_together_are_refused(small, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("b0\n")
    out = tmp_path / "s.zarr"
    assert main(["convert", str(small), "--out", str(out), *FLAGS, "--part", "1/2", "--stacks-from", str(ids)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--part and --stacks-from" in err and not out.exists()


def test_an_unknown_id_in_stacks_from_names_the_file_line_and_id(small, tmp_path):
    """The command line itself, in a subprocess: one line on stderr, exit 2, no traceback, nothing written."""
    ids = tmp_path / "ids.txt"
    ids.write_text("b1\nb9\n")
    out = tmp_path / "s.zarr"
    proc = subprocess.run(_cmd(small, out, "--stacks-from", str(ids)), cwd=REPO, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    err = _summary(proc.stderr)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"--stacks-from {ids}: line 2: stack_id 'b9' is not in {small}" in err
    assert not out.exists() and not staging_dir(out).exists()


# -- the root index ------------------------------------------------------------------------------------
def test_stacks_registered_at_the_same_moment_are_never_lost(tmp_path):
    """Four threads (each its own lock descriptor, as separate processes have) merge their stacks into the
    root list 15 times each; after every merge a thread's own stacks are all listed, and the end result is
    the canonical order: the other manifest's stack first, then this manifest's in its order."""
    manifest = _manifest(tmp_path, [(3, 16, 48, 48)] * 8)
    out = convert(manifest, tmp_path / "s.zarr", OPTIONS).store
    metas = {sid: writer.existing_meta(out, sid) for sid in Store(out).stack_ids}
    order = list(metas)
    writer.register(out, [metas["b3"]])  # b3 stands for a stack of another manifest, listed already
    mine = [s for s in order if s != "b3"]
    lost: list[str] = []

    def part(index: int) -> None:
        index_list = convert_parts.RootIndex(out, mine)
        for _ in range(15):
            for sid in mine[index::4]:
                index_list.add(metas[sid])
                listed = convert_parts.listed(out)
                lost.extend(s for s in index_list.ours if s not in listed)

    threads = [threading.Thread(target=part, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not lost and not any(t.is_alive() for t in threads)
    assert convert_parts.listed(out) == ["b3", *mine]
    assert [p.name for p in staging_dir(out).iterdir()] == ["convert.lock"]  # the root lock file is unlinked


def test_stack_locks_taken_and_released_at_once_by_many_writers(tmp_path):
    """Releasing the last stack lock removes the locks folder; another writer making it at that moment
    must take its lock all the same (it once failed with FileExistsError, 3 times in 4x300 rounds)."""
    from stacktrain.stores import convert_lock
    store = tmp_path / "s.zarr"
    staging_dir(store).mkdir(parents=True)
    errors = []

    def writer_of(k):
        try:
            for _ in range(300):
                with convert_lock.stack_lock(store, f"s{k}"):
                    pass
        except Exception as e:  # noqa: BLE001 (collected, asserted below)
            errors.append(repr(e))
    threads = [threading.Thread(target=writer_of, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not (staging_dir(store) / "locks").exists()


def test_merged_order_does_not_depend_on_which_part_finished_first():
    manifest = ["a", "b", "c", "d"]
    assert convert_parts.merged_order(["x", "d", "b"], manifest, {"a"}) == ["x", "a", "b", "d"]
    assert convert_parts.merged_order(["a", "x", "b"], manifest, {"d"}) == ["x", "a", "b", "d"]
    assert convert_parts.merged_order([], manifest, {"c", "a"}) == ["a", "c"]


# -- many processes --------------------------------------------------------------------------------
def test_three_parts_at_once_equal_one_process(tmp_path):
    """THE case of the issue: `convert --part i/3` in three processes started together into one store, 7
    stacks in every format synth writes, uint16 sources windowed to uint8 over percentiles of the whole
    manifest (every part must reach the same window). The store equals one process's byte for byte: no
    field is excluded, as neither the root nor a stack's metadata holds a time or a host."""
    manifest = synth(tmp_path / "raw", stacks=7, shape_zyx=(16, 48, 48), dtype="uint16", progress=False)
    window = ["--dtype", "uint8", "--window", "p1", "p99"]
    out = tmp_path / "parts.zarr"
    procs = [subprocess.Popen(_cmd(manifest, out, *window, "--part", f"{i}/3"), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2, 3)]
    results = [p.communicate(timeout=DEADLINE_S) for p in procs]
    for i, (proc, (stdout, stderr)) in enumerate(zip(procs, results), 1):
        assert proc.returncode == 0, stderr
        took = 3 if i == 1 else 2
        assert f"part {i}/3, {took} of 7 stacks: {took} converted, 0 skipped (unchanged), 0 failed" in _summary(stdout)
    one = tmp_path / "one.zarr"
    assert main(["convert", str(manifest), "--out", str(one), *FLAGS, *window]) == 0
    _same_stores(out, one)
    assert len(Store(out).stack_ids) == 7
    assert [p.name for p in staging_dir(out).iterdir()] == ["convert.lock"]  # no stack or root lock left


def _staged_shard(out: Path, sid: str) -> bool:
    return any(f.is_file() for d in staging_dir(out).glob(f"{sid}.*") for f in d.glob("image/0/c/*/*/*/*"))


def test_a_part_killed_mid_stack_is_rerun_and_the_other_parts_are_undisturbed(tmp_path):
    """Part 2 of 3 is SIGKILLed while it writes its first (large) stack; parts 1 and 3 finish meanwhile.
    Rerunning part 2 completes the store, which then equals one process's; the other parts' stacks are
    not rewritten, and what the killed process left (its staging folder, its stack lock) is gone."""
    shapes = [(3, 16, 48, 48)] * 6
    shapes[1] = (3, 32, 384, 384)  # part 2's first stack: long enough to be caught mid-write
    manifest = _manifest(tmp_path, shapes)
    out = tmp_path / "parts.zarr"
    procs = {i: subprocess.Popen(_cmd(manifest, out, "--part", f"{i}/3"), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in (1, 2, 3)}
    deadline = time.monotonic() + DEADLINE_S
    while not _staged_shard(out, "b1"):
        assert procs[2].poll() is None, f"part 2 ended before it was killed: {procs[2].communicate()}"
        assert time.monotonic() < deadline, "part 2 never began writing b1"
        time.sleep(0.002)  # polling the files (the condition), not waiting for time to pass
    os.kill(procs[2].pid, signal.SIGKILL)
    procs[2].communicate()
    assert any(staging_dir(out).glob("b1.*")) and not (out / "b1").exists()  # killed mid-stack
    for i in (1, 3):
        stdout, stderr = procs[i].communicate(timeout=DEADLINE_S)
        assert procs[i].returncode == 0, stderr
        assert f"part {i}/3, 2 of 6 stacks: 2 converted" in _summary(stdout)
    assert Store(out).stack_ids == ["b0", "b2", "b3", "b5"]
    inodes = {sid: (out / sid / "zarr.json").stat().st_ino for sid in Store(out).stack_ids}

    rerun = subprocess.run(_cmd(manifest, out, "--part", "2/3"), cwd=REPO, capture_output=True, text=True,
                           timeout=DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr
    assert "part 2/3, 2 of 6 stacks: 2 converted, 0 skipped (unchanged), 0 failed" in _summary(rerun.stdout)
    assert {sid: (out / sid / "zarr.json").stat().st_ino for sid in inodes} == inodes
    assert [p.name for p in staging_dir(out).iterdir()] == ["convert.lock"]  # no stack or root lock left
    one = convert(manifest, tmp_path / "one.zarr", OPTIONS).store
    _same_stores(out, one)
    assert json.loads((out / "zarr.json").read_text()) == json.loads((one / "zarr.json").read_text())


@pytest.mark.slow
def test_parts_with_workers_and_a_killed_parts_orphans_still_writing_equal_one_process(tmp_path):
    """Larger: three parts with 2 workers each; part 2's main pid is SIGKILLed while its workers write and
    made to outlive it (STACKTRAIN_TEST_ORPHANS=1), and rerun at once: the rerun waits for the stacks the
    orphans hold (their locks), then finds them complete; the store equals one process's."""
    manifest = _manifest(tmp_path, [(3, 64, 384, 384)] * 6)
    out = tmp_path / "parts.zarr"
    workers = [*FLAGS[:-3], "--workers", "2", "--no-progress"]

    def start(i: int, orphans: bool = False) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "stacktrain.cli", "convert", str(manifest), "--out", str(out), *workers,
               "--part", f"{i}/3"]
        pipe = subprocess.DEVNULL if orphans else subprocess.PIPE  # orphans would hold a pipe open: no EOF
        return subprocess.Popen(cmd, cwd=REPO, stdout=pipe, stderr=pipe, text=True, start_new_session=True,
                                env={**os.environ, "STACKTRAIN_TEST_ORPHANS": "1" if orphans else "0"})

    procs = {i: start(i, orphans=i == 2) for i in (1, 2, 3)}
    try:
        deadline = time.monotonic() + 600
        while not _staged_shard(out, "b1"):
            assert procs[2].poll() is None and time.monotonic() < deadline, "part 2 never began writing b1"
            time.sleep(0.002)  # polling the files (the condition), not waiting for time to pass
        os.kill(procs[2].pid, signal.SIGKILL)
        procs[2].wait()
        rerun = procs["rerun"] = start(2)
        stdout, stderr = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, stderr
        assert "part 2/3, 2 of 6 stacks:" in _summary(stdout) and "0 failed of 2 stacks" in _summary(stdout)
        for i in (1, 3):
            stdout, stderr = procs[i].communicate(timeout=600)
            assert procs[i].returncode == 0, stderr
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # orphans idle on their task queue write nothing
    one = convert(manifest, tmp_path / "one.zarr", OPTIONS).store
    _same_stores(out, one)
