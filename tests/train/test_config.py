"""The training config: seed defaults, presets, overrides, errors listing valid keys, save/load round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest

from stacktrain.errors import StackTrainError
from stacktrain.train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    require_data,
    resolve_precision,
    resolve_run_dir,
    save_config,
)

PRESETS = Path(__file__).resolve().parents[2] / "train" / "presets"


def test_defaults_are_the_seed_values():
    cfg = TrainConfig()
    assert cfg.model.name == "resnet3d50" and cfg.patch.size == (32, 256, 256)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.pos_weight) == (1e-3, 1e-4, None)
    assert (cfg.train.epochs, cfg.train.patience, cfg.train.min_delta) == (100, 20, 1e-5)
    assert cfg.loader.batch_size == 64 and cfg.train.select_level == "stack" and cfg.train.aggregate == "mean"
    loaded = load_config(None)  # the same, its default out_dir made absolute (paths are, once loaded)
    assert loaded == dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=os.path.abspath("runs")))


def test_presets_load_and_say_what_they_promise():
    seed = load_config(PRESETS / "seed-gpu.toml")
    assert (seed.model.name, seed.model.tiny, seed.patch.size) == ("resnet3d50", False, (32, 256, 256))
    assert (seed.loader.loader, seed.loader.batch_size, seed.train.epochs) == ("dali", 64, 100)
    assert seed.train.precision == "bf16" and seed.loader.dtype == "bf16"
    demo = load_config(PRESETS / "demo.toml")
    assert demo.model.tiny and demo.loader.loader == "dali-cpu" and demo.train.precision == "fp32"
    assert demo.train.device == "cpu" and max(demo.patch.size) <= 32 and demo.train.epochs <= 20


def test_overrides_parse_toml_literals_and_fall_back_to_strings():
    cfg = load_config(PRESETS / "demo.toml", [
        "train.epochs=5", "optim.lr=3e-4", "patch.size=[8, 16, 16]", "model.name=resnet3d50",
        "model.options.stem_stride=2", "optim.pos_weight=2", "train.run_name=2024", "data.store=/x/s.zarr",
        "--train.compile=true"])
    assert cfg.train.epochs == 5 and cfg.optim.lr == 3e-4 and cfg.patch.size == (8, 16, 16)
    assert cfg.model.name == "resnet3d50" and cfg.model.options == {"stem_stride": 2}
    assert cfg.optim.pos_weight == 2.0 and isinstance(cfg.optim.pos_weight, float)
    assert cfg.train.run_name == "2024" and cfg.data.store == "/x/s.zarr" and cfg.train.compile is True
    assert load_config(None, ["optim.pos_weight=2", "optim.pos_weight=none"]).optim.pos_weight is None


@pytest.mark.parametrize("override, must_name", [
    ("train.epoch=5", ["train.epoch", "epochs", "patience"]),     # typo: valid keys listed
    ("trainer.epochs=5", ["trainer", "data", "optim"]),             # unknown section
    ("train.epochs=many", ["train.epochs", "integer"]),             # wrong type
    ("patch.size=[16, 32]", ["patch.size", "3"]),
    ("train.compile=1", ["train.compile", "true/false"]),
    ("train.precision=fp8", ["train.precision", "bf16"]),           # bad choice
    ("model.name=resnet9000", ["resnet9000", "resnet3d50", "densenet121-3d"]),
    ("model.options.depth=3", ["depth", "valid options: stem_stride"]),
    ("patch.edge=wrap", ["patch.edge", "fit"]),                     # pipelines' own check, wrapped
    ("train.epochs", ["section.key=value"]),                        # no '='
    ("optim.lr.x=1", ["optim.lr", "not a table"]),
])
def test_bad_overrides_are_config_errors_that_name_the_key(override, must_name):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for text in must_name:
        assert text in str(e.value)
    assert isinstance(e.value, StackTrainError)  # the CLI prints it as one line, exit 2


def test_bad_file_keys_and_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key\(s\) train.learning_rate; valid keys"):
        load_config(bad)
    bad.write_text("[optimizer]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="unknown section.*optimizer.*valid sections: data, patch"):
        load_config(bad)
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_save_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(PRESETS / "seed-gpu.toml", ["patch.stride=[16, 128, 128]", "preprocess.mean=[1, 2, 3]",
                                                 "model.options.stem_stride=[1, 2, 2]", "data.store=s.zarr"])
    path = tmp_path / "config.toml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert tomllib.loads(path.read_text())["patch"]["stride"] == [16, 128, 128]
    assert "pos_weight" not in tomllib.loads(path.read_text())["optim"]  # None: left out (TOML has no null)
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temp file left behind
    as_dict = config_to_dict(cfg)
    assert json.loads(json.dumps(as_dict)) == as_dict and config_from_dict(as_dict) == cfg


def test_trainer_helpers():
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp16"
    assert resolve_precision("auto", "cpu", True) == "fp32"
    assert resolve_precision("fp16", "cpu", False) == "fp16"
    with pytest.raises(ConfigError, match=r"data.store is not set.*--set data.store=PATH"):
        require_data(TrainConfig())
    import datetime
    cfg = load_config(None, ["train.out_dir=/r"])
    stamp = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert resolve_run_dir(cfg, stamp) == Path("/r/resnet3d50-20250102-030405")
    assert resolve_run_dir(load_config(None, ["train.run_name=a"])).name == "a"
