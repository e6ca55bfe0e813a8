"""`stacktrain verify`: is every stack of a store what its conversion wrote? And the quick form of the
same check that `train` and `predict` run before they use a store.

The quick check reads metadata, lists the shard files and reads each file's index (its last bytes):
format version; the array's zarr.json present and agreeing with the stack's shape and dtype; the shard
grid the shape implies equal to the one recorded at conversion; every recorded shard present with its
recorded size, no unrecorded one; every index's crc32c right and every chunk inside its file. `--deep`
also reads every byte: the file's crc32c, every chunk decoded to its size, and the crc32c of the decoded
content, all against the completeness record (`StackMeta.record`, stores/layout.py).
`stacktrain verify` also checks the pyramid's levels (stores/pyramid.py): each one's zarr.json with the shape
and dtype its plan says, and with --deep every chunk read; `train`'s quick check leaves them out, as
training reads level 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from stacktrain.errors import StoreError

from .chunks import chunk_decoder
from .integrity import ABSENT, declared_size, index_problem, record_problem
from .layout import IMAGE, LEVEL0, StackMeta, check_stack_id, shard_grid
from .pyramid import level_shapes
from .reader import Store, _read_json, array_problem, read_stack_meta

NO_RECORD = "no completeness record (converted by an older stacktrain); reconvert to get checksums"


@dataclasses.dataclass(frozen=True)
class StackCheck:
    stack_id: str
    problems: list[str]  # empty: ok
    note: str | None = None  # e.g. NO_RECORD: checked as far as possible
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def shard_files(array_dir: Path) -> dict[str, int]:
    """'c/0/z/y/x' -> size of every shard file on disk under the array folder."""
    out: dict[str, int] = {}
    base = str(array_dir)
    for root, _dirs, files in os.walk(f"{base}/c"):
        rel = root[len(base) + 1:].replace(os.sep, "/")
        for name in files:
            out[f"{rel}/{name}"] = os.stat(f"{root}/{name}").st_size
    return out


def _deep_problem(data: bytes, index: np.ndarray, meta: StackMeta, listed: list[int] | None) -> str | None:
    """Every stored chunk of the shard file `data` decodes to its size; the content's and the file's
    crc32c match the record (content first: it says that voxels differ, not only bytes)."""
    nbytes = int(np.prod(meta.chunk_zyx)) * np.dtype(meta.dtype).itemsize
    decompress = chunk_decoder(meta.codec)
    dest = np.empty(nbytes, np.uint8)
    content = 0
    view = memoryview(data)
    stored = np.flatnonzero(index[:, 0] != ABSENT)
    for position in stored[np.argsort(index[stored, 0], kind="stable")].tolist():  # file order, as written
        offset, size = (int(v) for v in index[position])
        src = view[offset:offset + size]
        try:
            announced = declared_size(meta.codec, src)
            if announced is not None and announced != nbytes:
                raise ValueError(f"announces {announced} bytes, a chunk has {nbytes}")
            decompress(src, dest)
        except Exception as e:
            return f"chunk {position} (index order) does not decode ({str(e).splitlines()[0] if str(e) else e!r})"
        content = google_crc32c.extend(google_crc32c.extend(content, position.to_bytes(4, "little")), dest)
    if listed is None:
        return None
    if content != listed[2]:
        return "decoded content checksum (crc32c) does not match the completeness record: voxels differ"
    if google_crc32c.value(data) != listed[1]:
        return "shard file checksum (crc32c) does not match the completeness record"
    return None


def level_problems(store: Path, meta: StackMeta, deep: bool) -> list[str]:
    """What is wrong with the stack's pyramid levels 1..meta.levels (`deep`: every chunk read, too)."""
    problems = []
    for k, zyx in enumerate(level_shapes(meta.shape, meta.levels), start=1):
        path = store / meta.stack_id / IMAGE / str(k) / "zarr.json"
        want = (meta.shape[0], *zyx)
        try:
            arr = json.loads(path.read_text())
            shape, dtype = tuple(arr["shape"]), arr["data_type"]
        except FileNotFoundError:
            problems.append(f"{path}: pyramid level {k} is missing")
            continue
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: not a Zarr array's metadata ({type(e).__name__}: {e})")
            continue
        if shape != want or dtype != meta.dtype:
            problems.append(f"{path}: pyramid level {k} says {shape}, {dtype}; its plan is {want}, {meta.dtype}")
        elif deep:
            try:
                zarr.open_array(path.parent, mode="r")[...]
            except Exception as e:  # whatever the codec or the shard index reports
                problems.append(f"{path.parent}: pyramid level {k} does not read ({type(e).__name__}: {e})")
    return problems


def check_stack(store: str | Path, stack_id: str, *, deep: bool = False, meta: StackMeta | None = None,
                levels: bool = False) -> StackCheck:
    """Every problem of one stack (quick, or `deep`: every byte read and decoded); `levels`: its pyramid too."""
    store = Path(store)
    try:
        meta = meta or read_stack_meta(store, stack_id)
    except StoreError as e:
        return StackCheck(stack_id, [str(e)])
    array_dir = store / stack_id / IMAGE / LEVEL0
    problems = [f"{array_dir / 'zarr.json'}: {p}" for p in [array_problem(array_dir, meta)] if p]
    if levels:
        problems += level_problems(store, meta, deep)
    record = meta.record
    grid = shard_grid(meta.shape, meta.shard_zyx)
    if record is not None and tuple(record.get("grid", ())) != grid:
        problems.append(f"the metadata's shape {tuple(meta.shape)} means {grid} shards (z, y, x), but "
                        f"{tuple(record.get('grid', ()))} were written")
    on_disk = shard_files(array_dir)
    expected = set(record["shards"]) if record is not None else set()
    c = meta.shape[0]
    n_inner = c * int(np.prod([s // k for s, k in zip(meta.shard_zyx, meta.chunk_zyx)]))
    tail_bytes = 16 * n_inner + 4
    base = str(array_dir)
    for rel in sorted(expected | set(on_disk)):
        path = f"{base}/{rel}"  # strings, not Path: this loop runs once per shard file before every run
        if problem := record_problem(record, rel, on_disk.get(rel)):
            problems.append(f"{path}: {problem}")
            continue
        size = on_disk[rel]
        if size < tail_bytes:
            problems.append(f"{path}: shard file is truncated ({size} bytes, less than its {tail_bytes}-byte index)")
            continue
        with open(path, "rb", buffering=0) as f:
            if deep:
                data = f.read()
                tail = data[-tail_bytes:]
            else:
                tail = os.pread(f.fileno(), tail_bytes, size - tail_bytes)
        index, problem = index_problem(tail, size, n_inner)
        if problem is None and deep:
            problem = _deep_problem(data, index, meta, record["shards"][rel] if record else None)
        if problem:
            problems.append(f"{path}: {problem}")
    return StackCheck(stack_id, problems, None if record is not None else NO_RECORD, len(on_disk))


def verify_store(path: str | Path, *, deep: bool = False) -> list[StackCheck]:
    """One StackCheck per stack the root lists (a root list that cannot be read is a StoreError)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: store not found; create it with `stacktrain convert`")
    root = _read_json(path / "zarr.json", "zarr.json")
    try:
        entries = root["attributes"]["stacktrain"]["stacks"]
        ids = [e["stack_id"] for e in entries]
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path}/zarr.json: not a stacktrain store's stack list ({type(e).__name__}: {e}); "
                         "reconvert the store") from None
    checks = []
    for sid in ids:
        if why := check_stack_id(sid):
            checks.append(StackCheck(str(sid), [f"{path}/zarr.json: {why}"]))
        else:
            checks.append(check_stack(path, sid, deep=deep, levels=True))
    return checks


def require_intact(store: Store, stack_ids) -> None:
    """The quick check of the stacks a run will use; StoreError naming the first damaged one."""
    for sid in stack_ids:
        check = check_stack(store.path, sid, meta=store.meta(sid))
        if check.problems:
            more = f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else ""
            raise StoreError(f"stack {sid!r} of {store.path} is damaged: {check.problems[0]}{more}; run "
                             f"`stacktrain verify {store.path}` for the whole report and reconvert it")


def render(checks: list[StackCheck], deep: bool):
    """The rich table `stacktrain verify` prints."""
    from rich.markup import escape
    from rich.table import Table

    table = Table("stack_id", "status", "shards", "what", title="deep check (every byte decoded)" if deep
                  else "quick check (metadata, sizes, shard indexes)")
    for ch in checks:
        status = "[green]ok[/]" if ch.ok else "[bold red]damaged[/]"
        what = "; ".join(ch.problems) if ch.problems else (ch.note or "")
        table.add_row(escape(ch.stack_id), status, str(ch.shards), escape(what))
    return table
