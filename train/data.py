"""From a TrainConfig to the stacks and loaders of a run: store, split (leak-checked), parts, loaders.

    store, train_ids, val_ids = open_data(cfg)
    cfg = resolve_norm(cfg, store, train_ids)     # meanstd statistics frozen into the saved config
    train_loader = make_loader(cfg, store, train_ids, train=True, rt=rt)
"""

from __future__ import annotations

import dataclasses

from stacktrain.pipelines.loaders import PatchLoader, build_loader, channel_mean_std
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import require_intact
from stacktrain.train.config import ConfigError, TrainConfig, require_data
from stacktrain.train.runtime import Runtime
from stacktrain.train.split import SplitError, check_split, load_split, split_parts


def open_data(cfg: TrainConfig) -> tuple[Store, list[str], list[str]]:
    """The store and the train / val stack ids of the configured fold; refuses leaks and empty parts."""
    require_data(cfg)
    store = Store(cfg.data.store)
    where = cfg.data.split
    split = load_split(where)
    check_split(split, store, where)
    parts = split_parts(split, cfg.data.fold, where)
    if cfg.data.val_part == cfg.data.train_part or "test" in (cfg.data.train_part, cfg.data.val_part):
        raise ConfigError(f"data.train_part = {cfg.data.train_part!r}, data.val_part = {cfg.data.val_part!r}: "
                          "two different parts, neither the held-out \"test\" part (no selection may see it)")
    ids = {}
    for key in ("train_part", "val_part"):
        name = getattr(cfg.data, key)
        if name not in parts:
            raise ConfigError(f"data.{key} = {name!r}: fold {cfg.data.fold} of {where} has parts "
                              f"{', '.join(parts)}; set data.{key} to one of them")
        if not parts[name]:
            what = "validation" if key == "val_part" else "training"
            raise SplitError(f"{where}: part {name!r} of fold {cfg.data.fold} is empty, so there is no "
                             f"{what} set; regenerate the split (e.g. a larger --val-fraction) or set "
                             f"data.{key}")
        ids[key] = parts[name]
    require_intact(store, [*ids["train_part"], *ids["val_part"]])  # damaged stacks: refused before any step
    return store, ids["train_part"], ids["val_part"]


def one_class_warning(store: Store, train_ids: list[str], val_ids: list[str]) -> str | None:
    """A loud line when the training or validation part holds one class: F1 and selection mean little then."""
    for part, ids in (("training", train_ids), ("validation", val_ids)):
        labels = {store.meta(s).label for s in ids}
        if len(labels) < 2:
            return (f"[bold yellow]warning:[/] the {part} part holds only {labels.pop()} stacks ({len(ids)}): "
                    "its F1 and the selected epoch say little; remake the split with both classes in every part")
    return None


def resolve_norm(cfg: TrainConfig, store: Store, train_ids: list[str]) -> TrainConfig:
    """For normalize = meanstd without explicit values, put the training stacks' per-channel mean/std
    into the config: validation, resume and `predict` then normalize exactly as training did."""
    prep = cfg.preprocess
    if prep.normalize != "meanstd" or (prep.mean is not None and prep.std is not None):
        return cfg
    mean, std = channel_mean_std(store, train_ids)
    return dataclasses.replace(cfg, preprocess=dataclasses.replace(prep, mean=tuple(mean), std=tuple(std)))


def make_loader(cfg: TrainConfig, store: Store, stack_ids: list[str], *, train: bool, rt: Runtime,
                loader_cfg=None) -> PatchLoader:
    """This rank's loader over `stack_ids` (train: shuffled, augmented, sharded; eval: every patch once)."""
    return build_loader(store, stack_ids, train=train, patch=cfg.patch, prep=cfg.preprocess,
                        cfg=loader_cfg or cfg.loader, rank=rt.rank, world_size=rt.world_size,
                        device_id=rt.device_id)
