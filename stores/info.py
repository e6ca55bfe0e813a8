"""`stacktrain info`: what a store holds, per stack and per label, as a rich table or JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .intensity import describe, describe_applied, mapping_of
from .layout import CLASS_NAMES, FORMAT_VERSION, UNLABELED
from .reader import Store

MB = 1e6


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ratio_of(n: int | None, stored: int) -> float | None:
    return round(n / stored, 3) if stored and n is not None else None


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stored = sum(r["stored_bytes"] for r in rows)
    raw = sum(r["raw_bytes"] for r in rows)
    # only where every stack recorded its source size: a partial sum would understate the ratio
    known = all(r["source_bytes"] is not None for r in rows)
    source = sum(r["source_bytes"] for r in rows) if known else None
    return {"stacks": len(rows), "stored_bytes": stored, "raw_bytes": raw, "ratio": _ratio_of(raw, stored),
            "source_bytes": source, "source_ratio": _ratio_of(source, stored)}


def summarize(path: str | Path) -> dict[str, Any]:
    """Every stack (stack_id, label, group, shape c,z,y,x, valid z,y,x, dtype, codec, stored/raw/source
    bytes, ratios, the intensity mapping applied to it) and totals per label and overall, with the
    store's dtype and mapping. Stored = the files under the stack's image/0; raw = the valid region's
    voxels (not convert --pad's zeros) x channels x itemsize; source = the source's size on disk recorded
    at conversion (None in older stores); ratio = raw / stored, source_ratio = source / stored; levels: the
    pyramid's levels beside level 0 and pyramid_bytes their files (not in stored, not read by training). A listed
    stack whose folder was deleted by hand is named in `damaged`. Refuses stores of an unknown
    format_version (StoreError from Store)."""
    store = Store(path, damaged_ok=True)  # a stack folder deleted by hand is reported, not fatal
    rows = []
    for m in store.stacks:
        level0 = store.array_path(m.stack_id)
        stored = _tree_bytes(level0)
        pyramid = sum(_tree_bytes(level0.parent / str(k)) for k in range(1, m.levels + 1))
        raw = m.shape[0] * math.prod(m.valid) * np.dtype(m.dtype).itemsize
        rows.append({"stack_id": m.stack_id, "label": m.label, "group": m.group, "shape": list(m.shape),
                     "valid_zyx": list(m.valid), "dtype": m.dtype, "codec": m.codec, "chunk_zyx": list(m.chunk_zyx),
                     "shard_zyx": list(m.shard_zyx), "stored_bytes": stored, "raw_bytes": raw,
                     "ratio": _ratio_of(raw, stored), "source_bytes": m.source_bytes,
                     "source_ratio": _ratio_of(m.source_bytes, stored), "intensity": m.intensity,
                     "levels": m.levels, "pyramid_bytes": pyramid})
    kinds = {name: name for name in CLASS_NAMES} | {"unlabeled": UNLABELED}  # total's name -> the label
    totals = {name: _totals([r for r in rows if r["label"] == label]) for name, label in kinds.items()
              if any(r["label"] == label for r in rows)}
    totals["all"] = _totals(rows)
    record = mapping_of(store)  # the store's dtype and intensity mapping (stores/intensity.py)
    return {"store": str(store.path), "format_version": FORMAT_VERSION, "dtype": record and record["dtype"],
            "mapping": record and record["mapping"], "groups": len({r["group"] for r in rows}), "stacks": rows,
            "totals": totals, "damaged": store.damaged}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:,.2f}"


def _shape(row: dict[str, Any]) -> str:
    """c,z,y,x as stored, and the valid z,y,x where convert --pad added zeros."""
    shape = "x".join(map(str, row["shape"]))
    return shape if row["valid_zyx"] == row["shape"][1:] else f"{shape} ({'x'.join(map(str, row['valid_zyx']))} valid)"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render(summary: dict[str, Any]):
    """A rich Table of `summarize`'s result: one row per stack, then a totals section."""
    from rich.table import Table

    record = summary["dtype"] and {"dtype": summary["dtype"], "mapping": summary["mapping"]}
    table = Table(title=f"{summary['store']}  ({len(summary['stacks'])} stacks, {summary['groups']} groups, "
                        f"format {summary['format_version']}; {describe(record)})", title_justify="left")
    for name, justify in (("stack_id", "left"), ("label", "left"), ("group", "left"),
                          ("shape (c,z,y,x)", "right"), ("dtype", "left"), ("codec", "left"),
                          ("mapping", "left"), ("stored MB", "right"), ("raw MB", "right"), ("ratio", "right"),
                          ("source MB", "right"), ("source ratio", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in summary["stacks"]:
        table.add_row(r["stack_id"], r["label"], r["group"], _shape(r), r["dtype"],
                      r["codec"], describe_applied(r["intensity"]), _mb(r["stored_bytes"]), _mb(r["raw_bytes"]),
                      _ratio(r["ratio"]), _mb(r["source_bytes"]), _ratio(r["source_ratio"]))
    table.add_section()
    for name, t in summary["totals"].items():
        title = "total" if name == "all" else f"total {name}"
        table.add_row(title, "" if name == "all" else name, f"{t['stacks']} stacks", "", "", "", "",
                      _mb(t["stored_bytes"]), _mb(t["raw_bytes"]), _ratio(t["ratio"]), _mb(t["source_bytes"]),
                      _ratio(t["source_ratio"]), style="bold")
    return table
