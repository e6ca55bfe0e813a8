"""Study files: a base training config plus the axes to vary, expanded into one config per run.

```toml
[study]
name = "phase1-preprocessing"       # names the study (Optuna study name, report title)
base = "../presets/seed-gpu.toml"   # base training config, relative to this file; or a previous
                                    # phase's study directory ("studies/phase1"): its selected run's config
split = "splits.json"               # K-fold split file (`stacktrain split --folds K`); every run uses it
folds = "all"                       # or a list of fold numbers
baseline = "scale"                  # the label that paired differences are taken against
set = ["train.epochs=50"]           # section.key=value overrides for every run
seeds = [0, 1, 2]                   # every run repeated per seed (train.seed and loader.seed)
heartbeat_s = 30                    # grid on many machines: claim heartbeat; silent 3 beats = taken over

[variants.scale]                    # a named preprocessing variant: tables of patch/preprocess/loader
preprocess = { normalize = "scale" }
[variants.resampled]
store = "resampled.zarr"            # a variant that needs another store names it
[models.resnet3d18]                 # models axis (or `models = ["resnet3d18", ...]`)
[hpo]                               # phase 3 only: see hpo.py and hpo_config.py
```

Relative store and split paths are taken from the folder of the file that names them: the study
file's, or the base config file's (a packaged preset's, such as the ones above, from the current
directory). A run is
one (variant, model, fold, seed); its label in the report is the axes that vary (variant, model, or
both). A `base` that is a study directory (relative to the study file or the current directory)
chains the phases: the base config is the recorded config of that study's selected run
(DIR/selection.json, written when it finished), and its chain is recorded in this study's study.json.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from stacktrain.config import anchor_paths, build, paths_base, require, resolve_file
from stacktrain.errors import StudyError
from stacktrain.train.config import PATH_KEYS, ConfigError, TrainConfig, apply_override, config_from_dict
from stacktrain.train.split import load_split
from stacktrain.train.study.hpo_config import HpoConfig
from stacktrain.train.study.selection import parent_base

VARIANT_SECTIONS = ("patch", "preprocess", "loader")
STUDY_PATH_KEYS = ("study.store", "study.split", "variants.*.store")
BASE_VARIANT = "base"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


# -- the file, typed -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyTable:
    """The `[study]` table."""
    name: str = ""
    """Names the study (Optuna study name, report title); empty: the file's name without .toml."""
    base: str = ""
    """Base training config, relative to the study file, or a packaged preset's name (demo, seed-gpu)."""
    split: str = ""
    """K-fold split file (`stacktrain split --folds K`) every run uses; empty: the base config's data.split."""
    store: str = ""
    """Store every run reads (a variant may name another); empty: the base config's data.store."""
    folds: Any = "all"
    """"all" or a list of fold numbers of the split (read as a tuple)."""
    baseline: str = ""
    """The label paired differences are taken against; empty: the first run's label."""
    set: tuple[str, ...] = ()
    """section.key=value overrides of the base config, for every run."""
    seeds: tuple[int, ...] = ()
    """Repeat every run once per seed (train.seed and loader.seed); empty: the base config's seed, once."""
    heartbeat_s: float = 30.0
    """Grid: a run's claim is touched this often; a claim silent for 3 beats is taken over (claims.py)."""

    def __post_init__(self):
        require(self.heartbeat_s > 0, "study.heartbeat_s", self.heartbeat_s, "give seconds > 0 (default 30)")
        folds = self.folds  # "all" or fold numbers: a union that `build` cannot check by annotation
        ok = folds == "all" or (isinstance(folds, (list, tuple)) and bool(folds)
                                and all(isinstance(f, int) and not isinstance(f, bool) for f in folds))
        require(ok, "study.folds", folds, 'give "all" or a list of fold numbers')
        if folds != "all":
            object.__setattr__(self, "folds", tuple(folds))
        require(bool(self.base), "study.base", self.base, "name a training config (relative to the study "
                'file) or a packaged preset, e.g. "demo"')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """A `[variants.NAME]` table: overrides of the base config (models and folds are separate axes)."""
    description: str = ""
    """Shown in the report next to the variant's name."""
    store: str = ""
    """Another store for this variant (e.g. resampled stacks); empty: the study's."""
    patch: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[patch] keys; the run config checks them."""
    preprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[preprocess] keys; the run config checks them."""
    loader: dict[str, Any] = dataclasses.field(default_factory=dict)
    """[loader] keys; the run config checks them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyFile:
    """A study file's tables; `load_study` resolves them (base config, split, folds) into a `Study`."""
    study: StudyTable | None = None
    """Names the base config and the split file; required."""
    variants: dict[str, Variant] | None = None
    """The variants axis; left out: one variant, the base config as it is."""
    models: Any = None
    """The models axis: a list of model names, or [models.LABEL] tables of [model] keys (the run config
    checks them); left out: the base config's model."""
    hpo: HpoConfig | None = None
    """Phase 3: an Optuna search over one variant and model instead of a grid."""

    def __post_init__(self):
        require(self.variants != {}, "variants", self.variants, "give at least one [variants.NAME] table")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run of a study."""
    label: str
    """What the report calls this run's group: the variant, the model, `variant/model`, or `trial-N`."""
    variant: str
    model: str
    fold: int
    run_dir: Path
    config: TrainConfig
    trial: int | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Study:
    """A parsed study file; `runs(out)` expands it."""
    path: Path
    name: str
    base_raw: dict[str, Any]
    """The base config as raw nested dicts, with the study's `set` overrides applied."""
    split_file: Path
    folds: tuple[int, ...]
    variants: dict[str, Variant]
    """Each variant's checked table: every `Variant` field, as plain values (study.json lists them)."""
    models: dict[str, dict[str, Any]]
    """Each model label's [model] table."""
    baseline: str
    hpo: HpoConfig | None
    """The `[hpo]` table, checked; None for a grid study."""
    seeds: tuple[int, ...] = ()
    """study.seeds: every run repeated per seed; empty: once, with the base config's seed."""
    heartbeat_s: float = 30.0
    """study.heartbeat_s: how often a grid run's claim is touched (claims.py)."""
    parent: dict[str, Any] | None = None
    """When `base` names a previous phase's study directory: {dir, name, selected, split_sha256, chain}."""

    def label(self, variant: str, model: str) -> str:
        if len(self.variants) > 1 and len(self.models) > 1:
            return f"{variant}/{model}"
        return model if len(self.models) > 1 else variant

    def raw_config(self, variant: str, model: str, fold: int, out: Path, run_name: str,
                   split_copy: Path, seed: int | None = None) -> dict[str, Any]:
        """The run's raw config: base, then the variant's tables, the model, fold, store and paths."""
        raw = copy.deepcopy(self.base_raw)
        spec = self.variants[variant]
        for section in VARIANT_SECTIONS:
            raw.setdefault(section, {}).update(copy.deepcopy(getattr(spec, section)))
        tiny = raw.get("model", {}).get("tiny", False)
        raw["model"] = {"tiny": tiny, **copy.deepcopy(self.models[model])}
        data = raw.setdefault("data", {})
        store = spec.store or data.get("store")
        data.update(store=str(Path(store).resolve()) if store else "", split=str(split_copy.resolve()), fold=fold)
        raw.setdefault("train", {}).update(out_dir=str(out.resolve()), run_name=run_name)
        if seed is not None:
            raw["train"]["seed"] = seed
            raw.setdefault("loader", {})["seed"] = seed
        return raw

    def runs(self, out: Path, split_copy: Path) -> list[RunSpec]:
        """Every (variant, model, fold, seed) run of a grid study, in a stable order (seeds innermost)."""
        specs = []
        for variant in self.variants:
            for model in self.models:
                for fold in self.folds:
                    for seed in self.seeds or (None,):
                        name = f"runs/{variant}--{model}--fold{fold}" + ("" if seed is None else f"--seed{seed}")
                        raw = self.raw_config(variant, model, fold, out, name, split_copy, seed)
                        cfg = build_config(raw, f"{self.path}: variant {variant!r}, model {model!r}")
                        specs.append(RunSpec(label=self.label(variant, model), variant=variant, model=model,
                                             fold=fold, run_dir=out / name, config=cfg, seed=seed))
        return specs


def build_config(raw: dict[str, Any], where: str) -> TrainConfig:
    try:
        return config_from_dict(raw, where)
    except ConfigError as e:
        raise StudyError(str(e)) from None


def _check_name(kind: str, name: str, where: str) -> str:
    if not _SAFE_NAME.match(name):
        raise StudyError(f"{where}: {kind} name {name!r} must be 1-64 letters, digits, '_', '-' or '.' "
                         "(it becomes a directory name)")
    return name


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML ({e})") from None


def _models(raw: Any, base_raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        base = {k: v for k, v in base_raw.get("model", {}).items() if k != "tiny"}
        name = base.get("name", "resnet3d50")
        return {name: {"name": name, **base}}
    if isinstance(raw, list) and all(isinstance(name, str) for name in raw):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict) or not raw or not all(isinstance(spec, dict) for spec in raw.values()):
        raise StudyError(f"{where}: models = {raw!r}: give a list of model names or [models.LABEL] tables "
                         "of [model] keys")
    return {_check_name("model", label, where): {"name": label, **{k: v for k, v in spec.items()
                                                                    if k != "description"}}
            for label, spec in raw.items()}


def _check_folds(key: str, folds: tuple[int, ...], n_folds: int, split_file: Path, where: str) -> None:
    if any(not 0 <= f < n_folds for f in folds) or len(set(folds)) != len(folds):
        raise StudyError(f"{where}: {key} = {list(folds)}: {split_file} has {n_folds} fold(s), numbered "
                         f"0..{n_folds - 1}, each listed once")


def _base_raw(path: Path, head: StudyTable, overrides: list[str],
              where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The base config's raw tables, with study.set, the command line's overrides and study.store; and
    the parent study when `base` is a previous phase's study directory."""
    parent = None
    study_dirs = [d for d in (path.parent / head.base, Path(head.base)) if (d / "study.json").is_file()]
    if study_dirs:
        base_raw, parent = parent_base(study_dirs[0], where)
    else:
        base_path = path.parent / head.base
        if not base_path.exists():  # a packaged preset's name (demo, seed-gpu)
            try:
                base_path = resolve_file(head.base, "stacktrain.train", "base training config (study.base)")
            except ConfigError as e:
                raise StudyError(f"{where}: study.base: {e}") from None
        base_raw = _read_toml(base_path, "base training config (study.base, relative to the study file)")
        anchor_paths(base_raw, PATH_KEYS, paths_base(base_path, "stacktrain.train"))
    try:  # study.set's paths are the study file's, the command line's the current directory's
        for override in head.set:
            apply_override(base_raw, override)
        anchor_paths(base_raw, PATH_KEYS, paths_base(path, "stacktrain.train.study"))
        for override in overrides:
            apply_override(base_raw, override)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None
    if head.store:
        base_raw.setdefault("data", {})["store"] = head.store
    return anchor_paths(base_raw, PATH_KEYS, None), parent


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Parse and check a study file; `overrides` (section.key=value) apply to every run."""
    path = resolve_file(path, "stacktrain.train.study", "study")
    where = str(path)
    raw = anchor_paths(_read_toml(path, "study file"), STUDY_PATH_KEYS, paths_base(path, "stacktrain.train.study"))
    try:  # every key and value, [hpo] included; the run configs are checked when the runs are expanded
        spec = build(StudyFile, raw, where)
    except ConfigError as e:
        raise StudyError(str(e)) from None
    head = spec.study
    if head is None:
        raise StudyError(f"{where}: no [study] table; it names the base config and the split file")
    name = _check_name("study", head.name or path.stem, where)
    base_raw, parent = _base_raw(path, head, overrides, where)
    split_file = Path(head.split or base_raw.get("data", {}).get("split") or "")
    if not str(split_file) or str(split_file) == ".":
        raise StudyError(f"{where}: no split file: set study.split (make one with `stacktrain split STORE "
                         "--folds K --out splits.json`)")
    n_folds = len(load_split(split_file).get("folds") or [])
    folds = tuple(range(n_folds)) if head.folds == "all" else head.folds
    _check_folds("study.folds", folds, n_folds, split_file, where)
    variants = {_check_name("variant", v, where): variant
                for v, variant in (spec.variants or {BASE_VARIANT: Variant()}).items()}
    models = _models(spec.models, base_raw, where)
    if spec.hpo is not None:
        _check_folds("hpo.folds", spec.hpo.folds, n_folds, split_file, where)
        if len(variants) != 1 or len(models) != 1:
            raise StudyError(f"{where}: an [hpo] study tunes one variant and one model (the ones phases 1 "
                             f"and 2 chose); it has variants {list(variants)} and models {list(models)}")
    study = Study(path=path, name=name, base_raw=base_raw, split_file=split_file, folds=folds,
                  variants=variants, models=models, baseline="", hpo=spec.hpo, seeds=tuple(head.seeds),
                  heartbeat_s=head.heartbeat_s, parent=parent)
    labels = [study.label(v, m) for v in variants for m in models]
    baseline = head.baseline or labels[0]
    if study.hpo is None and baseline not in labels:
        raise StudyError(f"{where}: study.baseline = {baseline!r}: not one of the study's labels: "
                         f"{', '.join(labels)}")
    return dataclasses.replace(study, baseline=baseline)
