"""The store's subcommands: `stacktrain synth`, `stacktrain convert`, `stacktrain info`.

Heavy imports happen inside the command functions so that `stacktrain --help` stays fast. Errors are
raised as stores.errors types; train/cli.py prints them as one line and exits with 2.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .layout import CODECS, DEFAULT_CHUNK_ZYX, DEFAULT_FOREGROUND_THRESHOLD, DEFAULT_SHARD_ZYX

DEFAULT_MIN_PATCH_ZYX = (32, 256, 256)  # same as stores.convert.DEFAULT_MIN_PATCH_ZYX (not imported: heavy)
ZYX = ("Z", "Y", "X")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write deterministic synthetic raw stacks (every input format) and labels.csv",
        description="Write synthetic 3-channel raw stacks in every format `convert` reads, plus "
                    "OUT_DIR/labels.csv (path, stack_id, label, group).")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--stacks", type=int, default=None, help="number of stacks (default 12)")
    p.add_argument("--shape", type=int, nargs=3, metavar=ZYX, default=None,
                   help="stack size in voxels (default 32 256 256, the smallest that converts without --pad)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0); same seed, same bytes")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default=None, help="voxel type of every stack (default uint8)")
    p.set_defaults(func=synth_command)

    p = subparsers.add_parser(
        "convert", help="convert the raw stacks of a manifest into a GPU-decodable OME-Zarr store",
        description="Convert every stack listed in MANIFEST.csv (path, stack_id, label, group[, axes]; "
                    "paths relative to the CSV) into one Zarr v3 store. Manifest errors abort before any "
                    "write; a stack whose data is bad is reported and skipped, the others are converted, "
                    "and the command exits with 2. Reruns skip stacks already converted unchanged.")
    p.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    p.add_argument("--out", type=Path, required=True, metavar="STORE.zarr", help="the store to create or extend")
    p.add_argument("--workers", type=int, default=1, help="stacks converted in parallel processes (default 1)")
    p.add_argument("--codec", choices=CODECS, default="lz4",
                   help="lz4 (default): GPU-inflatable by DALI; zstd: core Zarr codec, any reader, CPU only")
    p.add_argument("--overwrite", action="store_true", help="reconvert stacks already in the store")
    p.add_argument("--axes", default=None,
                   help="source axis order for rows without an axes column, e.g. zyxc or czyx")
    p.add_argument("--replicate-channels", action="store_true",
                   help="copy a 1-channel source to the 3 stored channels")
    p.add_argument("--scale", choices=("none", "minmax", "clip"), default="none",
                   help="store other dtypes than uint8/uint16 as uint8: minmax per stack, or clip to 0..255")
    p.add_argument("--pad", action="store_true",
                   help="zero-pad stacks smaller than --min-patch (at the end of each axis)")
    p.add_argument("--chunk", type=int, nargs=3, metavar=ZYX, default=DEFAULT_CHUNK_ZYX,
                   help=f"chunk shape (default {' '.join(map(str, DEFAULT_CHUNK_ZYX))})")
    p.add_argument("--shard", type=int, nargs=3, metavar=ZYX, default=DEFAULT_SHARD_ZYX,
                   help=f"shard shape, a multiple of the chunk (default {' '.join(map(str, DEFAULT_SHARD_ZYX))})")
    p.add_argument("--min-patch", type=int, nargs=3, metavar=ZYX, default=DEFAULT_MIN_PATCH_ZYX,
                   help="smallest stack accepted without --pad (default 32 256 256)")
    p.add_argument("--foreground-threshold", type=int, default=DEFAULT_FOREGROUND_THRESHOLD,
                   help="voxels above this in any channel count as foreground in the patch statistics "
                        f"(default {DEFAULT_FOREGROUND_THRESHOLD})")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (failed stacks are still reported)")
    p.set_defaults(func=convert_command)

    p = subparsers.add_parser("info", help="list a store's stacks, sizes and compression",
                              description="Print every stack with label, group, shape, dtype, stored and "
                                          "raw sizes and compression ratio, plus totals per label.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=info_command)


def _console():
    """Rich console; when piped or captured, wide enough that tables are not cut to 80 columns."""
    import sys

    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 160)


def synth_command(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .sources import open_source
    from .synth import synth

    kwargs = {k: v for k, v in (("stacks", args.stacks), ("shape_zyx", args.shape), ("seed", args.seed),
                                          ("dtype", args.dtype))
              if v is not None}
    labels = synth(args.out_dir, **kwargs)
    table = Table("stack_id", "label", "group", "format", "shape (c,z,y,x)")
    with labels.open(newline="") as f:
        for row in csv.DictReader(f):
            src = open_source(labels.parent / row["path"], axes=row.get("axes") or None)
            table.add_row(row["stack_id"], row["label"], row["group"], src.format, "x".join(map(str, src.shape)))
    console = _console()
    console.print(table)
    console.print(f"wrote [bold]{labels}[/]; next: stacktrain convert {labels} --out STORE.zarr", highlight=False, soft_wrap=True)
    return 0


class RichProgress:
    """stores.convert.Progress as a rich bar: stacks done/total, MB/s of source data read, ETA.
    Failed stacks are printed (above the bar) as they happen, also with `bar=False`."""

    def __init__(self, console=None, *, bar: bool = True):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.bar = Progress(TextColumn("converting"), BarColumn(), TextColumn("{task.fields[stacks]} stacks"),
                            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                            console=console or Console(stderr=True), disable=not bar)
        self.sizes, self.done, self.finished, self.task = [], [], 0, None

    def start(self, sizes: list[int]) -> None:
        self.sizes, self.done = sizes, [0.0] * len(sizes)
        self.task = self.bar.add_task("convert", total=sum(sizes), stacks=f"0/{len(sizes)}")
        self.bar.start()

    def fraction(self, index: int, fraction: float) -> None:
        fraction = min(max(fraction, self.done[index]), 1.0)
        self.bar.advance(self.task, (fraction - self.done[index]) * self.sizes[index])
        self.done[index] = fraction

    def finish(self, index: int, outcome) -> None:
        """A converted stack counts in full; the rest of a skipped or failed one leaves the total (ETA)."""
        if outcome.status == "converted":
            self.fraction(index, 1.0)
        else:
            total = self.bar.tasks[0].total - (1.0 - self.done[index]) * self.sizes[index]
            self.bar.update(self.task, total=max(total, 0))
            self.done[index] = 1.0
        if outcome.error:
            self.bar.console.print(f"[bold red]failed:[/] {outcome.error}", highlight=False, soft_wrap=True)
        self.finished += 1
        self.bar.update(self.task, stacks=f"{self.finished}/{len(self.sizes)}")

    def stop(self) -> None:
        self.bar.stop()


def convert_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .convert import ConvertOptions, convert

    options = ConvertOptions(
        codec=args.codec, workers=args.workers, overwrite=args.overwrite, axes=args.axes,
        replicate_channels=args.replicate_channels, scale=args.scale, pad=args.pad,
        chunk_zyx=tuple(args.chunk), shard_zyx=tuple(args.shard), min_patch_zyx=tuple(args.min_patch),
        foreground_threshold=args.foreground_threshold)
    report = convert(args.manifest, args.out, options, progress=RichProgress(bar=not args.no_progress))
    Console().print(f"{report.store}: {report.summary()}", highlight=False, soft_wrap=True)
    return 0


def info_command(args: argparse.Namespace) -> int:
    from .info import render, summarize

    summary = summarize(args.store)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _console().print(render(summary))
    return 0
