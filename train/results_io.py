"""The byte layout of `training_results.json`: one JSON document, appended one epoch at a time.

```
{"schema_version":1,"config":{...},"environment":{...},"started_at":"...","epochs":[      <- header line
{"epoch":0,...,"volumes":[...],"samples":[...]}                                            <- one line per epoch
,{"epoch":1,...,"volumes":[...],"samples":[...]}
],"best_epoch":1,"stop_reason":null,"updated_at":"..."}                                    <- tail line
```

`json.load` reads it like any JSON file. Appending an epoch overwrites the tail line with `,<epoch>`
and a new tail (one write, then fsync), so it costs O(that epoch), not O(every epoch so far), and the
file is valid JSON after every epoch. A kill -9 during that one write can leave the last epoch line
cut short and no tail: `read_results` then drops the partial line (that epoch is redone by
`--resume`) and reports stop_reason None, so a study treats the run as unfinished. The first write of
a run, and a resume, rewrite the whole file atomically (temp file, fsync, rename).

Each epoch line holds `samples` last, so `read_results(path, samples="best")` parses only the light
part (metrics, volumes) of every other epoch and the samples of the best one: a reader of many runs
holds one epoch's samples per run, not all of them. Nothing here validates against the schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stacktrain.errors import ResultsError
from stacktrain.io import atomic_write_bytes, disk_full, is_disk_full

HEAD_KEYS = ("schema_version", "config", "environment", "started_at")
TAIL_KEYS = ("best_epoch", "stop_reason", "updated_at")
SAMPLES_MARK = b',"samples":['
SAMPLE_MODES = ("all", "best", "none")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def epoch_line(entry: dict[str, Any]) -> bytes:
    """One epoch as one line, `samples` last (what the light reader cuts off)."""
    light = {k: v for k, v in entry.items() if k != "samples"}
    return _dumps({**light, "samples": entry.get("samples", [])})


def head_bytes(results: dict[str, Any]) -> bytes:
    extra = {"config_changes": results["config_changes"]} if results.get("config_changes") else {}
    head = _dumps({**{k: results[k] for k in HEAD_KEYS}, **extra})
    return head[:-1] + b',"epochs":[\n'


def tail_bytes(best_epoch: int | None, stop_reason: str | None, updated_at: str) -> bytes:
    return b"]," + _dumps({"best_epoch": best_epoch, "stop_reason": stop_reason, "updated_at": updated_at})[1:] + b"\n"


def document(results: dict[str, Any]) -> bytes:
    """The whole file for `results` (a dict with the head keys, `epochs` and the tail keys)."""
    lines = [(b"," if i else b"") + epoch_line(e) + b"\n" for i, e in enumerate(results["epochs"])]
    return head_bytes(results) + b"".join(lines) + tail_bytes(*(results[k] for k in TAIL_KEYS))


class ResultsWriter:
    """Appends epochs to a results file; holds its header fields and byte offsets, never the epochs."""

    def __init__(self, path: str | Path, results: dict[str, Any]):
        """Write `results` (its epochs so far: none, or those kept by a resume) as the whole file."""
        self.path = Path(path)
        self.best_epoch, self.stop_reason = results["best_epoch"], results["stop_reason"]
        self.count = len(results["epochs"])
        data = document(results)
        atomic_write_bytes(self.path, data)
        self.tail = tail_bytes(*(results[k] for k in TAIL_KEYS))
        self.offset = len(data) - len(self.tail)  # where the tail starts

    def append(self, entry: dict[str, Any] | None, *, best_epoch: int | None, stop_reason: str | None,
               updated_at: str) -> None:
        """Add one epoch (None: only update the tail, e.g. stop_reason "pruned") in one write + fsync."""
        line = b"" if entry is None else (b"," if self.count else b"") + epoch_line(entry) + b"\n"
        tail = tail_bytes(best_epoch, stop_reason, updated_at)
        try:
            self._write_at(self.offset, line + tail)
        except OSError as e:
            if not is_disk_full(e):
                raise
            try:  # put the previous tail back: the file is what it was before this epoch (it fitted before)
                self._write_at(self.offset, self.tail)
            except OSError:
                pass  # read_results still drops a cut-off last line: the file stays readable
            raise disk_full(self.path, len(line + tail)) from None
        self.tail = tail
        self.offset += len(line)
        self.count += entry is not None
        self.best_epoch, self.stop_reason = best_epoch, stop_reason


    def _write_at(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.truncate()  # frees the old tail's blocks before writing, on a disk that is full
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _light(line: bytes) -> dict[str, Any]:
    cut = line.find(SAMPLES_MARK)
    return json.loads(line if cut < 0 else line[:cut] + b"}")


def _tail(path: Path, f) -> dict[str, Any] | None:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4096))
    chunk = f.read()
    at = chunk.rfind(b"\n],")
    if at < 0 or not chunk.endswith(b"}\n"):
        return None
    try:
        return json.loads(b"{" + chunk[at + 3:])
    except json.JSONDecodeError:
        return None


def read_results(path: str | Path, *, samples: str = "all") -> dict[str, Any]:
    """The results dict; `samples`: "all" epochs' samples, only the "best" epoch's, or "none"
    (the other epochs then have no `samples` key). Reads files of the older whole-document layout too."""
    if samples not in SAMPLE_MODES:
        raise ValueError(f"samples={samples!r}; choose one of {', '.join(SAMPLE_MODES)}")
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no results file; is this a run directory?") from None
    with f:
        first = f.readline()
        if not first.endswith(b'"epochs":[\n'):  # the whole-document layout (one json.dumps)
            try:
                return json.loads(first + f.read())
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}: not valid JSON ({e})") from None
        try:
            results = json.loads(first[:-len(b',"epochs":[\n')] + b"}")
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not a results file ({e})") from None
        tail = _tail(path, f) or {"best_epoch": None, "stop_reason": None, "updated_at": results["started_at"]}
        f.seek(len(first))
        best = tail["best_epoch"]
        best_prefix = None if best is None else b'{"epoch":%d,' % best
        epochs = []
        for line in f:
            if line.startswith(b"]"):
                break
            line = line.removeprefix(b",")
            try:
                full = samples == "all" or (samples == "best" and best_prefix is not None
                                            and line.startswith(best_prefix))
                epochs.append(json.loads(line) if full else _light(line))
            except json.JSONDecodeError:
                break  # the last line of a run killed while appending: that epoch is redone on resume
    return {**results, "epochs": epochs, **tail}
