"""One manifest converted by several processes into one store (`convert --part I/N`, `--stacks-from FILE`):
which stacks a process takes, and the root index every process merges its stacks into.

The split is round-robin in manifest order: part I of N takes rows I, I+N, I+2N, ... (1-based). It
depends on the manifest alone (not on file sizes, clocks or hosts), so every machine computes the same
parts, and the parts' stack counts differ by at most one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

from stacktrain.errors import InputError, StoreError

from . import writer
from .convert_lock import root_lock
from .layout import StackMeta
from .manifest import ManifestRow

_PART = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Selection:
    rows: list[ManifestRow]  # the stacks this process converts, in manifest order
    label: str | None  # "part 2/3" or "stacks from FILE"; None for the whole manifest
    total: int  # rows in the manifest


def parse_part(text: str) -> tuple[int, int]:
    """`--part I/N` as (I, N), or InputError saying what to give."""
    m = _PART.fullmatch(str(text))
    if not m or int(m[2]) < 1 or not 1 <= int(m[1]) <= int(m[2]):
        raise InputError(f"--part {text}: give I/N with 1 <= I <= N (e.g. --part 2/3, the second of 3 parts)")
    return int(m[1]), int(m[2])


def split(rows: Sequence, index: int, count: int) -> list:
    """Part `index` (1-based) of `count`: every count-th row from row `index`, in manifest order."""
    return list(rows[index - 1::count])


def _listed_ids(path: Path, rows: list[ManifestRow], manifest) -> set[str]:
    """The stack ids of a --stacks-from file (one a line; blank lines and `#` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--stacks-from {path}: cannot be read ({e.strerror or e}); give a text file with one "
                         "stack_id a line") from None
    known = {r.stack_id for r in rows}
    ids = set()
    for n, line in enumerate(lines, 1):
        sid = line.split("#", 1)[0].strip()
        if not sid:
            continue
        if sid not in known:
            raise InputError(f"--stacks-from {path}: line {n}: stack_id {sid!r} is not in {manifest}; "
                             "fix the file or the manifest; nothing was converted")
        ids.add(sid)
    if not ids:
        raise InputError(f"--stacks-from {path}: lists no stack_id; give one a line; nothing was converted")
    return ids


def choose(rows: list[ManifestRow], manifest, part: str | None = None,
           stacks_from: str | Path | None = None) -> Selection:
    """The rows this process converts: all, its --part, or those its --stacks-from file names."""
    if part is not None and stacks_from is not None:
        raise InputError("--part and --stacks-from: give one of them (a part of the manifest, or a list of its "
                         "stacks), not both")
    if part is not None:
        index, count = parse_part(part)
        return Selection(split(rows, index, count), f"part {index}/{count}", len(rows))
    if stacks_from is not None:
        ids = _listed_ids(Path(stacks_from), rows, manifest)
        return Selection([r for r in rows if r.stack_id in ids], f"stacks from {stacks_from}", len(rows))
    return Selection(list(rows), None, len(rows))


def _listed_meta(store: Path, stack_id: str) -> StackMeta | None:
    """A stack listed by another run, kept in the list while its metadata reads (damage: `verify`)."""
    try:
        return writer.existing_meta(store, stack_id)
    except StoreError:
        return None


def listed(store: Path) -> list[str]:
    root = json.loads((Path(store) / "zarr.json").read_text())
    return [e["stack_id"] for e in root["attributes"]["stacktrain"]["stacks"]]


def merged_order(on_disk: list[str], manifest_order: list[str], added: set[str]) -> list[str]:
    """The canonical stack list: stacks of other manifests first (as they are listed), then this manifest's
    that are listed or just added, in manifest order. Timing plays no part: the parts of one manifest
    merge to the list one process writes."""
    ours = set(manifest_order)
    present = set(on_disk) | added
    return [s for s in on_disk if s not in ours] + [s for s in manifest_order if s in present]


class RootIndex:
    """The root stack list as this process adds stacks to it: each addition re-reads the list on disk under
    the root lock, merges (`merged_order`) and writes it atomically, so stacks that other processes
    register meanwhile are never lost."""

    def __init__(self, store: Path, manifest_order: list[str]):
        self.store = Path(store)
        self.order = list(manifest_order)
        self.ours: dict[str, StackMeta] = {}
        self.others: dict[str, StackMeta | None] = {}  # metadata of stacks other runs listed, read once

    def _meta(self, stack_id: str) -> StackMeta | None:
        if stack_id in self.ours:
            return self.ours[stack_id]
        if stack_id not in self.others or self.others[stack_id] is None:
            self.others[stack_id] = _listed_meta(self.store, stack_id)
        return self.others[stack_id]

    def add(self, meta: StackMeta) -> None:
        self.ours[meta.stack_id] = meta
        with root_lock(self.store):
            ids = merged_order(listed(self.store), self.order, set(self.ours))
            writer.register(self.store, [m for s in ids if (m := self._meta(s)) is not None])
