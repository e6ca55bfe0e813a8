"""Paths in a file resolve against that file's folder (configs, study files, split files), from any
current directory; files the tools write hold paths relative to themselves and read back the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stacktrain.train.config import load_config, save_config
from stacktrain.train.split import load_split, make_splits, write_split
from stacktrain.train.study.config import load_study
from tests.support import make_store


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """project/data/{store.zarr, splits.json} and project/configs/, as a lab lays them out."""
    root = tmp_path_factory.mktemp("project")
    store, split = make_store(root / "data")
    (root / "configs").mkdir()
    return root, store, split


def _elsewhere(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # not the project: a cwd-relative reading would miss every file


def test_config_paths_are_the_config_files(project, tmp_path, monkeypatch):
    root, store, split = project
    conf = root / "configs" / "exp.toml"
    conf.write_text('[data]\nstore = "../data/store.zarr"\nsplit = "../data/splits.json"\n'
                    '[train]\nout_dir = "../runs"\n')
    _elsewhere(monkeypatch, tmp_path)
    cfg = load_config(conf)
    assert Path(cfg.data.store) == store.resolve() and Path(cfg.data.split) == split.resolve()
    assert Path(cfg.train.out_dir) == (root / "runs").resolve()


def test_command_line_paths_are_the_current_directorys(project, tmp_path, monkeypatch):
    root, store, _ = project
    conf = root / "configs" / "exp.toml"
    conf.write_text('[data]\nstore = "../data/store.zarr"\n')
    monkeypatch.chdir(root / "data")
    cfg = load_config(conf, ["data.split=splits.json"])
    assert Path(cfg.data.split) == (root / "data" / "splits.json").resolve()


def test_a_packaged_presets_paths_stay_the_current_directorys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert Path(cfg.data.store) == tmp_path.resolve() / "demo-out" / "store.zarr"


def test_a_saved_config_holds_relative_paths_and_reads_back_after_a_move(project, tmp_path, monkeypatch):
    root, store, split = project
    conf = root / "configs" / "exp.toml"
    conf.write_text('[data]\nstore = "../data/store.zarr"\nsplit = "../data/splits.json"\n')
    cfg = load_config(conf)
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.toml")
    text = (run / "config.toml").read_text()
    assert 'store = "../../data/store.zarr"' in text and str(root) not in text
    _elsewhere(monkeypatch, tmp_path)
    assert load_config(run / "config.toml").data == cfg.data
    moved = tmp_path / "moved"  # the whole project moves (another machine's mount): still right
    os.rename(root, moved)
    try:
        again = load_config(moved / "runs" / "r1" / "config.toml")
        assert Path(again.data.store) == (moved / "data" / "store.zarr").resolve()
    finally:
        os.rename(moved, root)


def test_a_split_files_store_is_relative_to_it(project, tmp_path, monkeypatch):
    root, store, _ = project
    out = root / "data" / "parts" / "split.json"
    out.parent.mkdir(exist_ok=True)
    write_split(make_splits(store, val_fraction=0.3, seed=0), out)
    assert json.loads(out.read_text())["store"] == "../store.zarr"
    _elsewhere(monkeypatch, tmp_path)
    assert Path(load_split(out)["store"]) == store.resolve()


def test_study_paths_are_the_study_files_and_the_base_files(project, tmp_path, monkeypatch):
    root, store, split = project
    (root / "configs" / "base.toml").write_text(
        '[data]\nsplit = "../data/splits.json"\n[model]\nname = "resnet3d18"\ntiny = true\n'
        '[train]\ndevice = "cpu"\nprecision = "fp32"\n[loader]\nloader = "torch"\ndtype = "fp32"\n')
    study_dir = root / "studies"
    study_dir.mkdir(exist_ok=True)
    (study_dir / "s.toml").write_text(
        '[study]\nbase = "../configs/base.toml"\nstore = "../data/store.zarr"\n'
        '[variants.a]\npreprocess = { normalize = "scale" }\n'
        '[variants.b]\nstore = "../data/store.zarr"\n')
    _elsewhere(monkeypatch, tmp_path)
    study = load_study(study_dir / "s.toml")
    assert Path(study.split_file) == split.resolve()  # from the base config, against its folder
    assert Path(study.base_raw["data"]["store"]) == store.resolve()
    assert Path(study.variants["b"].store) == store.resolve()
