"""`stacktrain bench {loader,store,model,train}`: throughput against ceilings measured in the same run.

Every bench prints rich tables, writes `--json OUT.json` when asked, and with `--record [DIR]` merges
its numbers into DIR/<machine>-<date>.json + .md (default DIR: benchmarks/results). Heavy imports
happen inside the command functions so that `stacktrain --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stores.errors import InputError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive(values, what: str) -> tuple[int, ...]:
    if values is None:
        return None
    if any(v < 1 for v in values):
        raise InputError(f"{what} {' '.join(map(str, values))}: every size must be at least 1")
    return tuple(values)


def _common(p: argparse.ArgumentParser, segments: int | None = 5) -> None:
    g = p.add_argument_group("measurement and output")
    g.add_argument("--segments", type=int, default=segments,
                   help="timed segments; the median is reported" + ("" if segments else " (default: 3 on CPU, 5 on GPU)"))
    g.add_argument("--warmup", type=int, default=1, help="untimed segments first")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", type=Path, metavar="OUT.json", help="write the full results (every segment) here")
    g.add_argument("--record", type=Path, nargs="?", const=Path("benchmarks/results"), metavar="DIR",
                   help="merge into DIR/<machine>-<date>.json and .md (default DIR: benchmarks/results)")
    g.add_argument("--cache", type=Path, help="where generated stores are kept between runs "
                   "(default: $STACKTRAIN_BENCH_CACHE or <tmp>/stacktrain-bench)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, help="a stacktrain store; default: a generated tissue-like store")
    p.add_argument("--stacks", type=int, default=4, help="stacks in the generated store")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"),
                   help="shape of each generated stack")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="throughput benchmarks: loader, store, model, train",
                                  description=__doc__.split("\n\n")[0])
    sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    p = sub.add_parser("loader", help="patches/s of each loader against ceilings (a) RAM, (b) bytes, (c) decode")
    _store_args(p)
    p.add_argument("--loaders", type=_csv, help="comma-separated: dali, dali-cpu, torch (default: all this "
                   "machine runs)")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, help="loader workers, and cores for the ceilings (default: all cores)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="delivered dtype (default: bf16 on GPU, "
                   "fp32 on CPU)")
    p.add_argument("--profile", action="store_true", help="add a stage-by-stage CPU profile of one dali-cpu patch")
    _common(p)
    p.set_defaults(func=run_loader)

    p = sub.add_parser("store", help="random aligned / unaligned patch reads over chunk, shard and codec layouts")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    p.add_argument("--codecs", type=_csv, default=["lz4", "zstd", "blosc-lz4"])
    p.add_argument("--layouts", type=_csv, help="comma-separated CHUNK/SHARD, e.g. 16x64x64/32x256x256 "
                   "(default: five layouts around the store's default)")
    p.add_argument("--patches", type=int, default=8, help="random patches of each kind per segment")
    _common(p)
    p.set_defaults(func=run_store)

    p = sub.add_parser("model", help="forward+backward patches/s, peak memory, FLOPs, TFLOP/s of each model")
    p.add_argument("--models", type=_csv, help="comma-separated registry names (default: every registered model)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), help="default: 32 256 256 on GPU, "
                   "32 64 64 on CPU")
    p.add_argument("--batch", type=int, help="default: 64 on GPU, 1 on CPU")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="the models' tiny flavors")
    p.add_argument("--peak-tflops", type=float, help="the device's matmul peak; default: measured in this run")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=1, help="training steps per segment")
    _common(p, segments=None)
    p.set_defaults(func=run_model)

    p = sub.add_parser("train", help="real steps with the real loader vs synthetic on-device batches")
    _store_args(p)
    p.add_argument("--loader", choices=["auto", "dali", "dali-cpu", "torch"], default="auto")
    p.add_argument("--model", help="registry name (default: resnet3d50 on GPU, tiny resnet3d18 on CPU)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--stride", type=int, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--workers", type=int)
    p.add_argument("--steps", type=int, help="training steps per segment (default: 4 on GPU, 2 on CPU)")
    _common(p)
    p.set_defaults(func=run_train)


def _check(args) -> None:
    if (args.segments is not None and args.segments < 1) or args.warmup < 0:
        raise InputError(f"--segments {args.segments} --warmup {args.warmup}: measure at least one segment "
                         "and give a warm-up of 0 or more")
    for name in ("patch", "shape", "stride"):
        _positive(getattr(args, name, None), f"--{name}")
    for name in ("batch", "workers", "stacks", "patches", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name} {value}: must be at least 1")
    if getattr(args, "store", None) is not None and not Path(args.store).is_dir():
        raise InputError(f"--store {args.store}: no such store; create one with `stacktrain convert`, or leave "
                         "--store out to use a generated one")


def _finish(args, result: dict) -> int:
    from . import report
    report.print_tables(result)
    if args.json:
        report.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.record:
        print(f"recorded in {report.record(result, args.record)}")
    return 0


def _run(args, fn, **kw) -> int:
    from . import report
    _check(args)
    steps = args.warmup + (args.segments or 5)
    with report.progress(not args.quiet, steps) as tick:
        result = fn(tick=tick, **kw)
    return _finish(args, result)


def run_loader(args) -> int:
    from .loader_bench import LOADERS, bench_loader
    unknown = sorted(set(args.loaders or []) - set(LOADERS))
    if unknown:
        raise InputError(f"--loaders {','.join(unknown)}: unknown; choose from {', '.join(LOADERS)}")
    return _run(args, bench_loader, store=args.store, cache=args.cache, stacks=args.stacks, shape_zyx=args.shape,
                loaders=args.loaders, patch=args.patch, batch=args.batch, workers=args.workers, prefetch=args.prefetch,
                dtype=args.dtype, segments=args.segments, warmup=args.warmup, seed=args.seed, profile=args.profile)


def _layouts(specs: list[str] | None):
    if not specs:
        from .store_bench import LAYOUTS
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


def run_store(args) -> int:
    from .store_bench import CODECS, bench_store
    unknown = sorted(set(args.codecs) - set(CODECS))
    if unknown:
        raise InputError(f"--codecs {','.join(unknown)}: unknown; choose from {', '.join(CODECS)}")
    if any(p > s for p, s in zip(args.patch, args.shape)):
        raise InputError(f"--patch {args.patch} is larger than the stack --shape {args.shape}")
    return _run(args, bench_store, cache=args.cache, shape_zyx=tuple(args.shape), patch=tuple(args.patch),
                layouts=_layouts(args.layouts), codecs=args.codecs, patches=args.patches, segments=args.segments,
                warmup=args.warmup, seed=args.seed)


def run_model(args) -> int:
    import torch
    from .model_bench import bench_model, defaults
    args.segments = args.segments or defaults(torch.cuda.is_available())["segments"]
    return _run(args, bench_model, models=args.models, patch=args.patch, batch=args.batch,
                precision=args.precision, tiny=args.tiny, peak_tflops=args.peak_tflops,
                channels_last=args.channels_last, segments=args.segments, warmup=args.warmup,
                steps_per_segment=args.steps, seed=args.seed)


def run_train(args) -> int:
    from .train_bench import bench_train
    return _run(args, bench_train, store=args.store, cache=args.cache, stacks=args.stacks, shape_zyx=args.shape,
                loader=args.loader, model=args.model, tiny=args.tiny, patch=args.patch, stride=args.stride,
                batch=args.batch, precision=args.precision, workers=args.workers, segments=args.segments,
                warmup=args.warmup, steps_per_segment=args.steps, seed=args.seed)
