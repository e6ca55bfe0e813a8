"""A full disk is one line naming the file and the space it needed, the previous file stays intact and no temp
file is left; after it, `--resume` finishes the run exactly as an uninterrupted one. The disk fills either
for real (a 64 KiB tmpfs, where this process may mount one) or by a file whose writes fail with ENOSPC
partway (always: it reaches every write of an epoch)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from stacktrain import io as st_io
from stacktrain.cli import main
from stacktrain.errors import DiskFullError
from stacktrain.train import checkpoint as ckpts
from stacktrain.train import loop, results_io
from stacktrain.train.models import build_model
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from stacktrain.train.study.runner import run_study
from tests.support import FAKE, VARIANTS, tiny_config, write_study

ROOM = 10  # bytes a write gets onto the disk before it is full


class FullFile:
    """A file on a disk that fills after ROOM bytes: the rest of a write fails with `code`."""

    def __init__(self, f, code: int):
        self.f, self.room, self.code = f, ROOM, code

    def write(self, data) -> int:
        data = bytes(data)
        n = min(len(data), self.room)
        self.f.write(data[:n])
        self.room -= n
        if n < len(data):
            raise OSError(self.code, os.strerror(self.code))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk(monkeypatch, name: str, nth: int, code: int = errno.ENOSPC) -> None:
    """Make the `nth` write of file `name` (atomic writes and results appends alike) hit a full disk."""
    seen = {"n": 0}
    real_fdopen, real_open = os.fdopen, open

    def hit(path) -> bool:
        base = Path(path).name
        if base == name or (base.startswith(f".{name}.") and base.endswith(".tmp")):
            seen["n"] += 1
            return seen["n"] == nth
        return False

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        return FullFile(f, code) if isinstance(fd, int) and hit(os.readlink(f"/proc/self/fd/{fd}")) else f

    def results_open(path, *args, **kw):
        f = real_open(path, *args, **kw)
        return FullFile(f, code) if hit(path) else f

    monkeypatch.setattr(st_io.os, "fdopen", fdopen)
    monkeypatch.setattr(results_io, "open", results_open, raising=False)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


# -- one atomic write ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_keeps_the_previous_file(code, tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    st_io.atomic_write_text(target, "previous")
    fill_disk(monkeypatch, target.name, 1, code)
    with pytest.raises(DiskFullError) as err:
        st_io.atomic_write_bytes(target, b"x" * 5000)
    message = str(err.value)
    assert str(target) in message and "5000 bytes" in message and "free on that filesystem" in message
    assert "\n" not in message and target.read_text() == "previous" and temps(tmp_path) == []


def test_a_real_full_filesystem(tmp_path, monkeypatch, finished_run):
    """A 64 KiB tmpfs where mounting works (root here and in CI); else the same through a failing file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    try:
        target = disk / ckpts.LAST
        st_io.atomic_write_text(target, "previous")
        if not mounted:
            fill_disk(monkeypatch, ckpts.LAST, 1)
        state = ckpts.load_checkpoint(finished_run / ckpts.LAST)
        model = build_model(state["model_name"], tiny=state["model_tiny"])
        with pytest.raises(DiskFullError, match=r"last\.pt: disk full writing it \(.* to write, .* free"):
            ckpts.save_checkpoint(target, model=model, optimizer=None, scaler=None, epoch=0, early_stopping=None,
                                  config={}, model_name=state["model_name"], model_tiny=state["model_tiny"])
        assert target.read_text() == "previous" and temps(disk) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


# -- every write of an epoch ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    return load_results(loop.train(tiny_config(*data), run_dir=tmp_path_factory.mktemp("clean") / "run"))


WRITES = {  # (file, which write of it fails) over a two-epoch run
    "config.toml": ("config.toml", 1),
    "results-first-write": (RESULTS_NAME, 1),
    "results-epoch-0": (RESULTS_NAME, 2),
    "results-epoch-1": (RESULTS_NAME, 3),
    "results-stop-reason": (RESULTS_NAME, 4),
    "last.pt-epoch-0": (ckpts.LAST, 1),
    "last.pt-epoch-1": (ckpts.LAST, 2),
    "best.pt-epoch-0": (ckpts.BEST, 1),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_full_disk_at_any_write_then_resume_equals_an_uninterrupted_run(write, data, clean, tmp_path,
                                                                           monkeypatch):
    name, nth = WRITES[write]
    run_dir = tmp_path / "run"
    fill_disk(monkeypatch, name, nth)
    with pytest.raises(DiskFullError) as err:
        loop.train(tiny_config(*data), run_dir=run_dir)
    monkeypatch.undo()
    assert name in str(err.value) and "\n" not in str(err.value)
    if run_dir.exists():
        assert temps(run_dir) == []
        if (run_dir / RESULTS_NAME).exists():
            assert load_results(run_dir / RESULTS_NAME)["stop_reason"] is None  # unfinished: a study resumes it
        if (run_dir / ckpts.LAST).exists():
            ckpts.load_checkpoint(run_dir / ckpts.LAST)  # the previous one, whole
    resumed = load_results(loop.train(tiny_config(*data), run_dir=run_dir, resume=True))
    assert strip_timing(resumed) == strip_timing(clean)
    assert ckpts.saved_epoch(run_dir / ckpts.BEST) == resumed["best_epoch"]


# -- other files: a split, a study ---------------------------------------------------------------------
def test_a_full_disk_writing_a_split_is_one_line(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "split.json"
    out.write_text("previous")
    fill_disk(monkeypatch, out.name, 1)
    assert main(["split", str(data[0]), "--val-fraction", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split.json: disk full" in err and out.read_text() == "previous"


@pytest.mark.parametrize("name", ["study.json", "split.json", "study_run.json", "selection.json"])
def test_a_full_disk_in_a_study_then_the_rerun_completes(name, fake_data, tmp_path, monkeypatch):
    study = write_study(tmp_path / "s.toml", *fake_data, VARIANTS, head="folds = [0]")
    fill_disk(monkeypatch, name, 1)
    with pytest.raises(DiskFullError, match=f"{name}: disk full"):
        run_study(study, tmp_path / "out", trainer=FAKE)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "out").rglob(".*.tmp")]
    run_study(study, tmp_path / "out", trainer=FAKE)
    assert (tmp_path / "out" / "selection.json").exists()
