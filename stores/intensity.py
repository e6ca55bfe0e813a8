"""Dataset-level bit depth: the one mapping from source values to the store's dtype.

A store holds one dtype (uint8 or uint16) and records, in its root attributes, how sources get there:

    {"dtype": "uint8", "mapping": {"kind": "window", "low": 12.0, "high": 3000.0, "asked": ["p0.5", "p99.5"],
                                   "source_dtypes": ["uint16", "uint8"]}}

kinds: identity (sources already in the dtype), offset (int16 + 32768 -> uint16, lossless), window (LOW..HIGH
-> 0..dtype max, clipped; percentiles are computed once over the whole manifest and recorded as numbers),
minmax (per stack, the explicit `--scale minmax`). Under window and minmax a source already in the store's
dtype is stored as it is. Each stack records what was applied to it (StackMeta.intensity). `convert`
plans the mapping before writing (stores/intensity_plan.py); the workers map each stack
(`stack_mapping`); `mapping_of` and `ConvertOptions.with_mapping` let a later step convert new raw stacks exactly as
a training store was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.errors import ConfigError, InputError

KEPT = ("uint8", "uint16")
OFFSET = 32768  # int16 -> uint16: the sign bit flipped, every value kept
HIST_BASE = 32768  # percentile histograms span int16's minimum .. uint16's maximum
HIST_SIZE = HIST_BASE + 65536


# -- what was asked ----------------------------------------------------------------------------------

def parse_bound(value: Any, flag: str = "--window") -> tuple[str, float]:
    """A window bound: ("p", q) for a percentile such as "p0.5", ("v", x) for a value such as -1024."""
    text = str(value).strip()
    try:
        if text[:1] in "pP":
            q = float(text[1:])
            if 0 <= q <= 100:
                return "p", q
        elif math.isfinite(float(text)):
            return "v", float(text)
    except ValueError:
        pass
    raise ConfigError(f"{flag} {value}: give a value (e.g. 0, -1024, 4095) or a percentile over the whole "
                      "manifest (p0 to p100, e.g. p0.5 p99.5)")


def check_request(dtype: str, window, scale: str) -> None:
    """Refuse option combinations that do not name one mapping (ConvertOptions.__post_init__)."""
    if window is None:
        if scale != "none" and dtype == "uint16":
            raise ConfigError(f"--scale {scale} stores uint8; leave out --dtype uint16, or map to uint16 with "
                              "--dtype uint16 --window LOW HIGH")
        return
    if len(window) != 2:
        raise ConfigError(f"--window {window}: give two bounds, LOW HIGH")
    if scale != "none":
        raise ConfigError(f"--window and --scale {scale} both map intensities; give one of them")
    if dtype not in KEPT:
        raise ConfigError(f"--window {' '.join(map(str, window))}: give --dtype uint8 or --dtype uint16 too "
                          "(the dtype the window maps onto)")
    (kl, lo), (kh, hi) = (parse_bound(b) for b in window)
    if kl == kh and lo >= hi:
        raise ConfigError(f"--window {' '.join(map(str, window))}: LOW must be below HIGH")


# -- describing and comparing --------------------------------------------------------------------

def num(value: float) -> str:
    """A window bound as text that reads back as the same float (4095, 12.5, 1234567.25)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def mapping_key(record: dict[str, Any] | None) -> tuple | None:
    """What makes two mappings the same (not which source dtypes went through it, nor how it was asked)."""
    if record is None:
        return None
    m = record["mapping"]
    return record["dtype"], m["kind"], m.get("low"), m.get("high"), m.get("offset")


def describe(record: dict[str, Any] | None) -> str:
    """One phrase: 'uint8 (window 12..3000 from p0.5 p99.5)'."""
    if record is None:
        return "no recorded dtype"
    m = record["mapping"]
    if m["kind"] == "window":
        asked = f" from {' '.join(m['asked'])}" if any(a[:1] in "pP" for a in m.get("asked", [])) else ""
        what = f"window {num(m['low'])}..{num(m['high'])}{asked}"
    elif m["kind"] == "offset":
        what = f"int16 + {m['offset']}"
    elif m["kind"] == "minmax":
        what = "min-max per stack"
    else:
        what = "stored as is"
    return f"{record['dtype']} ({what})"


def describe_applied(applied: dict[str, Any] | None) -> str:
    """What a stack records: 'window 12..3000 of uint16', 'as is (uint8)', '-' (converted before the record)."""
    if not applied:
        return "-"
    kind, src = applied["kind"], applied["source_dtype"]
    if kind in ("window", "minmax"):
        return f"{kind} {num(applied['low'])}..{num(applied['high'])} of {src}"
    if kind == "offset":
        return f"+{applied['offset']} of {src}"
    return f"as is ({src})"


def flags(record: dict[str, Any]) -> str:
    """The `stacktrain convert` options that give this mapping."""
    m = record["mapping"]
    if m["kind"] == "minmax":
        return "--scale minmax"
    window = f" --window {num(m['low'])} {num(m['high'])}" if m["kind"] == "window" else ""
    return f"--dtype {record['dtype']}{window}"


def option_values(record: dict[str, Any]) -> dict[str, Any]:
    """The ConvertOptions fields (scale, dtype, window) that convert new raw stacks with this mapping
    (ConvertOptions.with_mapping)."""
    m = record["mapping"]
    if m["kind"] == "minmax":
        return {"scale": "minmax", "dtype": "uint8", "window": None}
    window = (num(m["low"]), num(m["high"])) if m["kind"] == "window" else None
    return {"scale": "none", "dtype": record["dtype"], "window": window}


# -- the store's record ----------------------------------------------------------------------------

def _root(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "zarr.json").read_text())["attributes"]["stacktrain"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded(path: str | Path) -> dict[str, Any] | None:
    """The mapping in the store's root attributes, or None (a new store, or one converted before the record)."""
    info = _root(Path(path))
    if not info or "mapping" not in info:
        return None
    return {"dtype": info["dtype"], "mapping": info["mapping"]}


def _stack_dtypes(path: Path) -> dict[str, str]:
    """{stack_id: stored dtype} of the listed stacks whose metadata reads."""
    out = {}
    for entry in (_root(path) or {}).get("stacks", []):
        try:
            doc = json.loads((path / entry["stack_id"] / "zarr.json").read_text())
            out[entry["stack_id"]] = doc["attributes"]["stacktrain"]["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def store_state(path: Path) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(the mapping the store's stacks were converted with, or None when they do not pin one; their dtypes).
    A store written before the record, holding one dtype, counts as identity."""
    dtypes = _stack_dtypes(path)
    record = recorded(path)
    if record is None and len(set(dtypes.values())) == 1:
        d = next(iter(dtypes.values()))
        record = {"dtype": d, "mapping": {"kind": "identity", "source_dtypes": [d]}}
    return (record if dtypes else None), dtypes


def mapping_of(store) -> dict[str, Any] | None:
    """The store's dtype and mapping ({"dtype", "mapping"}): recorded, or identity for a store converted
    before the record that holds one dtype; None for an empty store or an unrecorded mix."""
    path = Path(getattr(store, "path", store))
    return recorded(path) or store_state(path)[0]


def require_same(trained: dict[str, Any] | None, store, where: str | Path) -> None:
    """Refuse to predict on a store whose intensities differ from the training store's (`trained`, from the
    checkpoint; None: a checkpoint that predates the record, nothing to compare)."""
    if trained is None:
        return
    now = mapping_of(store)
    if mapping_key(now) != mapping_key(trained):
        raise ConfigError(f"{getattr(store, 'path', store)}: holds {describe(now)}, but the model in {where} was "
                          f"trained on {describe(trained)}; convert the raw stacks into a new store with "
                          f"`stacktrain convert ... {flags(trained)}` and predict on that")


# -- one stack -------------------------------------------------------------------------------------

def _fixes(dtype: str) -> str:
    text = (f"--dtype {dtype} --window LOW HIGH (values, or percentiles over the whole manifest such as "
            "p0.5 p99.5)")
    return text + (", or --scale minmax (per stack) or --scale clip (to 0..255)" if dtype == "uint8" else "")


def stack_mapping(source, record: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """What one stack gets under the store's mapping: {"kind", "source_dtype", ...} (minmax: its low and high
    are the stack's range, filled in by the caller), or InputError naming both dtypes and the fix."""
    s = np.dtype(source).name
    if np.dtype(source).kind not in "biuf":
        raise InputError(f"{where}: dtype {s} cannot be stored; convert it to uint8 or uint16")
    if record is None:
        if s in KEPT:
            return {"kind": "identity", "source_dtype": s}
        lossless = ", or --dtype uint16 (int16 + 32768, lossless)" if s == "int16" else ""
        raise InputError(f"{where}: dtype {s} is not stored as is (only uint8 and uint16 are); pass "
                         f"{_fixes('uint8')}{lossless}")
    d, m = record["dtype"], record["mapping"]
    if s == d and m["kind"] != "offset":
        return {"kind": "identity", "source_dtype": s}
    if m["kind"] == "offset" and s == "int16":
        return {"kind": "offset", "source_dtype": s, "offset": m["offset"]}
    if m["kind"] == "window":
        return {"kind": "window", "source_dtype": s, "low": m["low"], "high": m["high"]}
    if m["kind"] == "minmax":
        return {"kind": "minmax", "source_dtype": s}
    if m["kind"] == "offset":
        raise InputError(f"{where}: dtype {s}, but the store holds {describe(record)}, int16 sources only; "
                         f"convert {s} stacks into another store")
    raise InputError(f"{where}: dtype {s}, but the store holds {describe(record)}; pass {_fixes(d)} to map "
                     f"{s} into the store's {d}")


def _window(slab: np.ndarray, low: float, high: float, dtype: np.dtype) -> np.ndarray:
    """LOW..HIGH -> 0..dtype max, clipped and rounded; in float64 one plane at a time (exact for any
    16-bit value, and no float copy of the whole slab)."""
    out = np.empty(slab.shape, dtype)
    gain = np.iinfo(dtype).max / (high - low) if high > low else 0.0
    yx = slab.shape[-2:]
    for plane, dest in zip(slab.reshape(-1, *yx), out.reshape(-1, *yx)):
        f = np.clip(plane, low, high, dtype=np.float64)
        f -= low
        f *= gain
        np.rint(f, out=f)
        dest[...] = f
    return out


def slab_function(applied: dict[str, Any], dtype: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """slab (source dtype) -> slab (store dtype) for a stack's mapping; None when stored as is."""
    kind = applied["kind"]
    if kind == "identity":
        return None
    if kind == "offset":  # + 32768 is the sign bit flipped: exact, no wider copy
        return lambda s: s.view(np.uint16) ^ np.uint16(0x8000)
    low, high, target = applied["low"], applied["high"], np.dtype(dtype)
    return lambda s: _window(s, low, high, target)


class Histogram:
    """Exact value counts over integer sources of at most 16 bits (int16's minimum to uint16's maximum),
    for percentiles over a whole manifest in one streaming pass."""

    def __init__(self):
        self.counts = np.zeros(HIST_SIZE, np.int64)

    def add(self, slab: np.ndarray) -> None:
        for plane in slab.reshape(-1, *slab.shape[-2:]):  # temporaries of one plane, not of the slab
            v = plane.astype(np.int32)
            v += HIST_BASE
            self.counts += np.bincount(v.ravel(), minlength=HIST_SIZE)

    def percentiles(self, qs: list[float]) -> list[float]:
        """What np.percentile (linear) gives over every value counted."""
        cdf = np.cumsum(self.counts)
        n = int(cdf[-1])

        def order(k: int) -> float:  # the k-th smallest value
            return float(np.searchsorted(cdf, k, side="right") - HIST_BASE)

        out = []
        for q in qs:
            h = (n - 1) * (q / 100)
            k = int(np.floor(h))
            t = h - k
            a, b = order(k), order(min(k + 1, n - 1))
            out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's _lerp
        return out
