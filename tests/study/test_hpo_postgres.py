"""Phase 3 on a real PostgreSQL server shared by two processes, as two machines would share it.

Two `run_study` processes start at once on a fresh database (the schema race), run a 10-trial search
into one study directory (a shared filesystem), and each trial is trained once with distinct
parameters; the report lists every trial from the storage; the password reaches no file; a database
that is down is one line, exit 2.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import optuna
import pytest

from stacktrain.train.study.report import report
from stacktrain.train.study.storage import resolve_url
from tests.postgres import PASSWORD, create_database, postgres_server
from tests.support import FAKE, ROOT, log_lines, write_study

TRIALS = 10
SEARCH = f"""
[hpo]
trials = {TRIALS}
folds = [0]
seed = 0
pruner = {{ kind = "none" }}
[hpo.space]
"optim.lr" = {{ type = "float", low = 1e-4, high = 1e-3, log = true }}
"optim.weight_decay" = {{ type = "float", low = 1e-6, high = 1e-3, log = true }}
"""


@pytest.fixture(scope="module")
def server():
    with postgres_server() as url:
        yield url


def _start(study, out, url, log, tmp_path, name):
    code = ("from stacktrain.train.study.runner import run_study; "
            f"run_study({str(study)!r}, {str(out)!r}, trainer={FAKE!r}, storage={url!r})")
    env = {**os.environ, "FAKE_LOG": str(log)}
    env.pop("STACKTRAIN_STORAGE", None)
    out_file = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out_file,
                            stderr=subprocess.STDOUT), out_file


def test_two_processes_share_one_search(server, tmp_path, fake_data):
    url = create_database(server, "search")
    store, split = fake_data
    study = write_study(tmp_path / "shared.toml", store, split, SEARCH, sets=("train.epochs=2",))
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    procs = [_start(study, out, url, log, tmp_path, f"machine{i}") for i in range(2)]  # at once, fresh database
    for i, (proc, out_file) in enumerate(procs):
        proc.wait(timeout=600)
        out_file.close()
        assert proc.returncode == 0, (tmp_path / f"machine{i}.log").read_text()[-3000:]

    trials = optuna.load_study(study_name="shared", storage=resolve_url(url, out)).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == TRIALS
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == TRIALS  # no duplicated trial
    assert sum(bool(t.user_attrs.get("base")) for t in done) == 1
    trained = collections.Counter(c["run"] for c in log_lines(log))
    assert len(trained) == TRIALS and set(trained.values()) == {1}  # each trial's run trained once

    for path in out.rglob("*"):  # the password is in no file the project wrote
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    manifest = json.loads((out / "study.json").read_text())
    assert "***" in manifest["hpo"]["storage"]

    # another machine's report, given the URL by the variable: every trial, the base one as baseline
    cli = subprocess.run([sys.executable, "-m", "stacktrain", "report", str(out), "--no-plots", "--resamples", "50"],
                         cwd=tmp_path, env={**os.environ, "STACKTRAIN_STORAGE": url}, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    labels = {line.split(",")[0] for line in (out / "report.csv").read_text().splitlines()[1:]}
    base = next(t for t in done if t.user_attrs.get("base"))
    assert len(labels) == TRIALS and f"trial-{base.number}" in labels

    # a machine whose study directory lacks some trials' folders says which
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    gone = sorted(p.name for p in (partial / "trials").iterdir())[-3:]
    for name in gone:
        shutil.rmtree(partial / "trials" / name)
    result = report(partial, storage=url, plots=False, n_resamples=50)
    assert any("3 trial(s) finished in the storage but have no finished runs" in n for n in result["notes"])
    notes = " ".join(result["notes"])
    assert all(f"trial-{int(name.split('-')[1])}" in notes for name in gone)


@pytest.mark.slow  # a search started for real (13 s): `make test-slow` (CI) runs it
def test_recorded_url_without_password_asks_for_it(server, tmp_path, fake_data):
    url = create_database(server, "asks")
    store, split = fake_data
    study = write_study(tmp_path / "asks.toml", store, split, SEARCH.replace(f"trials = {TRIALS}", "trials = 1"),
                        sets=("train.epochs=1",))
    from stacktrain.train.study.runner import run_study
    out = run_study(study, tmp_path / "out", trainer=FAKE, storage=url)
    env = {k: v for k, v in os.environ.items() if k != "STACKTRAIN_STORAGE"}
    cli = subprocess.run([sys.executable, "-m", "stacktrain", "report", str(out), "--no-plots"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and "--storage" in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [pytest.param("study", marks=pytest.mark.slow), "report"])  # study: 15 s
def test_a_database_that_is_down_is_one_line(tmp_path, fake_data, command):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/none"
    store, split = fake_data
    study = write_study(tmp_path / "down.toml", store, split, SEARCH, sets=("train.epochs=1",))
    args = ([str(study), "--out", str(tmp_path / "out")] if command == "study"
            else [str(_fake_study_dir(tmp_path))])
    cli = subprocess.run([sys.executable, "-m", "stacktrain", command, *args, "--storage", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 2 and len(lines) == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "Optuna storage postgresql+psycopg://postgres:***@127.0.0.1" in lines[0] and PASSWORD not in cli.stderr


def _fake_study_dir(tmp_path):
    """A study directory as a search writes it, with no run yet."""
    out = tmp_path / "searched"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({
        "format_version": 1, "name": "down", "kind": "hpo", "variants": [], "models": [], "baseline": None,
        "hpo": {"storage": "postgresql+psycopg://postgres:***@127.0.0.1:1/none", "study_name": "down",
                "folds": [0]}}))
    return out


def test_dead_machines_are_retried_through_the_current_api(tmp_path):
    import warnings

    from stacktrain.train.study.storage import open_storage
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):  # what a deprecated API (gone in Optuna 6) warns
            warnings.simplefilter("error", category)
        storage = open_storage(resolve_url("", tmp_path), heartbeat_s=5)
    callback = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert type(callback) is not optuna.storages.RetryFailedTrialCallback
    assert storage.get_heartbeat_interval() == 5
