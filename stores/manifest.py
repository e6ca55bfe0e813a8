"""Read a conversion manifest (labels.csv) and check every row before anything is written.

The manifest is a CSV with the columns `path, stack_id, label, group` and an optional `axes`; paths
are relative to the CSV's folder. A manifest of stacks to predict on (`allow_unlabeled`: `convert
--allow-unlabeled`, `predict` on a manifest) may leave `label` empty or out (an unlabeled stack), and
`group` too (the stack is its own patient). Real spreadsheets vary, so the delimiter is sniffed (`,`, `;` or tab:
what a French Excel writes), headers and labels are case-insensitive (`Path`, `Stack_ID`, `sain`), and a
column nobody knows is an error rather than silently ignored. Problems here are the user's
bookkeeping, not the data's, so they abort the whole run up front: every problem of every row is
reported in one error.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import stat
from collections import Counter
from pathlib import Path

from stacktrain.errors import InputError

from .guards import one_line
from .layout import LABELS, UNLABELED, check_stack_id

REQUIRED_COLUMNS = ("path", "stack_id", "label", "group")
PREDICT_COLUMNS = ("path", "stack_id")  # what a manifest of stacks to predict on needs
OPTIONAL_COLUMNS = ("axes",)
EXTRA = "\0extra"  # the cells of a row beyond the header's columns
DELIMITERS = ",;\t"
AXIS_LETTERS = frozenset("czyx")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """One stack to convert, as the manifest names it."""

    line: int  # line number in the CSV (the header is line 1), for error messages
    path: Path  # resolved source path
    stack_id: str
    label: str
    group: str
    axes: str | None  # source axis order, e.g. "zyxc"; None lets the reader infer it
    axes_from_option: bool = False  # `axes` is --axes (a default for ambiguous files), not the row's cell

    @property
    def where(self) -> str:
        """How messages name this row: 'stack_id (file, manifest line N)'."""
        return f"stack {self.stack_id!r} ({self.path}, manifest line {self.line})"


def check_axes(axes: str) -> str | None:
    """Why `axes` is not a valid axis order over c, z, y, x, or None when it is."""
    letters = set(axes)
    if not letters <= AXIS_LETTERS or len(letters) != len(axes) or not {"z", "y", "x"} <= letters:
        return (f"axes {axes!r} is not an axis order: use each of z, y, x once and optionally c, "
                "e.g. 'zyx', 'zyxc' or 'czyx'")
    return None


def _encoding(csv_path: Path) -> str:
    """UTF-8 (with or without the BOM Excel writes), or UTF-16 when a BOM says so (Excel's "Unicode text")."""
    with csv_path.open("rb") as f:
        head = f.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def _read_records(csv_path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[tuple[int, dict[str, str]]]:
    """(line, {lower-case column: stripped cell}) per row, with the delimiter sniffed from the header.
    A row with more cells than the header has columns gets the key EXTRA (a problem of that row)."""
    with csv_path.open(newline="", encoding=_encoding(csv_path)) as f:
        head = f.readline()
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(head, delimiters=DELIMITERS)
        except csv.Error:  # one column, or nothing to tell: the standard comma
            dialect = csv.excel
        reader = csv.DictReader(f, dialect=dialect, skipinitialspace=True)
        columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            optional = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c not in required]
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; the header must "
                             f"have {', '.join(required)} (and optionally {', '.join(optional)}), separated by "
                             "commas, semicolons or tabs")
        unknown = [c for c in columns if c and c not in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)]
        if unknown:
            raise InputError(f"{csv_path}: unknown column(s) {', '.join(map(repr, unknown))}; the known ones "
                             f"are {', '.join((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS))}")
        if twice := sorted(c for c, n in Counter(columns).items() if n > 1 and c):
            raise InputError(f"{csv_path}: column(s) {', '.join(map(repr, twice))} appear more than once in the "
                             "header; keep one of each")
        records = []
        for rec in reader:
            cells = {EXTRA if k is None else k.strip().lower(): _cell(v) for k, v in rec.items()}
            if not any(cells.values()):  # a spreadsheet's blank row (",,,")
                continue
            if cells.pop("", ""):  # Excel's trailing unnamed columns are fine while they are empty
                raise InputError(f"{csv_path}: line {reader.line_num} has a value in a column without a header "
                                 "name; name the column or clear it")
            records.append((reader.line_num, cells))
        return records


def _cell(value) -> str:
    return " ".join(value) if isinstance(value, list) else (value or "").strip()


def _path_problem(path: Path, raw_path: str) -> str | None:
    """Why `path` cannot be read as a stack: missing, a symlink loop, or not a regular file or folder
    (a FIFO would block the conversion forever; a device or socket is no image)."""
    if "\0" in raw_path:
        return f"path {raw_path!r} contains a NUL character; fix the path cell"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"file {raw_path!r} is a symlink to {os.readlink(path)!r}, which does not exist; fix the link"
        return f"file {raw_path!r} not found (looked for {path}); paths are relative to the manifest's folder"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"file {raw_path!r} is a symlink loop; point it at the real file"
        return f"file {raw_path!r} cannot be read ({e.strerror})"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return f"file {raw_path!r} is not a regular file or folder (a FIFO, device or socket); give the image file"
    return None


def read_manifest(csv_path: str | Path, *, default_axes: str | None = None,
                  label_map: dict[str, str] | None = None, allow_unlabeled: bool = False) -> list[ManifestRow]:
    """Parse and validate the manifest; raise one InputError listing every bad row.

    `default_axes` (the --axes option) applies to rows whose `axes` cell is empty or absent;
    `label_map` (--label-map, lower-case words) names the lab's own label words; `allow_unlabeled`
    accepts an empty (or absent) label, stored as UNLABELED, and an empty group (the stack id).
    """
    label_map = label_map or {}
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: manifest not found; give the labels.csv written by "
                         "`stacktrain synth` or one with the columns path, stack_id, label, group")
    if default_axes is not None and (why := check_axes(default_axes)):
        raise InputError(f"--axes: {why}")
    try:
        records = _read_records(csv_path, PREDICT_COLUMNS if allow_unlabeled else REQUIRED_COLUMNS)
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{csv_path}: not a readable CSV ({one_line(e)}); save it as UTF-8 CSV") from None
    if not records:
        raise InputError(f"{csv_path}: the manifest has no rows; add one row per stack")

    rows, problems, first_line = [], [], {}
    for line, rec in records:
        sid, group, raw_path, word = rec["stack_id"], rec.get("group", ""), rec["path"], rec.get("label", "")
        label = label_map.get(word.strip().lower(), word.strip().upper())
        if allow_unlabeled:
            group = group or sid  # an unlabeled stack of unknown patient is its own

        axes = rec.get("axes") or default_axes
        from_option = not rec.get("axes") and default_axes is not None
        here = f"line {line}"
        if EXTRA in rec:
            problems.append(f"{here}: more cells than the header has columns (extra: {rec[EXTRA]!r}); quote cells "
                            "that contain the delimiter")
        if why := check_stack_id(sid):
            problems.append(f"{here}: {why}")
        elif sid in first_line:
            problems.append(f"{here}: duplicate stack_id {sid!r} (first on line {first_line[sid]}); "
                            "every stack needs its own id")
        else:
            first_line[sid] = line
        if label not in LABELS and not (allow_unlabeled and label == UNLABELED):
            known = ", ".join([*LABELS, *label_map])
            if not word:
                problems.append(f"{here}: empty label; give one of {known}, or pass --allow-unlabeled to keep "
                                "it as a stack to predict on (never trained on)")
            else:
                problems.append(f"{here}: unknown label {word!r}; use one of {known} (any case), or map the "
                                "lab's words with --label-map WORD=SAIN,WORD=MALADE")
        if not group:
            problems.append(f"{here}: empty group; give the patient id (stacks of one patient share it)")
        path = csv_path.parent / raw_path if raw_path else None
        if path is None:
            problems.append(f"{here}: empty path")
        elif why := _path_problem(path, raw_path):
            problems.append(f"{here}: {why}")
        else:
            path = path.resolve()
        if axes and (why := check_axes(axes)):
            problems.append(f"{here}: {why}")
        if path is not None:
            rows.append(ManifestRow(line=line, path=path, stack_id=sid, label=label, group=group,
                                    axes=axes or None, axes_from_option=from_option))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise InputError(f"{csv_path}: {len(problems)} problem(s), nothing was converted: {shown}")
    return rows
