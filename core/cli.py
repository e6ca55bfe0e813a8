"""`stacktrain`: the one command line, one subcommand per step of raw -> stores -> pipelines -> train.

Every subcommand and option is declared here, and only here. Convert options take their defaults,
choices and help from `stores.options.ConvertOptions`; choices elsewhere come from `stacktrain.choices`;
options whose default belongs to a library function are left out unless given, so that default applies.
The handlers (`stacktrain.commands`) import the heavy packages, so `stacktrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from stacktrain import __version__, commands, signals
from stacktrain.choices import Codec, Level, LoaderKind, OutDtype, options
from stacktrain.errors import StackTrainError, user_message
from stacktrain.stores.options import ConvertOptions
from stacktrain.ui import print_error

ZYX = ("Z", "Y", "X")
DHW = ("D", "H", "W")
KEEP = argparse.SUPPRESS  # leave the option out unless given: the library function's default applies


def _json_option(p: argparse.ArgumentParser, what: str) -> None:
    """`--json` means one thing everywhere: write `what` as JSON to PATH, or to stdout (`-`, or no PATH)."""
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help=f"write {what} as JSON to PATH (- or no PATH: standard output)")


def _convert_options(p: argparse.ArgumentParser) -> None:
    """One flag per ConvertOptions field, with the field's default, choices and docstring."""
    docs = commands.field_docs(ConvertOptions)
    for field in dataclasses.fields(ConvertOptions):
        flag = "--" + field.name.removesuffix("_zyx").replace("_", "-")
        kind = commands.field_kind(ConvertOptions, field.name)
        kw: dict = {"dest": field.name, "default": field.default, "help": docs.get(field.name, "")}
        if kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:  # --window LOW HIGH
            kw.update(nargs=len(typing.get_args(kind)), metavar=("LOW", "HIGH"))
        elif kind == "zyx":
            kw.update(type=int, nargs=3, metavar=ZYX)
            kw["help"] += f" (default {' '.join(map(str, field.default))})"
        elif isinstance(kind, tuple):
            kw.update(choices=kind)
            kw["help"] += f" (default {field.default})"
        else:
            kw.update(type=kind)
            if field.default is not None:
                kw["help"] += f" (default {field.default})"
        p.add_argument(flag, **kw)


def _stores(sub) -> None:
    p = sub.add_parser("synth", help="write deterministic synthetic raw stacks (every input format) and labels.csv",
                       description="Write synthetic 3-channel raw stacks in every format `convert` reads, plus "
                                   "OUT_DIR/labels.csv (path, stack_id, label, group).")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--stacks", type=int, default=KEEP, help="number of stacks (default 12)")
    p.add_argument("--shape", dest="shape_zyx", type=int, nargs=3, metavar=ZYX, default=KEEP,
                   help="stack size in voxels (default 32 256 256, the smallest that converts without --pad)")
    p.add_argument("--seed", type=int, default=KEEP, help="random seed (default 0); same seed, same bytes")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default=KEEP,
                   help="voxel type of every stack (default uint8)")
    p.add_argument("--prevalence", type=float, default=KEEP, help="share of MALADE stacks (default 0.5)")
    p.add_argument("--patient-effect", dest="patient_effect", type=float, default=KEEP,
                   help="staining, brightness and texture shared by a patient's stacks: 0 none (default), 1 strong")
    p.add_argument("--difficulty", type=float, default=KEEP,
                   help="0 (default) to 1: fainter, smaller lesions in fewer regions")
    p.set_defaults(func=commands.synth)

    p = sub.add_parser("convert", help="convert the raw stacks of a manifest into a GPU-decodable OME-Zarr store",
                       description="Convert every stack listed in MANIFEST.csv (path, stack_id, label, group[, "
                                   "axes]; paths relative to the CSV) into one Zarr v3 store. Manifest errors "
                                   "abort before any write; a stack whose data is bad is reported and skipped, "
                                   "the others are converted, and the command exits with 2. Reruns skip stacks "
                                   "already converted unchanged.")
    p.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    p.add_argument("--out", type=Path, required=True, metavar="STORE.zarr", help="the store to create or extend")
    _convert_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (failed stacks are still reported)")
    p.add_argument("--part", metavar="I/N", help="convert only part I of N of the manifest (rows I, I+N, I+2N, ...): "
                   "N processes, on N machines sharing the store's filesystem, convert into one store at once")
    p.add_argument("--stacks-from", dest="stacks_from", type=Path, metavar="FILE",
                   help="convert only the stacks whose ids FILE lists, one a line (instead of --part)")
    p.set_defaults(func=commands.convert)

    p = sub.add_parser("info", help="list a store's stacks, sizes and compression",
                       description="Print every stack with label, group, shape, dtype, stored and raw sizes and "
                                   "compression ratio, plus totals per label.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    _json_option(p, "the same summary")
    p.set_defaults(func=commands.info)

    p = sub.add_parser("verify", help="check every stack of a store against what its conversion recorded",
                       description="Check each stack: metadata and format version, every shard file present with "
                                   "its recorded size, no extra one, each shard index's checksum and chunk "
                                   "offsets. Prints ok / damaged per stack; exits with 2 if any is damaged.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("--deep", action="store_true",
                   help="also read every byte: file checksums, every chunk decoded, content checksums recorded "
                        "at conversion (slower: decodes the whole store)")
    p.set_defaults(func=commands.verify)

    p = sub.add_parser("export", help="copy a store in another codec (zstd: every Zarr reader opens it)",
                       description="Copy every stack of STORE into a new store with another codec: the same voxels, "
                                   "labels, groups and statistics. zstd is a core Zarr codec, for tools that lack "
                                   "numcodecs' LZ4 (tensorstore, zarrs, readers in other languages).")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("--out", type=Path, required=True, help="the new store (a new or empty folder)")
    p.add_argument("--codec", choices=options(Codec), default="zstd", help="codec of the copy (default zstd)")
    p.set_defaults(func=commands.export)

    p = sub.add_parser("relabel", help="change a stack's label (and group) without reconverting it",
                       description="Set a stack's label (and patient group) in its metadata and the store's list, "
                                   "atomically. Splits made before record the old labels: remake them.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("stack_id", metavar="STACK_ID")
    p.add_argument("label", metavar="LABEL", help="SAIN or MALADE (any case)")
    p.add_argument("--group", default=None, help="also set the patient group")
    p.set_defaults(func=commands.relabel)

    p = sub.add_parser("remove", help="remove stacks from a store (folders and list entries)",
                       description="Remove stacks from a store: out of the stack list first, then their folders. "
                                   "Also drops list entries whose folders were deleted by hand.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("stack_ids", nargs="+", metavar="STACK_ID")
    p.set_defaults(func=commands.remove)


def _train(sub) -> None:
    p = sub.add_parser("split", help="split a store's stacks into train/val(/test) by patient, stratified",
                       description="Split by stack, grouped by patient (`group`), stratified by label and seeded.")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("--out", type=Path, required=True, help="split file to write (JSON)")
    p.add_argument("--folds", type=int, default=KEEP, help="write K folds (cross-validation)")
    p.add_argument("--val-fraction", type=float, default=KEEP, help="share of stacks in val (default 0.2)")
    p.add_argument("--test-fraction", type=float, default=KEEP, help="share held out as test (default 0)")
    p.add_argument("--seed", type=int, default=KEEP, help="default 0")
    p.add_argument("--allow-one-class", action="store_true", default=KEEP,
                   help="keep a split whose train, val or test part holds one class only (warns)")
    p.set_defaults(func=commands.split)

    p = sub.add_parser("train", help="train a model on a store's split (one process, or one rank per GPU under "
                                     "torchrun)",
                       description="Train as CONFIG.toml says. CONFIG may name a packaged preset (`demo`, "
                                   "`seed-gpu`, or `preset:NAME`). Writes RUN_DIR/config.toml, "
                                   "training_results.json (one epoch appended at a time), last.pt, best.pt and "
                                   "tensorboard/. Under `torchrun --nproc_per_node=N` each rank trains on its "
                                   "share of every batch.")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="a config file or a preset name (optional with --resume: the run's saved config.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="run directory (default: train.out_dir / train.run_name, or <model>-<time>)")
    p.add_argument("--force", action="store_true",
                   help="start even when the training memory estimate exceeds the GPU's (or the host's) memory "
                        "(--set train.memory_check=false)")
    p.set_defaults(func=commands.train)

    p = sub.add_parser("predict", help="predict patches and stacks of a store or of raw stacks with a checkpoint; "
                                       "CSV, JSON, heatmaps",
                       description="Run a checkpoint over every patch of the stacks (all by default) and write "
                                   "DIR/patches.csv, DIR/stacks.csv, DIR/predictions.json and "
                                   "DIR/heatmaps/<stack>.png. Raw inputs (a manifest, labels optional, or stack "
                                   "files) are converted first as the training store was (its dtype and "
                                   "intensity mapping).")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="best.pt or last.pt of a run")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="a store (STORE.zarr), a manifest (.csv: path, stack_id[, label, group, axes]) or raw "
                        "stack files")
    p.add_argument("--store", type=Path, default=KEEP, metavar="STORE.zarr", dest="keep_store",
                   help="convert raw inputs into this store and keep it (default: a temporary store, removed)")
    p.add_argument("--workers", type=int, default=KEEP, help="processes converting raw inputs (default: the cores)")
    p.add_argument("--axes", default=KEEP, help="axis order of raw files that do not state theirs, e.g. zyxc")
    p.add_argument("--replicate-channels", action="store_true", default=KEEP,
                   help="copy 1-channel raw inputs to the 3 channels")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--stacks", nargs="+", metavar="ID", default=KEEP, help="stack ids to predict (default: all)")
    p.add_argument("--loader", choices=options(LoaderKind), default=KEEP,
                   help="loader (default auto: dali on a GPU, else dali-cpu)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=KEEP, help="default auto")
    p.add_argument("--batch-size", type=int, default=KEEP, help="default: the checkpoint's loader.batch_size")
    p.set_defaults(func=commands.predict)

    p = sub.add_parser("demo", help="synth -> convert -> split -> train a tiny model on the CPU, print the metrics",
                       description="The embedded demo (`make demo`): synthetic stacks, a store, a split, and a "
                                   "few minutes of CPU training with the `demo` preset; prints patch- and "
                                   "stack-level metrics per epoch.")
    p.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="work directory (default demo-out)")
    p.add_argument("--epochs", type=int, default=KEEP, help="override the preset's epochs")
    p.set_defaults(func=commands.demo)


def _study(sub) -> None:
    p = sub.add_parser("study", help="run every (variant, model, fold) of a study file, or its Optuna search; "
                                     "resumable",
                       description="Run a study: preprocessing variants x models x folds (phases 1-2), or an "
                                   "Optuna search when the file has an [hpo] table (phase 3). STUDY may name a "
                                   "packaged study (e.g. `example-cpu`). Rerun the same command to resume.")
    p.add_argument("study", metavar="STUDY", help="a study file or a packaged study's name")
    p.add_argument("--out", type=Path, required=True, help="study directory (created; rerun with it to resume)")
    p.add_argument("--workers", type=int, default=KEEP, help="trainings in parallel processes (default 1)")
    p.add_argument("--trials", type=int, default=KEEP, help="phase 3: total trials (default: hpo.trials)")
    p.add_argument("--final", action="store_true", default=KEEP,
                   help="then evaluate the selected configuration on the split's held-out test part, once "
                        "(its fold models as an ensemble; DIR/final.json)")
    p.add_argument("--print-runs", dest="print_only", action="store_true", default=KEEP,
                   help="list the runs (index, state, holder, directory) and exit: for a scheduler's array size")
    p.add_argument("--storage", default=KEEP, metavar="URL",
                   help="phase 3: the Optuna storage shared by every machine (else $STACKTRAIN_STORAGE, else "
                        "hpo.storage, else sqlite in DIR); its password is never written to a file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run, after the study file's own (repeatable)")
    p.set_defaults(func=commands.study)

    p = sub.add_parser("report", help="compare a study's variants: tables with bootstrap CIs, paired differences, "
                                      "plots",
                       description="Report a study directory: per variant and level, F1/accuracy/ROC-AUC as "
                                   "mean ± std over folds x seeds with 95%% bootstrap CIs over patients, paired "
                                   "differences against the baseline, PNG plots, and which variant is best.")
    p.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="the --out directory of `stacktrain study`")
    p.add_argument("--level", choices=options(Level), default=KEEP,
                   help="level of the verdict (default: the runs' train.select_level)")
    p.add_argument("--resamples", dest="n_resamples", type=int, default=KEEP,
                   help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=KEEP, help="bootstrap seed (default 0)")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=KEEP, help="skip the PNG plots")
    p.add_argument("--storage", default=KEEP, metavar="URL",
                   help="a search's Optuna storage, when its recorded URL had a password (else $STACKTRAIN_STORAGE)")
    p.set_defaults(func=commands.report)


def _bench_common(p: argparse.ArgumentParser, segments: int | None = 5) -> None:
    g = p.add_argument_group("measurement and output")
    g.add_argument("--segments", type=int, default=segments,
                   help="timed segments; the median is reported" + ("" if segments else " (default: 3 on CPU, 5 on "
                                                                      "GPU)"))
    g.add_argument("--warmup", type=int, default=1, help="untimed segments first")
    g.add_argument("--seed", type=int, default=0)
    _json_option(g, "the full results (every segment)")
    g.add_argument("--record", type=Path, nargs="?", const=Path("benchmarks/results"), metavar="DIR",
                   help="merge into DIR/<machine>-<date>.json and .md (default DIR: benchmarks/results)")
    g.add_argument("--cache", type=Path, help="where generated stores are kept between runs "
                   "(default: $STACKTRAIN_BENCH_CACHE or <tmp>/stacktrain-bench)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _bench_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, help="a stacktrain store; default: a generated tissue-like store")
    p.add_argument("--stacks", type=int, default=4, help="stacks in the generated store")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=ZYX,
                   help="shape of each generated stack")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _bench(sub) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks: loader, store, convert, model, train",
                           description="Throughput against ceilings measured in the same run. Every bench prints "
                                       "rich tables, writes --json when asked, and with --record [DIR] merges its "
                                       "numbers into DIR/<machine>-<date>.json and .md.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    p = bsub.add_parser("loader", help="patches/s of each loader against ceilings (a) RAM, (b) bytes, (c) decode")
    _bench_store_args(p)
    p.add_argument("--loaders", type=_csv, help="comma-separated: dali, dali-cpu, torch (default: all this "
                   "machine runs)")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=DHW)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, help="loader workers, and cores for the ceilings (default: all cores)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--dtype", choices=options(OutDtype), help="delivered dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--profile", action="store_true", help="add a stage-by-stage CPU profile of one dali-cpu patch")
    _bench_common(p)
    p.set_defaults(func=commands.bench_loader)

    p = bsub.add_parser("store", help="random aligned / unaligned patch reads over chunk, shard and codec layouts")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=ZYX)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=DHW)
    p.add_argument("--codecs", type=_csv, default=["lz4", "zstd", "blosc-lz4"])
    p.add_argument("--layouts", type=_csv, help="comma-separated CHUNK/SHARD, e.g. 16x64x64/32x256x256 "
                   "(default: five layouts around the store's default)")
    p.add_argument("--patches", type=int, default=8, help="random patches of each kind per segment")
    _bench_common(p)
    p.set_defaults(func=commands.bench_store)

    p = bsub.add_parser("convert", help="`stacktrain convert` against the read+compress ceiling and a plain "
                                        "zarr-python writer, on generated TIFF / .npy stacks")
    p.add_argument("--stacks", type=int, default=4, help="generated stacks per format")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 1024, 1024], metavar=ZYX,
                   help="shape of each generated stack (3 channels, uint8)")
    p.add_argument("--formats", type=_csv, default=["tiff", "npy"], help="comma-separated input formats: tiff, npy")
    p.add_argument("--workers", type=int, help="processes for the ceiling, the peer and convert N (default: all cores)")
    _bench_common(p, segments=3)
    p.set_defaults(func=commands.bench_convert)

    p = bsub.add_parser("model", help="forward+backward patches/s, peak memory, FLOPs, TFLOP/s of each model")
    p.add_argument("--models", type=_csv, help="comma-separated registry names (default: every registered model)")
    p.add_argument("--patch", type=int, nargs=3, metavar=DHW, help="default: 32 256 256 on GPU, 32 64 64 on CPU")
    p.add_argument("--batch", type=int, help="default: 64 on GPU, 1 on CPU")
    p.add_argument("--precision", choices=options(OutDtype), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="the models' tiny flavors")
    p.add_argument("--peak-tflops", type=float, help="the device's matmul peak; default: measured in this run")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=1, help="training steps per segment")
    _bench_common(p, segments=None)
    p.set_defaults(func=commands.bench_model)

    p = bsub.add_parser("train", help="real steps with the real loader vs synthetic on-device batches")
    _bench_store_args(p)
    p.add_argument("--loader", choices=options(LoaderKind), default="auto")
    p.add_argument("--model", help="registry name (default: resnet3d50 on GPU, tiny resnet3d18 on CPU)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--patch", type=int, nargs=3, metavar=DHW)
    p.add_argument("--stride", type=int, nargs=3, metavar=DHW)
    p.add_argument("--batch", type=int)
    p.add_argument("--precision", choices=options(OutDtype))
    p.add_argument("--workers", type=int)
    p.add_argument("--steps", type=int, help="training steps per segment (default: 4 on GPU, 2 on CPU)")
    _bench_common(p)
    p.set_defaults(func=commands.bench_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stacktrain",
        description="Patch-wise classification of 3-D stacks: convert to Zarr, load with DALI, train.")
    parser.add_argument("--version", action="version", version=f"stacktrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_stores, _train, _study, _bench):  # the order of the data flow
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with signals.installed():  # SIGTERM unwinds like Ctrl-C: locks, claims, workers, staging cleaned up
            return int(args.func(args) or 0)
    except StackTrainError as e:
        print_error(user_message(e))
        return 2
    except KeyboardInterrupt as e:  # signals.Interrupted too: 130 for SIGINT, 143 for SIGTERM
        print_error("interrupted")
        return signals.exit_code(e)
    except BrokenPipeError:  # `stacktrain info --json | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # a loader worker's StackTrainError, wrapped by torch or DALI: still one line
        message = user_message(e)
        if message is None:
            raise
        print_error(message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
