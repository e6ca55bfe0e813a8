"""`stacktrain study`: a tiny real study end to end (killed, then resumed), and the grid runner's rules.

The fake trainer below (also used by test_report.py and test_hpo.py) writes schema-valid results in
milliseconds: its patch probabilities get better with a quality set by the config (normalisation and
learning rate), so studies have known winners. FAKE_LOG records every call; FAKE_KILL=SUBSTRING:EPOCH
makes the process SIGKILL itself at that epoch of the run whose directory contains SUBSTRING.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.results import RESULTS_NAME, load_results, strip_timing
from train.study import RUN_RECORD, run_study
from train.study_config import StudyError, load_study

ROOT = Path(__file__).resolve().parents[1]
NORM_QUALITY = {"scale": 0.6, "percentile": 0.9, "meanstd": 0.3}
PATCHES = 8


# -- the fake trainer ------------------------------------------------------------------------------
def _log_and_maybe_kill(run_dir: Path, resume: bool | None, epoch: int | None) -> None:
    if epoch is None and os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            parts = Path(run_dir).parts  # relative to the study directory: runs/... or trials/...
            start = max(i for i, p in enumerate(parts) if p in ("runs", "trials"))
            f.write(json.dumps({"run": "/".join(parts[start:]), "resume": resume}) + "\n")
    kill = os.environ.get("FAKE_KILL")
    if epoch is not None and kill:
        where, _, at = kill.rpartition(":")
        if where in str(run_dir) and epoch == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def quality(cfg) -> float:
    lr_factor = min(1.0, max(0.05, math.log10(cfg.optim.lr) + 4))  # 1e-3 -> 1, 1e-4 -> 0.05
    return NORM_QUALITY[cfg.preprocess.normalize] * lr_factor


def fake_train(cfg, *, run_dir, resume=False, on_epoch=None):
    from stores.reader import Store
    from train.config import config_to_dict
    from train.evaluator import Evaluator
    from train.results import epoch_entry, new_results, record_epoch, write_results
    from train.split import load_split, split_parts

    run_dir = Path(run_dir)
    _log_and_maybe_kill(run_dir, resume, None)
    path = run_dir / RESULTS_NAME
    results = load_results(path) if resume else new_results(config_to_dict(cfg), {"device": "fake"})
    store = Store(cfg.data.store)
    val = sorted(split_parts(load_split(cfg.data.split), cfg.data.fold)["val"])
    labels = np.array([store.meta(s).label_index for s in val])
    golden = (np.arange(len(val) * PATCHES) * 0.6180339887 + 0.05 * cfg.data.fold) % 1.0
    best, best_epoch = -1.0, results["best_epoch"]
    for e in results["epochs"]:
        best = max(best, e["volume_metrics" if cfg.train.select_level == "stack" else "patch_metrics"]["f1"]["MALADE"])
    for epoch in range(len(results["epochs"]), cfg.train.epochs):
        _log_and_maybe_kill(run_dir, None, epoch)
        q = quality(cfg) * (epoch + 1) / cfg.train.epochs
        y = np.repeat(labels, PATCHES)
        prob = np.clip(0.5 + (2 * y - 1) * (q - golden) * 0.9, 0.01, 0.99)
        ev = Evaluator(val)
        ev.add(np.repeat(np.arange(len(val)), PATCHES),
               np.array([[0, 0, 16 * j] for j in range(PATCHES)] * len(val)),
               np.log(prob / (1 - prob)), y)
        evaluation = ev.finalize()
        score = evaluation.score(cfg.train.select_level)
        if score > best + cfg.train.min_delta:
            best, best_epoch = score, epoch
        entry = epoch_entry(epoch=epoch, train_loss=1 - q, lr=cfg.optim.lr, evaluation=evaluation,
                            throughput={"train_patches_per_s": 100.0 + epoch, "data_wait_pct": 1.0}, wall_s=0.01)
        last = epoch + 1 == cfg.train.epochs
        record_epoch(results, entry, best_epoch=best_epoch, stop_reason="max_epochs" if last else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_results(path, results)
        (run_dir / "last.pt").write_bytes(b"fake")
        if on_epoch is not None and on_epoch(epoch, entry) and not last:
            results["stop_reason"] = "pruned"
            write_results(path, results)
            break
    return path


def real_train(cfg, *, run_dir, resume=False, on_epoch=None):
    """The real trainer, with FAKE_LOG and FAKE_KILL as above."""
    from train.loop import train
    _log_and_maybe_kill(run_dir, resume, None)

    def hook(epoch, entry):
        _log_and_maybe_kill(run_dir, None, epoch)
        return on_epoch(epoch, entry) if on_epoch else False
    return train(cfg, run_dir=run_dir, resume=resume, on_epoch=hook)


# -- fixtures --------------------------------------------------------------------------------------
def make_store(root: Path, n: int = 24, shape=(8, 16, 16), folds: int = 3) -> tuple[Path, Path]:
    """`n` tiny stacks (alternating SAIN/MALADE, two per patient) and a K-fold split of them."""
    from tests.conftest import tissue, write_array
    from train.split import make_splits, write_split
    store = root / "store.zarr"
    for i in range(n):
        write_array(store, f"s{i:02d}", tissue((3, *shape), seed=i), label="MALADE" if i % 2 else "SAIN",
                    group=f"p{i // 2}", chunk_zyx=shape, shard_zyx=shape)
    write_split(make_splits(store, folds=folds, seed=0), root / "splits.json")
    return store, root / "splits.json"


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("fake"))


def write_study(path: Path, store: Path, split: Path, body: str, *, sets=("train.epochs=3",), head="") -> Path:
    path.write_text(f'[study]\nname = "{path.stem}"\nbase = "{ROOT}/train/presets/demo.toml"\n'
                    f'split = "{split}"\nstore = "{store}"\nset = {json.dumps(list(sets))}\n{head}\n{body}')
    return path


VARIANTS = """
[variants.scale]
preprocess = { normalize = "scale" }
[variants.percentile]
preprocess = { normalize = "percentile", percentile_low = 1.0, percentile_high = 99.0 }
"""


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_killed(study: Path, out: Path, trainer: str, env: dict[str, str], tmp_path: Path) -> None:
    """Run the study in a subprocess that FAKE_KILL kills; then kill what it leaves behind (DALI's
    worker processes outlive a SIGKILLed parent), found by its own process group."""
    code = f"from train.study import run_study; run_study({str(study)!r}, {str(out)!r}, trainer={trainer!r})"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]


# -- the real thing --------------------------------------------------------------------------------
def test_tiny_real_study_killed_resumes_and_reports(tmp_path, monkeypatch):
    """2 variants x 2 folds, tiny model, 2 epochs: killed in its third run, resumed, then reported."""
    from train.report import report
    store, split = make_store(tmp_path, n=4, shape=(16, 64, 64), folds=2)
    study = write_study(tmp_path / "tiny.toml", store, split, VARIANTS,
                        sets=("train.epochs=2", "loader.batch_size=4", "train.log_interval=1"))
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    run_killed(study, out, "tests.test_study:real_train",
               {"FAKE_LOG": str(log), "FAKE_KILL": "percentile--resnet3d18--fold0:0"}, tmp_path)
    runs = [f"runs/{v}--resnet3d18--fold{f}" for v in ("scale", "percentile") for f in (0, 1)]
    assert [c["run"] for c in log_lines(log)] == runs[:3]
    before = {r: (out / r / RESULTS_NAME).read_bytes() for r in runs[:2]}
    killed = load_results(out / runs[2] / RESULTS_NAME)
    assert [e["epoch"] for e in killed["epochs"]] == [0] and killed["stop_reason"] is None

    log.unlink()
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, out, trainer="tests.test_study:real_train")
    assert log_lines(log) == [{"run": runs[2], "resume": True}, {"run": runs[3], "resume": False}]
    assert all((out / r / RESULTS_NAME).read_bytes() == before[r] for r in runs[:2])  # not redone
    resumed = load_results(out / runs[2] / RESULTS_NAME)
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1] and resumed["stop_reason"] == "max_epochs"
    assert strip_timing(resumed["epochs"][0]) == strip_timing(killed["epochs"][0])
    split_sha = json.loads(split.read_text())["sha256"]
    for r in runs:
        record = json.loads((out / r / RUN_RECORD).read_text())
        assert record["split_sha256"] == split_sha
        assert record["config"]["preprocess"] == load_results(out / r / RESULTS_NAME)["config"]["preprocess"]

    result = report(out, n_resamples=200)
    assert [(r.label, r.level) for r in result["rows"]] == [
        ("scale", "patch"), ("scale", "stack"), ("percentile", "patch"), ("percentile", "stack")]
    for row in result["rows"]:
        entries = []
        for fold in (0, 1):
            res = load_results(out / f"runs/{row.label}--resnet3d18--fold{fold}" / RESULTS_NAME)
            entries.append(next(e for e in res["epochs"] if e["epoch"] == res["best_epoch"]))
        key = "patch_metrics" if row.level == "patch" else "volume_metrics"
        f1 = [e[key]["f1"]["MALADE"] for e in entries]
        acc = [e[key]["accuracy"] for e in entries]
        assert row.mean["f1_malade"] == pytest.approx(np.mean(f1))
        assert row.std["f1_malade"] == pytest.approx(np.std(f1, ddof=1))
        assert row.mean["accuracy"] == pytest.approx(np.mean(acc))
        assert row.n_stacks == sum(len(e["volumes"]) for e in entries)
    assert {"report.md", "report.csv", "differences.csv", "stack_f1.png", "learning_curves.png"} <= {
        p.name for p in out.iterdir()}
    assert "Best:" in result["verdict"]


# -- the runner's rules, with the fake trainer ----------------------------------------------------
def test_parallel_workers_run_every_combination_once(tmp_path, fake_data, monkeypatch):
    store, split = fake_data
    study = write_study(tmp_path / "par.toml", store, split, VARIANTS + '[models.resnet3d18]\n[models.resnet3d50]\n',
                        head="folds = [0, 2]")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, tmp_path / "out", workers=2, trainer="tests.test_study:fake_train")
    expected = {f"runs/{v}--{m}--fold{f}" for v in ("scale", "percentile")
                for m in ("resnet3d18", "resnet3d50") for f in (0, 2)}
    assert sorted(c["run"] for c in log_lines(log)) == sorted(expected)
    record = json.loads((tmp_path / "out/runs/percentile--resnet3d50--fold2" / RUN_RECORD).read_text())
    assert record["label"] == "percentile/resnet3d50" and record["config"]["model"]["name"] == "resnet3d50"
    assert record["config"]["preprocess"]["normalize"] == "percentile" and record["config"]["data"]["fold"] == 2
    log.unlink()
    run_study(study, tmp_path / "out", workers=2, trainer="tests.test_study:fake_train")
    assert not log.exists()  # everything finished: nothing is trained again


def test_a_changed_config_or_split_is_refused(tmp_path, fake_data):
    store, split = fake_data
    study = write_study(tmp_path / "s.toml", store, split, VARIANTS, head="folds = [0]")
    run_study(study, tmp_path / "out", trainer="tests.test_study:fake_train")
    with pytest.raises(StudyError, match=r"train\.epochs: 3 -> 4.*new --out"):
        run_study(study, tmp_path / "out", overrides=["train.epochs=4"], trainer="tests.test_study:fake_train")
    other = json.loads(split.read_text())
    other["folds"] = other["folds"][::-1]
    from train.split import split_hash
    other["sha256"] = split_hash(other["folds"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    moved = write_study(tmp_path / "s2.toml", store, tmp_path / "other.json", VARIANTS, head="folds = [0]")
    with pytest.raises(StudyError, match="one split"):
        run_study(moved, tmp_path / "out", trainer="tests.test_study:fake_train")


@pytest.mark.parametrize("body, head, message", [
    ('[variants.a]\npreprocess = { normalise = "scale" }', "", r"unknown key\(s\) preprocess\.normalise"),
    ('[variants.a]\nmodel = { name = "resnet3d18" }', "", r"variants\.a: unknown key\(s\) model"),
    ('[variants."a b"]\n', "", "variant name 'a b'"),
    ("[models.nope]\n", "", "registered models"),
    (VARIANTS, 'baseline = "nope"', "study.baseline = 'nope'"),
    (VARIANTS, "folds = [0, 7]", r"has 3 fold\(s\)"),
    (VARIANTS, "colour = 1", r"unknown key\(s\) study\.colour"),
])
def test_bad_study_files_say_what_to_fix(tmp_path, fake_data, body, head, message):
    store, split = fake_data
    study = write_study(tmp_path / "bad.toml", store, split, body, head=head)
    with pytest.raises(StudyError, match=message):
        s = load_study(study)
        s.runs(tmp_path / "out", split)


def test_cli_parses_study_and_runs_it(tmp_path, fake_data, monkeypatch):
    import argparse
    from train import study as study_mod
    store, split = fake_data
    study = write_study(tmp_path / "cli.toml", store, split, VARIANTS, head="folds = [1]")
    parser = argparse.ArgumentParser()
    study_mod.register(parser.add_subparsers())
    args = parser.parse_args(["study", str(study), "--out", str(tmp_path / "o"), "--set", "train.epochs=2"])
    monkeypatch.setattr(study_mod, "run_study",
                        functools.partial(study_mod.run_study, trainer="tests.test_study:fake_train"))
    assert args.func(args) == 0
    res = load_results(tmp_path / "o/runs/scale--resnet3d18--fold1" / RESULTS_NAME)
    assert len(res["epochs"]) == 2


@pytest.mark.parametrize("name, runs", [("example-cpu", 6), ("phase1-preprocessing", 45),
                                        ("phase2-architectures", 25), ("phase3-hpo", 0)])
def test_committed_study_files_expand(tmp_path, fake_data, monkeypatch, name, runs):
    """The README's study files parse, and every run's config is valid (paths as the files give them)."""
    from train.hpo import base_params, load_space
    from train.split import load_split, write_split
    split = load_split(fake_data[1])  # 3 folds, as the example expects; 5 for the phase files
    for rel, folds in (("example-out/splits.json", split["folds"]),
                       ("data/splits-5fold.json", split["folds"] + split["folds"][:2])):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_split({"folds": folds}, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    study = load_study(ROOT / f"train/studies/{name}.toml")
    if study.hpo is None:
        specs = study.runs(tmp_path / "out", tmp_path / "split.json")
        assert len(specs) == runs and study.baseline in {s.label for s in specs}
    else:
        space = load_space(study)
        assert base_params(study, space) == {"optim.lr": 1e-3, "optim.weight_decay": 1e-4, "loader.batch_size": 64,
                                             "optim.pos_weight": 1.0, "train.aggregate": "mean"}


def test_workers_take_the_visible_gpus_in_turn(monkeypatch):
    import multiprocessing

    import torch
    from train.study import worker_setup
    threads = torch.get_num_threads()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    try:
        seen = []
        for _ in range(3):
            worker_setup(1, ["3", "5"], counter)
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    finally:
        torch.set_num_threads(threads)
    assert seen == ["3", "5", "3"] and counter.value == 3
