"""What each `stacktrain` subcommand does with its parsed arguments: check what only the command line can
get wrong, call the library, print the result. Heavy packages are imported here, per command."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import sys
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any

from stacktrain.errors import ConfigError, InputError


# -- helpers for the parser ------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (the one source of option help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_kind(cls: type, name: str):
    """bool, int, float, str, "zyx" (three ints) or the tuple of a Literal's choices."""
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return "zyx"
    if args and typing.get_origin(tp) is not typing.Literal:  # Optional[X]
        return args[0]
    return tp


def _given(args: Namespace, *names: str) -> dict[str, Any]:
    """The named options the user gave (absent ones keep the library's defaults)."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def emit_json(obj: Any, dest: str) -> None:
    """`--json PATH`: to stdout for `-`, else atomically to PATH."""
    if dest == "-":
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()
        return
    from stacktrain.io import atomic_write_json
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


# -- stores ----------------------------------------------------------------------------------------
def synth(args: Namespace) -> int:
    from rich.table import Table

    from stacktrain import ui
    from stacktrain.stores.sources import open_source
    from stacktrain.stores.synth import synth as write_synth

    kw = _given(args, "stacks", "shape_zyx", "seed", "dtype", "prevalence", "patient_effect", "difficulty")
    if "shape_zyx" in kw:
        kw["shape_zyx"] = tuple(kw["shape_zyx"])
    labels = write_synth(args.out_dir, **kw)
    table = Table("stack_id", "label", "group", "format", "shape (c,z,y,x)")
    import csv
    with labels.open(newline="") as f:
        for row in csv.DictReader(f):
            src = open_source(labels.parent / row["path"], axes=row.get("axes") or None)
            table.add_row(row["stack_id"], row["label"], row["group"], src.format, "x".join(map(str, src.shape)))
    con = ui.console()
    con.print(table)
    con.print(f"wrote [bold]{labels}[/]; next: stacktrain convert {labels} --out STORE.zarr", highlight=False,
              soft_wrap=True)
    return 0


def convert(args: Namespace) -> int:
    from stacktrain import ui
    from stacktrain.stores.convert import convert as run_convert
    from stacktrain.stores.options import ConvertOptions

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertOptions)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    opts = ConvertOptions(**values)
    report = run_convert(args.manifest, args.out, opts, progress=ui.ConvertBar(bar=not args.no_progress),
                         part=args.part, stacks_from=args.stacks_from)
    con = ui.console()
    for o in report.outcomes:  # stacks a killed or damaged earlier run left incomplete; notes
        if o.redone:
            con.print(f"{o.stack_id}: reconverted, the stored stack was incomplete: {o.redone}", highlight=False,
                      soft_wrap=True, markup=False)
        if o.note:
            con.print(f"{o.stack_id}: {o.note}", highlight=False, soft_wrap=True, markup=False)
    con.print(f"{report.store}: {report.summary()}", highlight=False, soft_wrap=True)
    return 0


def info(args: Namespace) -> int:
    from stacktrain import ui
    from stacktrain.stores.info import render, summarize

    summary = summarize(args.store)
    if args.json is not None:
        emit_json(summary, args.json)
    if args.json != "-":
        con = ui.console()
        con.print(render(summary))
        for why in summary["damaged"].values():  # listed but unreadable: named, with the way out
            con.print(f"damaged: {why}", style="bold red", markup=False, highlight=False, soft_wrap=True)
    return 0


def export(args: Namespace) -> int:
    from stacktrain import ui
    from stacktrain.stores.export import export as run_export

    con = ui.console()
    with ui.count_bar(con=con) as bar:
        task = bar.add_task("exporting", total=None)
        copied = run_export(args.store, args.out, codec=args.codec,
                            progress=lambda done, total, sid: bar.update(task, completed=done, total=total))
    con.print(f"{args.out}: {len(copied)} stacks copied from {args.store} with {args.codec}", highlight=False,
              soft_wrap=True)
    return 0


def relabel(args: Namespace) -> int:
    from stacktrain.stores.maintain import relabel as run_relabel

    meta = run_relabel(args.store, args.stack_id, args.label, args.group)
    print(f"{args.store}: {meta.stack_id} is now {meta.label} (group {meta.group})")
    return 0


def remove(args: Namespace) -> int:
    from stacktrain.stores.maintain import remove as run_remove

    removed = run_remove(args.store, args.stack_ids)
    print(f"{args.store}: removed {', '.join(removed)}")
    return 0


def verify(args: Namespace) -> int:
    from stacktrain import ui
    from stacktrain.errors import StoreError
    from stacktrain.stores.verify import NO_RECORD, render, verify_store

    checks = verify_store(args.store, deep=args.deep)
    con = ui.console()
    con.print(render(checks, args.deep))
    bad = [c.stack_id for c in checks if not c.ok]
    if bad:
        names = ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise StoreError(f"{args.store}: {len(bad)} of {len(checks)} stacks are damaged ({names}); reconvert "
                         "them (`stacktrain convert` redoes incomplete stacks; --overwrite redoes the rest)")
    old = sum(c.note == NO_RECORD for c in checks)
    note = f"; {old} without a completeness record ({NO_RECORD})" if old else ""
    con.print(f"{args.store}: {len(checks)} stacks ok{note}", highlight=False, soft_wrap=True)
    return 0


# -- one run ---------------------------------------------------------------------------------------
def split(args: Namespace) -> int:
    from stacktrain import ui
    from stacktrain.train.split import make_splits, split_table, write_split

    result = make_splits(args.store, **_given(args, "folds", "val_fraction", "test_fraction", "seed",
                                               "allow_one_class"))
    write_split(result, args.out)
    con = ui.console()
    con.print(split_table(result, args.store))
    if result["unlabeled"]:
        con.print(f"{len(result['unlabeled'])} unlabeled stack(s) left out (for prediction only): "
                  f"{', '.join(result['unlabeled'][:10])}", highlight=False, soft_wrap=True)
    con.print(f"wrote {args.out} (sha256 {result['sha256'][:12]})", highlight=False)
    return 0


def train(args: Namespace) -> int:
    from stacktrain.train.config import load_config, resolve_run_dir
    from stacktrain.train.loop import CONFIG_NAME
    from stacktrain.train.loop import train as run_train

    config = args.config
    if config is None and args.resume is not None:
        config = Path(args.resume) / CONFIG_NAME  # the resolved config the run saved
    if config is None:
        raise ConfigError("give a CONFIG.toml or a preset name (demo, seed-gpu), or --resume RUN_DIR")
    cfg = load_config(config, [*args.set, *(["train.memory_check=false"] if args.force else [])])
    run_dir = Path(args.resume or args.run_dir or resolve_run_dir(cfg))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.resume or args.run_dir or cfg.train.run_name):
        from stacktrain.train.runtime import setup_runtime  # ranks may disagree on a timestamp: take rank 0's
        run_dir = Path(setup_runtime(cfg.train.device).broadcast(str(run_dir)))
    run_train(cfg, run_dir=run_dir, resume=args.resume is not None)
    return 0


def predict(args: Namespace) -> int:
    from stacktrain.train.predict import predict as run_predict

    conversion = _given(args, "workers", "axes", "replicate_channels")
    run_predict(args.checkpoint, args.inputs, args.out, convert_options=conversion,
                **_given(args, "stacks", "keep_store", "loader", "device", "batch_size"))
    return 0


def demo(args: Namespace) -> int:
    from stacktrain.train.demo import run_demo

    run_demo(**_given(args, "out", "epochs"))
    return 0


# -- studies ---------------------------------------------------------------------------------------
def study(args: Namespace) -> int:
    from stacktrain.train.study.runner import run_study

    run_study(args.study, args.out, overrides=args.overrides,
              **_given(args, "workers", "trials", "final", "storage", "print_only"))
    return 0


def report(args: Namespace) -> int:
    from stacktrain.train.study.report import report as run_report

    run_report(args.study_dir, **_given(args, "level", "n_resamples", "seed", "plots", "storage"))
    return 0


# -- benchmarks ------------------------------------------------------------------------------------
def _check_bench(args: Namespace) -> None:
    if (args.segments is not None and args.segments < 1) or args.warmup < 0:
        raise InputError(f"--segments {args.segments} --warmup {args.warmup}: measure at least one segment "
                         "and give a warm-up of 0 or more")
    for name in ("patch", "shape", "stride"):
        values = getattr(args, name, None)
        if values is not None and any(v < 1 for v in values):
            raise InputError(f"--{name} {' '.join(map(str, values))}: every size must be at least 1")
    for name in ("batch", "workers", "stacks", "patches", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name} {value}: must be at least 1")
    if getattr(args, "store", None) is not None and not Path(args.store).is_dir():
        raise InputError(f"--store {args.store}: no such store; create one with `stacktrain convert`, or leave "
                         "--store out to use a generated one")


def _run_bench(args: Namespace, fn, **kw) -> int:
    from stacktrain.bench import report as bench_report

    _check_bench(args)
    with bench_report.progress(not args.quiet, args.warmup + (args.segments or 5)) as tick:
        result = fn(tick=tick, **kw)
    bench_report.print_tables(result, stderr=args.json == "-")
    if args.json is not None:
        emit_json(result, args.json)
    if args.record:
        print(f"recorded in {bench_report.record(result, args.record)}", file=sys.stderr if args.json == "-"
              else sys.stdout)
    return 0


def _unknown(flag: str, given, known) -> None:
    unknown = sorted(set(given or []) - set(known))
    if unknown:
        raise InputError(f"{flag} {','.join(unknown)}: unknown; choose from {', '.join(known)}")


def bench_loader(args: Namespace) -> int:
    from stacktrain.bench.loader_bench import LOADERS
    from stacktrain.bench.loader_bench import bench_loader as run

    _unknown("--loaders", args.loaders, LOADERS)
    return _run_bench(args, run, store=args.store, cache=args.cache, stacks=args.stacks, shape_zyx=args.shape,
                      loaders=args.loaders, patch=args.patch, batch=args.batch, workers=args.workers,
                      prefetch=args.prefetch, dtype=args.dtype, segments=args.segments, warmup=args.warmup,
                      seed=args.seed, profile=args.profile)


def _layouts(specs: list[str] | None):
    from stacktrain.bench.store_bench import LAYOUTS
    if not specs:
        return LAYOUTS
    out = []
    for spec in specs:
        try:
            chunk, shard = (tuple(int(v) for v in part.split("x")) for part in spec.split("/"))
            if len(chunk) != 3 or len(shard) != 3 or any(s % c for s, c in zip(shard, chunk)) or min(chunk) < 1:
                raise ValueError
        except ValueError:
            raise InputError(f"--layouts {spec!r}: write CHUNK/SHARD as ZxYxX/ZxYxX with the shard a multiple "
                             "of the chunk, e.g. 16x64x64/32x256x256") from None
        out.append((chunk, shard))
    return tuple(out)


def bench_store(args: Namespace) -> int:
    from stacktrain.bench.store_bench import CODECS
    from stacktrain.bench.store_bench import bench_store as run

    _unknown("--codecs", args.codecs, CODECS)
    if any(p > s for p, s in zip(args.patch, args.shape)):
        raise InputError(f"--patch {args.patch} is larger than the stack --shape {args.shape}")
    return _run_bench(args, run, cache=args.cache, shape_zyx=tuple(args.shape), patch=tuple(args.patch),
                      layouts=_layouts(args.layouts), codecs=args.codecs, patches=args.patches,
                      segments=args.segments, warmup=args.warmup, seed=args.seed)


def bench_convert(args: Namespace) -> int:
    from stacktrain.bench.convert_bench import bench_convert as run
    from stacktrain.bench.convert_runs import FORMATS

    _unknown("--formats", args.formats, FORMATS)
    if not args.formats:
        raise InputError(f"--formats: give at least one of {', '.join(FORMATS)}")
    return _run_bench(args, run, cache=args.cache, stacks=args.stacks, shape_zyx=tuple(args.shape),
                      formats=tuple(args.formats), workers=args.workers, segments=args.segments,
                      warmup=args.warmup, seed=args.seed)


def bench_model(args: Namespace) -> int:
    import torch

    from stacktrain.bench.model_bench import bench_model as run
    from stacktrain.bench.model_bench import defaults

    args.segments = args.segments or defaults(torch.cuda.is_available())["segments"]
    return _run_bench(args, run, models=args.models, patch=args.patch, batch=args.batch, precision=args.precision,
                      tiny=args.tiny, peak_tflops=args.peak_tflops, channels_last=args.channels_last,
                      segments=args.segments, warmup=args.warmup, steps_per_segment=args.steps, seed=args.seed)


def bench_train(args: Namespace) -> int:
    from stacktrain.bench.train_bench import bench_train as run

    return _run_bench(args, run, store=args.store, cache=args.cache, stacks=args.stacks, shape_zyx=args.shape,
                      loader=args.loader, model=args.model, tiny=args.tiny, patch=args.patch, stride=args.stride,
                      batch=args.batch, precision=args.precision, workers=args.workers, segments=args.segments,
                      warmup=args.warmup, steps_per_segment=args.steps, seed=args.seed)
