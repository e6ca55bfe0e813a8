"""The one training config: frozen keyword-only dataclasses, loaded from TOML plus `section.key=value`.

```
[data]        store, split file, fold, part names
[patch]       pipelines.config.PatchConfig
[preprocess]  pipelines.config.PreprocessConfig
[loader]      pipelines.config.LoaderConfig
[model]       registry name, tiny flavor, builder options
[optim]       Adam learning rate, weight decay, BCE pos_weight
[train]       epochs, early stopping, selection, aggregation, precision, seeds, output
```

TOML has no null: a field whose default is None is simply left out (or set to the string "none" in
an override). Paths (PATH_KEYS) are relative to the file that names them. Every field's docstring is
what the README's config table shows.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import typing
from pathlib import Path
from typing import Any

import tomli_w

from stacktrain.choices import Aggregate, Device, Level, Precision, ThresholdRule
from stacktrain.config import (
    all_problems,
    anchor_paths,
    build,
    check_choices,
    is_text,
    parse_value,
    paths_base,
    relative_paths,
    require,
    resolve_file,
    to_dict,
)
from stacktrain.errors import ConfigError
from stacktrain.io import atomic_write_text, read_toml
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    store: str = ""
    """Path of the stacktrain store (STORE.zarr); required to train."""
    split: str = ""
    """Path of the split file written by `stacktrain split`; required to train."""
    fold: int = 0
    """Which fold of the split file to train on (0-based)."""
    train_part: str = "train"
    """Name of the split part whose stacks are trained on."""
    val_part: str = "val"
    """Name of the split part evaluated every epoch (early stopping and best checkpoint)."""

    def __post_init__(self):
        require(self.fold >= 0, "data.fold", self.fold, "folds are numbered from 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "resnet3d50"
    """Registered model name (train/models.py): resnet3d50, resnet3d18, densenet121-3d, efficientnet-b0-3d."""
    tiny: bool = False
    """Build the model's tiny flavor (a few channels and blocks: tests and the CPU demo)."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword options of the builder, e.g. {stem_stride = 2} for the ResNets."""

    def __post_init__(self):
        from stacktrain.train.models import check_model  # the registry is the one list of valid names
        check_model(self.name, self.options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay (L2, as in torch.optim.Adam)."""
    pos_weight: float | None = None
    """BCEWithLogitsLoss pos_weight for MALADE patches; None weighs both classes equally."""

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "it must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "it must be >= 0")
        require(self.pos_weight is None or self.pos_weight > 0, "optim.pos_weight", self.pos_weight,
                "it must be > 0 (or left out)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    epochs: int = 100
    """Maximum number of epochs."""
    patience: int = 20
    """Stop after this many epochs without an improvement of the selection score."""
    min_delta: float = 1e-5
    """An epoch improves when its F1 exceeds the best by more than this (F1 over n stacks moves in steps
    of about 1/n, so 1e-5 means any change); an equal F1 improves on a higher stack ROC-AUC, then a lower
    validation loss."""
    select_level: Level = "stack"
    """Level (stack or patch) of the validation F1 of MALADE that drives early stopping and best.pt; a
    one-class prediction scores 0. Patch level rewards calling every patch MALADE (see the README)."""
    aggregate: Aggregate = "mean"
    """Per-stack probability from its patches: mean, max or topk (mean of the `topk` highest)."""
    topk: int = 3
    """k of the topk aggregate (a stack with fewer patches uses all of them)."""
    threshold: ThresholdRule = "fixed"
    """fixed: a stack is MALADE when its probability is >= 0.5 (the seed's rule); tuned: >= the threshold
    that maximises the validation stack F1 of MALADE at each epoch (never one that calls every stack one
    class). The best epoch's threshold goes into best.pt, and `predict` and `study --final` apply it;
    selection and early stopping then rank epochs at their tuned threshold (optimistic on validation:
    the held-out test part is the honest figure)."""
    precision: Precision = "auto"
    """auto (bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU), bf16, fp16 or fp32."""
    device: Device = "auto"
    """auto (cuda when available), cpu or cuda."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    channels_last: bool = True
    """Use the channels_last_3d memory format for the model (GPU only)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms (GPU only)."""
    memory_check: bool = True
    """Refuse to start when the estimated training memory exceeds the GPU's (or, on the CPU, the host's
    available RAM), naming the batch that fits (train/preflight.py); false: start anyway (train --force)."""
    seed: int = 0
    """Seed of model initialisation and of python/numpy/torch RNGs."""
    log_interval: int = 50
    """Steps between log lines (the only host-device synchronisations of the training loop)."""
    out_dir: str = "runs"
    """Directory that holds the run directories."""
    run_name: str = ""
    """Run directory name under out_dir; empty means `<model.name>-<YYYYmmdd-HHMMSS>`."""

    def __post_init__(self):
        check_choices(self, "train")
        for key in ("epochs", "patience", "topk", "log_interval"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "it must be >= 1")
        require(self.min_delta >= 0, "train.min_delta", self.min_delta, "it must be >= 0")
        require(self.seed >= 0, "train.seed", self.seed, "it must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Which store, split and fold."""
    patch: PatchConfig = dataclasses.field(default_factory=PatchConfig)
    """Patch size and grid."""
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    """Normalisation and augmentation."""
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    """Loader kind, batch size, workers."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Architecture."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimiser and loss."""
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    """Training loop."""


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)  # section name -> its dataclass
# The paths a config names: relative to the file that names them (a packaged preset's and the command
# line's: to the current directory); absolute once loaded; written relative to the file written.
PATH_KEYS = ("data.store", "data.split", "train.out_dir")


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts (parsed TOML, a checkpoint's or results file's config)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                          f"valid sections: {', '.join(SECTIONS)}")
    with all_problems(where):  # every bad value of the file and the overrides, in one line
        cfg = build(TrainConfig, raw, where)
    return cfg


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` (or `model.options.key=value`) to the raw nested dict."""
    path, sep, text = override.removeprefix("--").partition("=")
    keys = path.strip().split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {override!r}: write it as section.key=value, e.g. train.epochs=5")
    section, key = keys[0], keys[1]
    if section not in SECTIONS:
        raise ConfigError(f"override {override!r}: unknown section {section!r}; "
                          f"valid sections: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"override {override!r}: unknown key {section}.{key}; valid keys of "
                          f"[{section}]: {', '.join(f.name for f in dataclasses.fields(SECTIONS[section]))}")
    value = parse_value(text.strip())
    if is_text(hints[key]) and not isinstance(value, str):
        value = text.strip()  # e.g. run_name=2024: a name, not a number
    table = raw.setdefault(section, {})
    if len(keys) > 2:  # model.options.key=value reaches into a dict field
        if typing.get_origin(hints[key]) is not dict:
            raise ConfigError(f"override {override!r}: {section}.{key} is not a table")
        table = table.setdefault(key, {})
        for k in keys[2:-1]:
            table = table.setdefault(k, {})
        key = keys[-1]
    table[key] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML config or a packaged preset's name (None: all defaults) and apply `section.key=value`
    overrides in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_file(path, "stacktrain.train", "config")
        raw = read_toml(path, "config file")
        anchor_paths(raw, PATH_KEYS, paths_base(path, "stacktrain.train"))
    where = str(path) if path is not None else "defaults"
    for override in overrides:
        apply_override(raw, override)
    if isinstance(raw.setdefault("train", {}), dict):  # (a bad [train] is config_from_dict's to report)
        raw["train"].setdefault("out_dir", LoopConfig.out_dir)  # the default, from here too
    return config_from_dict(anchor_paths(raw, PATH_KEYS, None), where)  # the overrides' from here


# -- writing ---------------------------------------------------------------------------------------
def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain dicts (tuples as lists, None kept): for JSON and checkpoints."""
    return to_dict(cfg)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def save_config(cfg: TrainConfig, path: str | Path, header: str = "") -> None:
    """Write the resolved config as TOML, atomically; `load_config(path)` gives `cfg` back. `header`:
    comment lines put first (a resumed run's record of config changes). Its paths are written relative
    to the file's folder, as `load_config` reads them."""
    raw = relative_paths(_drop_none(config_to_dict(cfg)), PATH_KEYS, Path(path).parent)
    atomic_write_text(path, header + tomli_w.dumps(raw))


# -- resolution helpers for the trainer ------------------------------------------------------------
def require_data(cfg: TrainConfig) -> None:
    """Refuse to train without a store and a split, saying how to give them."""
    for key in ("store", "split"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is not set: put it in the config's [data] table or add "
                              f"--set data.{key}=PATH")


def resolve_precision(precision: str, device_type: str, bf16_supported: bool) -> str:
    """auto -> bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device_type != "cuda":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def resolve_run_dir(cfg: TrainConfig, now: _dt.datetime | None = None) -> Path:
    """`<out_dir>/<run_name>`, or `<out_dir>/<model>-<timestamp>` when run_name is empty."""
    name = cfg.train.run_name or f"{cfg.model.name}-{(now or _dt.datetime.now()):%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name
