"""`stacktrain info`: what a store holds, per stack and per label, as a rich table or JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .intensity import describe, describe_applied, mapping_of
from .layout import CLASS_NAMES, FORMAT_VERSION
from .reader import Store

MB = 1e6


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stored = sum(r["stored_bytes"] for r in rows)
    raw = sum(r["raw_bytes"] for r in rows)
    return {"stacks": len(rows), "stored_bytes": stored, "raw_bytes": raw,
            "ratio": round(raw / stored, 3) if stored else None}


def summarize(path: str | Path) -> dict[str, Any]:
    """Every stack (stack_id, label, group, shape c,z,y,x, dtype, codec, stored/raw bytes, ratio, the
    intensity mapping applied to it) and totals per label and overall, with the store's dtype and mapping.
    Stored = the files under the stack's image/0; raw = voxels x itemsize.
    Refuses stores of an unknown format_version (StoreError from Store)."""
    store = Store(path)
    rows = []
    for m in store.stacks:
        stored = _tree_bytes(store.array_path(m.stack_id))
        raw = math.prod(m.shape) * np.dtype(m.dtype).itemsize
        rows.append({"stack_id": m.stack_id, "label": m.label, "group": m.group, "shape": list(m.shape),
                     "dtype": m.dtype, "codec": m.codec, "chunk_zyx": list(m.chunk_zyx),
                     "shard_zyx": list(m.shard_zyx), "stored_bytes": stored, "raw_bytes": raw,
                     "ratio": round(raw / stored, 3) if stored else None, "intensity": m.intensity})
    labels = [name for name in CLASS_NAMES if any(r["label"] == name for r in rows)]
    totals = {name: _totals([r for r in rows if r["label"] == name]) for name in labels}
    totals["all"] = _totals(rows)
    record = mapping_of(store)  # the store's dtype and intensity mapping (stores/intensity.py)
    return {"store": str(store.path), "format_version": FORMAT_VERSION, "dtype": record and record["dtype"],
            "mapping": record and record["mapping"], "groups": len({r["group"] for r in rows}), "stacks": rows,
            "totals": totals}


def _mb(n: int) -> str:
    return f"{n / MB:,.2f}"


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
                          ("mapping", "left"), ("stored MB", "right"), ("raw MB", "right"), ("ratio", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in summary["stacks"]:
        table.add_row(r["stack_id"], r["label"], r["group"], "x".join(map(str, r["shape"])), r["dtype"],
                      r["codec"], describe_applied(r["intensity"]), _mb(r["stored_bytes"]), _mb(r["raw_bytes"]),
                      _ratio(r["ratio"]))
    table.add_section()
    for name, t in summary["totals"].items():
        title = "total" if name == "all" else f"total {name}"
        table.add_row(title, "" if name == "all" else name, f"{t['stacks']} stacks", "", "", "", "",
                      _mb(t["stored_bytes"]), _mb(t["raw_bytes"]), _ratio(t["ratio"]), style="bold")
    return table
