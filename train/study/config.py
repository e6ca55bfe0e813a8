"""Study files: a base training config plus the axes to vary, expanded into one config per run.

```toml
[study]
name = "phase1-preprocessing"       # names the study (Optuna study name, report title)
base = "../presets/seed-gpu.toml"   # base training config, relative to this file
split = "splits.json"               # K-fold split file (`stacktrain split --folds K`); every run uses it
folds = "all"                       # or a list of fold numbers
baseline = "scale"                  # the label that paired differences are taken against
set = ["train.epochs=50"]           # section.key=value overrides for every run

[variants.scale]                    # a named preprocessing variant: tables of patch/preprocess/loader
preprocess = { normalize = "scale" }
[variants.resampled]
store = "resampled.zarr"            # a variant that needs another store names it
[models.resnet3d18]                 # models axis (or `models = ["resnet3d18", ...]`)
[hpo]                               # phase 3 only: see train/hpo.py
```

Relative store and split paths are taken from the current directory (as in the presets). A run is
one (variant, model, fold); its label in the report is the axes that vary (variant, model, or both).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from stacktrain.config import resolve_file
from stacktrain.errors import StudyError
from stacktrain.train.config import ConfigError, TrainConfig, apply_override, config_from_dict
from stacktrain.train.split import load_split

STUDY_KEYS = ("name", "base", "split", "store", "folds", "baseline", "set")
VARIANT_SECTIONS = ("patch", "preprocess", "loader")
VARIANT_KEYS = ("description", "store", *VARIANT_SECTIONS)
BASE_VARIANT = "base"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")




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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Study:
    """A parsed study file; `runs(out)` expands it."""
    path: Path
    name: str
    base_raw: dict[str, Any]
    """The base config as raw nested dicts, with the study's `set` overrides applied."""
    split_file: Path
    folds: tuple[int, ...]
    variants: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    baseline: str
    hpo: dict[str, Any] | None

    def label(self, variant: str, model: str) -> str:
        if len(self.variants) > 1 and len(self.models) > 1:
            return f"{variant}/{model}"
        return model if len(self.models) > 1 else variant

    def raw_config(self, variant: str, model: str, fold: int, out: Path, run_name: str,
                   split_copy: Path) -> dict[str, Any]:
        """The run's raw config: base, then the variant's tables, the model, fold, store and paths."""
        raw = copy.deepcopy(self.base_raw)
        spec = self.variants[variant]
        for section in VARIANT_SECTIONS:
            raw.setdefault(section, {}).update(copy.deepcopy(spec.get(section, {})))
        tiny = raw.get("model", {}).get("tiny", False)
        raw["model"] = {"tiny": tiny, **copy.deepcopy(self.models[model])}
        data = raw.setdefault("data", {})
        store = spec.get("store") or data.get("store")
        data.update(store=str(Path(store).resolve()) if store else "", split=str(split_copy.resolve()), fold=fold)
        raw.setdefault("train", {}).update(out_dir=str(out.resolve()), run_name=run_name)
        return raw

    def runs(self, out: Path, split_copy: Path) -> list[RunSpec]:
        """Every (variant, model, fold) run of a grid study, in a stable order (folds innermost)."""
        specs = []
        for variant in self.variants:
            for model in self.models:
                for fold in self.folds:
                    name = f"runs/{variant}--{model}--fold{fold}"
                    raw = self.raw_config(variant, model, fold, out, name, split_copy)
                    cfg = build_config(raw, f"{self.path}: variant {variant!r}, model {model!r}")
                    specs.append(RunSpec(label=self.label(variant, model), variant=variant, model=model,
                                         fold=fold, run_dir=out / name, config=cfg))
        return specs


def build_config(raw: dict[str, Any], where: str) -> TrainConfig:
    try:
        return config_from_dict(raw, where)
    except ConfigError as e:
        raise StudyError(str(e)) from None


def _check_name(kind: str, name: str, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
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


def _variants(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {BASE_VARIANT: {}}
    if not isinstance(raw, dict) or not raw:
        raise StudyError(f"{where}: [variants] must hold at least one [variants.NAME] table")
    out = {}
    for name, spec in raw.items():
        _check_name("variant", name, where)
        if not isinstance(spec, dict):
            raise StudyError(f"{where}: variants.{name} must be a table")
        unknown = sorted(set(spec) - set(VARIANT_KEYS))
        if unknown:
            raise StudyError(f"{where}: variants.{name}: unknown key(s) {', '.join(unknown)}; a variant "
                             f"sets {', '.join(VARIANT_KEYS)} (models and folds are separate axes)")
        for section in VARIANT_SECTIONS:
            if section in spec and not isinstance(spec[section], dict):
                raise StudyError(f"{where}: variants.{name}.{section} must be a table of {section} keys")
        out[name] = spec
    return out


def _models(raw: Any, base_raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        base = {k: v for k, v in base_raw.get("model", {}).items() if k != "tiny"}
        name = base.get("name", "resnet3d50")
        return {name: {"name": name, **base}}
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise StudyError(f"{where}: `models` must be a list of model names or [models.LABEL] tables")
    out = {}
    for label, spec in raw.items():
        _check_name("model", label, where)
        if not isinstance(spec, dict):
            raise StudyError(f"{where}: models.{label} must be a table of [model] keys")
        out[label] = {"name": label, **{k: v for k, v in spec.items() if k != "description"}}
    return out


def _folds(value: Any, n_folds: int, split_file: Path, where: str) -> tuple[int, ...]:
    if value in (None, "all"):
        return tuple(range(n_folds))
    if not isinstance(value, list) or not value or not all(isinstance(f, int) for f in value):
        raise StudyError(f"{where}: study.folds = {value!r}; give \"all\" or a list of fold numbers")
    bad = [f for f in value if not 0 <= f < n_folds]
    if bad or len(set(value)) != len(value):
        raise StudyError(f"{where}: study.folds = {value}; {split_file} has {n_folds} fold(s), numbered "
                         f"0..{n_folds - 1}, each listed once")
    return tuple(value)


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Parse and check a study file; `overrides` (section.key=value) apply to every run."""
    path = resolve_file(path, "stacktrain.train.study", "study")
    raw = _read_toml(path, "study file")
    where = str(path)
    unknown = sorted(set(raw) - {"study", "variants", "models", "hpo"})
    if unknown:
        raise StudyError(f"{where}: unknown table(s) {', '.join(unknown)}; a study file has [study], "
                         "[variants.NAME], [models.NAME] and [hpo]")
    head = raw.get("study")
    if not isinstance(head, dict):
        raise StudyError(f"{where}: no [study] table; it names the base config and the split file")
    unknown = sorted(set(head) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{where}: unknown key(s) study.{', study.'.join(unknown)}; valid keys: "
                         f"{', '.join(STUDY_KEYS)}")
    name = _check_name("study", head.get("name", path.stem), where)
    if not head.get("base"):
        raise StudyError(f"{where}: study.base is not set; name a training config (relative to the study "
                         "file) or a packaged preset, e.g. \"demo\"")
    base_path = path.parent / head["base"]
    if not base_path.exists():  # a packaged preset's name (demo, seed-gpu)
        try:
            base_path = resolve_file(head["base"], "stacktrain.train", "base training config (study.base)")
        except ConfigError as e:
            raise StudyError(f"{where}: study.base: {e}") from None
    base_raw = _read_toml(base_path, "base training config (study.base, relative to the study file)")
    try:
        for override in [*head.get("set", []), *overrides]:
            apply_override(base_raw, override)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None
    if head.get("store"):
        base_raw.setdefault("data", {})["store"] = head["store"]
    split_file = Path(head.get("split") or base_raw.get("data", {}).get("split") or "")
    if not str(split_file) or str(split_file) == ".":
        raise StudyError(f"{where}: no split file: set study.split (make one with `stacktrain split STORE "
                         "--folds K --out splits.json`)")
    split = load_split(split_file)
    folds = _folds(head.get("folds"), len(split.get("folds") or []), split_file, where)
    variants = _variants(raw.get("variants"), where)
    models = _models(raw.get("models"), base_raw, where)
    study = Study(path=path, name=name, base_raw=base_raw, split_file=split_file, folds=folds,
                  variants=variants, models=models, baseline="", hpo=raw.get("hpo"))
    labels = [study.label(v, m) for v in variants for m in models]
    baseline = head.get("baseline", labels[0])
    if study.hpo is None and baseline not in labels:
        raise StudyError(f"{where}: study.baseline = {baseline!r} is not one of the study's labels: "
                         f"{', '.join(labels)}")
    return dataclasses.replace(study, baseline=baseline)
