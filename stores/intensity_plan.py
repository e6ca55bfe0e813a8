"""Planning a `convert` run's intensity mapping before anything is written (stores/intensity.py is the
mapping itself): what the store will record, decided from the options, the store's record and the dtypes of
every source; a mix without --dtype or a change of an existing store's mapping is refused here, and a
percentile window is resolved by one streaming pass over the sources it applies to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stacktrain.errors import InputError, StackTrainError, StoreError

from .intensity import KEPT, OFFSET, Histogram, describe, flags, mapping_key, num, parse_bound, recorded, store_state
from .sources import open_row


def _requested(opts) -> tuple[str | None, dict[str, Any] | None]:
    """(dtype or None for the sources', mapping or None for one decided from the sources)."""
    if opts.scale == "minmax":
        return "uint8", {"kind": "minmax"}
    if opts.scale == "clip":  # clip to 0..255 is the window 0..255 onto uint8
        return "uint8", {"kind": "window", "asked": ["0", "255"]}
    dtype = opts.dtype if opts.dtype in KEPT else None
    if opts.window is not None:
        return dtype, {"kind": "window", "asked": [str(b).strip() for b in opts.window]}
    return dtype, None


def _names(pairs, dtype: str, n: int = 3) -> str:
    files = [r.stack_id for r, d in pairs if d == dtype]  # ids are unique, file names need not be
    return ", ".join(files[:n]) + (", ..." if len(files) > n else "")


def _from_sources(dtype: str | None, sources: list, manifest) -> dict[str, Any] | None:
    """The mapping a store without stacks gets when no window or scale is asked: from the sources' dtypes."""
    found = sorted({d for _, d in sources})
    kept = [d for d in found if d in KEPT]
    if dtype == "uint16" and "int16" in found:
        if len(found) > 1:
            raise InputError(f"{manifest}: int16 sources ({_names(sources, 'int16')}) would be stored +{OFFSET} "
                             f"and {', '.join(d for d in found if d != 'int16')} ones as they are, which mixes "
                             "two meanings in one uint16 store; pass --dtype uint16 --window LOW HIGH to map them "
                             "all, or convert them into separate stores; nothing was converted")
        return {"dtype": "uint16", "mapping": {"kind": "offset", "offset": OFFSET}}
    if dtype is not None:
        return {"dtype": dtype, "mapping": {"kind": "identity"}}
    if len(kept) > 1:
        raise InputError(f"{manifest}: the stacks mix dtypes, uint8 ({_names(sources, 'uint8')}) and uint16 "
                         f"({_names(sources, 'uint16')}), and a store holds one; pass --dtype uint8 --window LOW "
                         "HIGH (e.g. --window p0.5 p99.5: percentiles over the whole manifest) to store them as "
                         "uint8, or --dtype uint16 --window 0 255 to widen the uint8 ones; nothing was converted")
    return {"dtype": kept[0], "mapping": {"kind": "identity"}} if kept else None


def _window_matches(asked: list[str], rec: dict[str, Any]) -> bool:
    now = [parse_bound(a) for a in asked]
    if now == [parse_bound(a) for a in rec.get("asked", [])]:
        return True
    return all(k == "v" for k, _ in now) and [v for _, v in now] == [rec["low"], rec["high"]]


def _upon(rec: dict[str, Any], dtype: str | None, want: dict[str, Any] | None, store) -> dict[str, Any] | None:
    """The mapping of a store that has stacks, given what this run asks: kept, extended (identity -> a
    window or minmax, which leave the stacks already there unchanged) or refused. None: keep `rec`."""
    asked = f"--dtype {dtype}" if want is None else f"--dtype {dtype or rec['dtype']} " + (
        "--scale minmax" if want["kind"] == "minmax" else f"--window {' '.join(want['asked'])}")
    if dtype not in (None, rec["dtype"]) or (want is not None and rec["mapping"]["kind"] not in ("identity",
                                                                                             want["kind"])):
        raise InputError(f"{store}: holds {describe(rec)}; {asked} asks for another mapping, and a store keeps "
                         f"one; convert into a new --out (or repeat {flags(rec)}, or leave the options out); "
                         "nothing was converted")
    if want is None or (want["kind"] == "minmax" and rec["mapping"]["kind"] == "minmax"):
        return None
    if rec["mapping"]["kind"] == "window":
        if not _window_matches(want["asked"], rec["mapping"]):
            raise InputError(f"{store}: holds {describe(rec)}; {asked} asks for another window, and a store "
                             f"keeps one; repeat {flags(rec)}, or convert into a new --out; nothing was converted")
        return None
    return {"dtype": rec["dtype"], "mapping": want}


def _open_dtype(row, opts) -> str | None:
    """The source's dtype from its headers; None when it does not open (that stack then fails alone)."""
    try:
        return open_row(row, opts).dtype.name
    except (StackTrainError, OSError, ValueError):
        return None


def _scan(pairs, qs: list[float], opts, progress) -> list[float]:
    """The percentiles `qs` over every voxel of the given sources: one streaming pass, with a progress bar."""
    for row, dtype in pairs:
        if dtype not in ("uint8", "int8", "uint16", "int16"):
            raise InputError(f"{row.where}: percentile windows are computed over integer sources of at most 16 "
                             f"bits, this one is {dtype}; give --window as values; nothing was converted")
    sources = [open_row(r, opts) for r, _ in pairs]
    total, done, hist = sum(s.nbytes for s in sources), 0, Histogram()
    progress.scan(0, total)
    for src in sources:
        for _, slab in src.slabs(opts.slab_depth):
            hist.add(slab)
            done += slab.nbytes
            progress.scan(done, total)
    return hist.percentiles(qs)


@dataclasses.dataclass(frozen=True)
class Plan:
    record: dict[str, Any] | None  # the mapping the store will record (None: nothing storable was found)
    before: tuple | None  # mapping_key of what the store recorded when planned (checked again under the lock)


def plan(rows, out: str | Path, opts, manifest, progress) -> Plan:
    """The store's mapping for this run, or InputError (nothing written): a mix of dtypes without --dtype,
    another mapping than the store's. `progress.scan(done, total)` hears about the percentile pass."""
    out = Path(out)
    before, dtypes = store_state(out)
    if before is None and dtypes:
        raise InputError(f"{out}: its stacks mix {', '.join(sorted(set(dtypes.values())))} (converted before "
                         "stores recorded one dtype); convert the manifests into a new --out with --dtype uint8 "
                         "--window LOW HIGH; nothing was converted")
    dtype, want = _requested(opts)
    sources = [(r, d) for r in rows if (d := _open_dtype(r, opts)) is not None]
    if before is not None:
        record = _upon(before, dtype, want, out) or before
    elif want is None:
        record = _from_sources(dtype, sources, manifest)
    else:
        record = {"dtype": dtype, "mapping": want}
    m = record["mapping"] if record else {}
    if m.get("kind") == "window" and "low" not in m:  # a new window: its values, percentiles resolved once
        bounds = [parse_bound(a) for a in m["asked"]]
        mapped = [(r, d) for r, d in sources if d != record["dtype"]]
        if any(k == "p" for k, _ in bounds):
            qs = [q for k, q in bounds if k == "p"]
            found = _scan(mapped, qs, opts, progress) if mapped else None
            if found is None:
                raise InputError(f"{manifest}: --window {' '.join(m['asked'])}: no source of this manifest needs "
                                 f"mapping (all are {record['dtype']}), so there is nothing to take percentiles "
                                 "of; give the window as values, or leave it out")
            values = iter(found)
            bounds = [(k, next(values) if k == "p" else v) for k, v in bounds]
        low, high = (v for _, v in bounds)
        if low >= high:
            raise InputError(f"{manifest}: --window {' '.join(m['asked'])} gives {num(low)}..{num(high)} over the "
                             "manifest (nearly constant sources); give the window as values; nothing was converted")
        record = {"dtype": record["dtype"], "mapping": {"kind": "window", "low": low, "high": high, **m}}
    return Plan(record, mapping_key(before))


def settle(store: Path, planned: Plan, write: Callable) -> None:
    """Under the convert lock: refuse when another run changed the store's mapping since `plan`, then record
    the planned one (`write(store, record)`)."""
    now, _ = store_state(Path(store))
    if mapping_key(now) != planned.before:
        raise StoreError(f"{store}: another convert changed the store's mapping meanwhile (now {describe(now)}); "
                         "rerun this one")
    if planned.record is not None and mapping_key(recorded(store)) != mapping_key(planned.record):
        write(store, planned.record)
