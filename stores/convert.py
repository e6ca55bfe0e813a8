"""`stacktrain convert`: the stacks a manifest lists -> one stacktrain store, streamed slab by slab.

Two kinds of failure, handled differently:
- manifest problems (missing file, duplicate or unsafe stack_id, unknown label) abort the whole run
  before anything is written (stores/manifest.py);
- data problems of one stack (NaN, dtype, channel count, too small, unreadable or truncated) fail that
  stack only: it is reported, nothing is written for it, the other stacks are converted, and the run
  ends with ConversionFailed (exit 2) listing every failed stack.
A rerun skips stacks already converted from the same source bytes with the same settings, once the
stack passes the quick completeness check (stores/verify.py) against the record its conversion wrote;
a stack that fails it (or has no record) is reconverted, and the summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from stacktrain.errors import ConversionFailed, InputError, StackTrainError, StoreError

from . import convert_parts, intensity, intensity_plan, writer
from .buffers import POOL
from .convert_lock import LOCK_NAME, WRITERS_LOCK, clear_leftovers, converting, root_lock, stack_lock  # noqa: F401
from .convert_workers import run_stacks
from .layout import StackMeta
from .manifest import ManifestRow, read_manifest
from .options import ConvertOptions
from .sources import RawSource, StreamingSha256, open_row, read_ahead, source_sha256
from .verify import NO_RECORD, check_stack

CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class StackOutcome:
    stack_id: str
    status: str  # converted | skipped | failed
    meta: StackMeta | None = None
    error: str | None = None
    seconds: float = 0.0
    redone: str | None = None  # converted again because the stack in place was incomplete: why
    note: str | None = None  # what the user should know (e.g. --axes not applied to a file that states its own)


@dataclasses.dataclass(frozen=True)
class ConvertReport:
    store: Path
    outcomes: list[StackOutcome]  # in manifest order
    seconds: float
    bytes_read: int  # source bytes on disk of the stacks converted in this run
    selection: str | None = None  # "part 2/3" or "stacks from FILE" (convert_parts.Selection); None: all
    manifest_stacks: int = 0  # rows in the manifest

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def summary(self) -> str:
        rate = f"{self.bytes_read / 1e6:.1f} MB of sources, {self.bytes_read / 1e6 / max(self.seconds, 1e-9):.1f} MB/s"
        redone = sum(o.redone is not None for o in self.outcomes)
        again = f"{redone} reconverted (incomplete), " if redone else ""
        took = f"{self.selection}, {len(self.outcomes)} of {self.manifest_stacks} stacks: " if self.selection else ""
        counts = (f"{self.count('converted') - redone} converted, {again}{self.count('skipped')} skipped (unchanged), "
                  f"{self.count('failed')} failed of {len(self.outcomes)} stacks")
        return f"{took}{counts} in {self.seconds:.1f} s ({rate})"


class Progress:
    """What `convert` reports as it goes. Silent; stores.cli.RichProgress draws a bar from it."""

    def start(self, sizes: list[int]) -> None:
        """Before the first stack: the source bytes on disk of every manifest row."""

    def fraction(self, index: int, fraction: float) -> None:
        """Stack `index` (manifest order) has written this fraction of its slices."""

    def finish(self, index: int, outcome: StackOutcome) -> None:
        """Stack `index` is converted, skipped or failed (`outcome.error` says why)."""

    def stop(self) -> None:
        """After the last stack, also when the run is interrupted."""

    def scan(self, done: int, total: int) -> None:
        """Before any stack: `done` of `total` source bytes read for a percentile --window."""


# -- one stack ---------------------------------------------------------------------------------------

def _changes(present: StackMeta, row: ManifestRow, sha: str, opts: ConvertOptions) -> list[str]:
    """How the stored stack differs from what this run would write (empty: it can be skipped)."""
    pairs = [("source sha256", present.source_sha256, sha), ("label", present.label, row.label),
             ("group", present.group, row.group), ("codec", present.codec, opts.codec),
             ("chunk", tuple(present.chunk_zyx), tuple(opts.chunk_zyx)),
             ("shard", tuple(present.shard_zyx), tuple(opts.shard_zyx)),
             ("foreground threshold", present.foreground_threshold, opts.foreground_threshold)]
    return [f"{name} is {old!r} in the store but {new!r} now" for name, old, new in pairs if old != new]


def _complete_meta(store: Path, stack_id: str) -> tuple[StackMeta | None, str | None]:
    """The stack in place when it passes the quick completeness check, else (None, why it is redone);
    (None, None) when there is none."""
    try:
        meta = writer.existing_meta(store, stack_id)
    except StoreError as e:
        return None, str(e)
    if meta is None:
        return None, None
    check = check_stack(store, stack_id, meta=meta)
    if check.problems:
        return None, check.problems[0]
    if check.note == NO_RECORD:
        return None, NO_RECORD
    return meta, None


def plan_stack(src: RawSource, row: ManifestRow, opts: ConvertOptions,
               record: dict | None = None) -> tuple[tuple[int, int, int, int], str]:
    """The stored (C, Z, Y, X) shape and dtype under the store's intensity `record`, or InputError saying why."""
    c, z, y, x = src.shape
    if c == 1 and not opts.replicate_channels:
        raise InputError(f"{row.where}: has 1 channel, stacks need {CHANNELS}; pass --replicate-channels "
                         f"to copy it to {CHANNELS} channels (or give the right --axes if c was misread)")
    if c not in (1, CHANNELS):
        raise InputError(f"{row.where}: has {c} channels (shape c,z,y,x = {src.shape}), stacks need "
                         f"{CHANNELS}; check the source, or give its axis order in the manifest's axes column")
    applied = intensity.stack_mapping(src.dtype, record, row.where)
    dtype = record["dtype"] if record is not None else applied["source_dtype"]
    small = [f"{ax}={n} < {m}" for ax, n, m in zip("zyx", (z, y, x), opts.min_patch_zyx) if n < m]
    if small and not opts.pad:
        mz, my, mx = opts.min_patch_zyx
        raise InputError(f"{row.where}: too small for one {mz}x{my}x{mx} patch ({', '.join(small)}); "
                         "pass --pad to zero-pad it, or lower --min-patch Z Y X")
    out = (CHANNELS, *(max(n, m) for n, m in zip((z, y, x), opts.min_patch_zyx)))
    return out, dtype


def _check_finite(slab: np.ndarray, z0: int, row: ManifestRow) -> None:
    if slab.dtype.kind == "f" and not np.isfinite(slab).all():
        bad = int(np.flatnonzero(~np.isfinite(slab).all(axis=(0, 2, 3)))[0])
        raise InputError(f"{row.where}: has NaN or infinite values (first in slice z={z0 + bad}); "
                         "replace them in the source (scaling does not fix them)")


def _scaler(src: RawSource, row: ManifestRow, depth: int, applied: dict | None, dtype: str) -> Callable | None:
    """The slab -> stored dtype function of the stack's mapping (`applied`, from intensity.stack_mapping;
    a minmax stack's range is filled in here), or None when the source is stored as is."""
    if applied is None:  # no mapping given: uint8 and uint16 as they are, others refused
        applied = intensity.stack_mapping(src.dtype, None, row.where)
    if applied["kind"] == "minmax" and "low" not in applied:  # the stack's range first: one extra pass
        lo, hi = math.inf, -math.inf
        for z0, slab in src.slabs(depth):
            _check_finite(slab, z0, row)
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        applied.update(low=lo, high=hi)
    return intensity.slab_function(applied, dtype)


def stored_slabs(src: RawSource, row: ManifestRow, opts: ConvertOptions, out_shape, out_dtype: str,
                 on_progress: Callable[[float], None] | None = None,
                 hasher: StreamingSha256 | None = None,
                 mapping: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The source as stored, as (z0, slab) pairs: checked, scaled, channels replicated, zero-padded at the
    end of each axis (the writer records the source's z, y, x as the valid region),
    read in a reader thread one slab ahead of the caller (`read_ahead`), which also feeds `hasher`
    the source's bytes as it goes; `mapping` is the stack's intensity mapping (stores/intensity.py). (The
    writer re-cuts the slabs into whole shards.)"""
    depth = opts.slab_depth
    scale = _scaler(src, row, depth, mapping, out_dtype)
    _, z, y, x = src.shape
    _, oz, oy, ox = out_shape

    def pieces() -> Iterator[np.ndarray]:
        seen = 0
        for z0, slab in src.slabs(depth):
            if z0 != seen or slab.shape[0] != src.shape[0] or slab.shape[2:] != (y, x):
                raise InputError(f"{row.where}: the reader returned slices z={z0} of shape {slab.shape} "
                                 f"after {seen} slices of a (c,z,y,x) = {src.shape} stack; the file is damaged")
            _check_finite(slab, z0, row)
            slab = scale(slab) if scale else slab
            if slab.shape[0] == 1:
                slab = np.repeat(slab, CHANNELS, axis=0)
            if (oy, ox) != (y, x):
                slab = np.pad(slab, ((0, 0), (0, 0), (0, oy - y), (0, ox - x)))
            n = slab.shape[1]
            if hasher is not None:
                hasher.advance((seen + n) / z)
            yield seen, slab.astype(out_dtype, copy=False)
            seen += n
            if on_progress:
                on_progress(seen / z)
        if seen != z:
            raise InputError(f"{row.where}: truncated: {seen} of {z} slices could be read; re-export the source")
        if oz > z:
            yield z, np.zeros((CHANNELS, oz - z, oy, ox), out_dtype)

    return read_ahead(pieces())


def convert_stack(row: ManifestRow, store: Path, opts: ConvertOptions,
                  on_progress: Callable[[float], None] | None = None) -> StackOutcome:
    """Convert one manifest row into `store` (not registered in the root list: the caller does that)."""
    t0 = time.perf_counter()
    hasher = None
    redone = None
    try:
        present, redone = (None, None) if opts.overwrite else _complete_meta(store, row.stack_id)
        if present is not None:
            sha = source_sha256(row.path)  # only to decide whether to skip; otherwise hashed while read
            if changes := _changes(present, row, sha, opts):
                raise InputError(f"{row.where}: already in {store} but {'; '.join(changes)}; "
                                 "pass --overwrite to reconvert it")
            return StackOutcome(row.stack_id, "skipped", meta=present)
        src = open_row(row, opts)
        record = intensity.recorded(store)  # the store's mapping, settled before any stack is converted
        shape, dtype = plan_stack(src, row, opts, record)
        applied = intensity.stack_mapping(src.dtype, record, row.where)  # minmax: its range added when read
        hasher = StreamingSha256(row.path)
        meta = writer.write_stack(
            store, stack_id=row.stack_id, label=row.label, group=row.group, source=str(row.path),
            source_sha256=hasher.hexdigest, shape=shape, dtype=dtype,
            slabs=stored_slabs(src, row, opts, shape, dtype, on_progress, hasher, applied), spacing_zyx=src.spacing_zyx,
            gaps=src.gaps, codec=opts.codec, chunk_zyx=opts.chunk_zyx, shard_zyx=opts.shard_zyx,
            foreground_threshold=opts.foreground_threshold, intensity=applied, levels=opts.levels,
            valid_zyx=src.shape[1:], source_bytes=_disk_size(row.path))  # what --pad's zeros do not count in
    except (StackTrainError, OSError, ValueError) as e:
        text = str(e)
        if text.startswith(row.where):
            message = text
        elif str(row.path) in text:  # the reader named the file already
            message = f"stack {row.stack_id!r} (manifest line {row.line}): {text}"
        else:
            message = f"{row.where}: {text}"
        return StackOutcome(row.stack_id, "failed", error=message, seconds=time.perf_counter() - t0)
    finally:
        if hasher is not None:
            hasher.close()
    return StackOutcome(row.stack_id, "converted", meta=meta, seconds=time.perf_counter() - t0, redone=redone,
                        note=src.axes_note)


# -- the store -------------------------------------------------------------------------------------

def _disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def convert_locked(row: ManifestRow, store: Path, opts: ConvertOptions,
                   on_progress: Callable[[float], None] | None = None) -> StackOutcome:
    """`convert_stack` while holding the stack's lock (in the process that writes it: a pool worker runs
    this); a stack another process keeps writing past the wait fails alone, with that line."""
    try:
        with stack_lock(store, row.stack_id):
            return convert_stack(row, store, opts, on_progress)
    except StoreError as e:
        return StackOutcome(row.stack_id, "failed", error=f"{row.where}: {e}")


def _settle(store: Path, planned: intensity_plan.Plan) -> None:
    """Record the planned mapping under the root lock; a part that finds its own mapping already recorded
    (another part of the manifest was first) goes ahead."""
    with root_lock(store):
        if intensity.mapping_key(intensity.recorded(store)) != intensity.mapping_key(planned.record):
            intensity_plan.settle(store, planned, writer.record_intensity)


def convert(manifest: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions(), *,
            progress: Progress | None = None, part: str | None = None,
            stacks_from: str | Path | None = None) -> ConvertReport:
    """Convert the stacks of `manifest` into the store `out`; raise ConversionFailed if any failed.
    `part` ("I/N") or `stacks_from` (a file of stack ids) limit it to a share of the manifest, for several
    processes converting into one store at once (stores/convert_parts.py). `progress` hears about every
    slab and stack (stores.cli.RichProgress draws the bar); default silent."""
    all_rows = read_manifest(manifest, default_axes=options.axes, label_map=options.labels(),
                             allow_unlabeled=options.allow_unlabeled)
    chosen = convert_parts.choose(all_rows, manifest, part, stacks_from)
    rows = chosen.rows
    progress = progress or Progress()
    # over the whole manifest, so that every part reaches the same mapping; refusals here leave nothing written
    planned = intensity_plan.plan(all_rows, out, options, manifest, progress)
    store = writer.init_store(out)
    t0 = time.perf_counter()
    outcomes: list[StackOutcome | None] = [None] * len(rows)
    sizes = [_disk_size(r.path) for r in rows]
    with converting(store):
        _settle(store, planned)
        # in the whole manifest's order, with the rows other parts convert (convert_parts.merged_order)
        root_list = convert_parts.RootIndex(store, [r.stack_id for r in all_rows])
        progress.start(sizes)
        try:
            with contextlib.closing(run_stacks(convert_locked, rows, store, options, progress)) as stacks:
                for i, outcome in stacks:
                    outcomes[i] = outcome
                    if outcome.meta is not None:
                        root_list.add(outcome.meta)
                    progress.finish(i, outcome)
        except BaseException:  # Ctrl-C, SIGTERM, an error: closing() ended the workers, so their staging can go
            clear_leftovers(store, ours=[r.stack_id for r in rows])
            raise
        finally:
            progress.stop()
            POOL.clear()  # the slab buffers of an in-process conversion are not kept for later
    read = sum(s for s, o in zip(sizes, outcomes) if o.status == "converted")
    report = ConvertReport(store, outcomes, time.perf_counter() - t0, read, chosen.label, chosen.total)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = ", ".join(o.stack_id for o in failed[:10]) + (" ..." if len(failed) > 10 else "")
        raise ConversionFailed(f"{len(failed)} of {len(rows)} stacks failed and were not written ({names}); "
                               f"{report.summary()}. Fix those sources and rerun: the converted stacks are "
                               "kept and skipped", report)
    return report
