"""What `--resume` may change: a resumed run trains on with the config it started with, except the keys
of `RESUMABLE`, which cannot change which numbers the run produces (or, for the epoch budget and the
patience, only extend or shorten the run). Any other changed key is refused, each one named with its old
and new value. Each allowed change is recorded with the first epoch trained under it: in
`training_results.json` (`config_changes`) and as comment lines heading `config.toml`.

The paths `data.store` and `data.split` may change (a moved store or study directory) because what
they hold is checked on its own: the checkpoint records the store's identity and the train/val stacks
(`data_identity`), and a resume that finds other stacks is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stacktrain.errors import ConfigError

RESUMABLE: dict[str, str] = {
    "train.epochs": "the epoch budget: extend (or end) a run",
    "train.patience": "early stopping's patience: extend (or end) a run",
    "train.log_interval": "how often the log prints",
    "train.memory_check": "whether the start checks the memory estimate, not what is trained",
    "loader.workers": "how many processes read chunks, not which patches",
    "loader.prefetch": "how many batches are prepared ahead, not which",
    "train.out_dir": "where the run directory lives",
    "train.run_name": "the run directory's name",
    "data.store": "the store's path (its identity is checked)",
    "data.split": "the split file's path (the train/val stacks are checked)",
}
HEADER = "# config changes on --resume (the value before each change is the old one):"


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """`section.key` -> value (model.options stays one value)."""
    return {f"{section}.{key}": value for section, table in config.items() if isinstance(table, dict)
            for key, value in table.items()}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # tuples vs lists, int vs float


def config_changes(old: dict[str, Any], new: dict[str, Any], *, epoch: int, where: str | Path) -> list[dict]:
    """The allowed changes from `old` (the checkpoint's config) to `new`, as records; a ConfigError
    naming every refused change. A key absent from `old` (a file of an older stacktrain) is not compared."""
    before, after = flatten(old), flatten(new)
    changed = [k for k in sorted(after) if k in before and not _same(before[k], after[k])]
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        what = "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in refused)
        raise ConfigError(f"{where}: --resume with a changed config ({what}); a resumed run keeps its config "
                          f"except {', '.join(RESUMABLE)}: undo the change(s), or start a new run directory")
    return [{"epoch": epoch, "key": k, "old": before[k], "new": after[k]} for k in changed]


def config_comment(changes: list[dict]) -> str:
    """The comment lines heading config.toml: one per recorded change."""
    if not changes:
        return ""
    lines = [HEADER] + [f"#   from epoch {c['epoch']}: {c['key']} = {json.dumps(c['old'])} -> {json.dumps(c['new'])}"
                        for c in changes]
    return "\n".join(lines) + "\n"


def data_identity(store_id: str, train_ids: list[str], val_ids: list[str]) -> dict[str, str]:
    """What a checkpoint records of its data: the store's identity and a hash of its train/val stacks."""
    parts = json.dumps({"train": sorted(train_ids), "val": sorted(val_ids)}, separators=(",", ":"))
    return {"store": store_id, "parts": hashlib.sha256(parts.encode()).hexdigest()}


def check_data_identity(saved: dict[str, str] | None, now: dict[str, str], where: str | Path) -> None:
    """Refuse a resume onto another store or other train/val stacks than the checkpoint's."""
    if not saved:
        return  # a checkpoint of an older stacktrain: nothing recorded
    if saved.get("store") != now["store"]:
        raise ConfigError(f"{where}: the run started on a store of identity {saved.get('store', '?')[:12]}, "
                          f"data.store now has {now['store'][:12]} (other stacks, labels or groups); point "
                          "data.store at the run's store, or start a new run directory")
    if saved.get("parts") != now["parts"]:
        raise ConfigError(f"{where}: the run's train/val stacks differ from those of data.split / data.fold now; "
                          "give the run's split file, or start a new run directory")
