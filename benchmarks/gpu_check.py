"""GPU check: one prepared run for a CUDA machine. DALI's GPU pipeline against its CPU mode, then the
benchmarks at true size, all written as JSON under --out.

    python -m benchmarks.gpu_check --out gpu-check-out

In one run (< 8 minutes on one H200; needs only torch, numpy, zarr, numcodecs + lz4 and DALI):
1. equality: writes a small tissue-like LZ4 store, reads one eval epoch (no augmentation) and one
   train epoch (flips + jitter, chosen by the shared source) with loader "dali" and with "dali-cpu",
   asserts the images agree within the tolerance of the cast (side outputs exactly), times epochs of
   each -> gpu_check.json;
2. `bench loader` with dali (and dali-cpu, torch) against its ceilings -> bench_loader.json;
3. `bench model` at true size: resnet3d50, 3x32x256x256, batch 64, bf16 -> bench_model.json;
4. `bench train`: the same model fed by the dali loader, data-wait % -> bench_train.json.
Exit 1 on a mismatch. Without CUDA it prints "skipped: ..." and exits 0; with CUDA but without DALI it
skips 1 and the DALI loaders, runs the model and torch-loader parts, and says DALI was missing.
Without MONAI the model is benchmarks/resnet3d.py's torch-only ResNet3D-50 (same FLOPs).
`--candidate torch` runs the comparison on any machine (how this script is tested on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TOLERANCE = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}  # relative+absolute, one rounding of each dtype


def skip_reason(kinds: list[str]) -> str | None:
    """Why this machine cannot run the check at all, or None. CUDA without DALI still runs the benches."""
    from stacktrain.pipelines.loaders import dali_available
    if "dali" in kinds and not torch.cuda.is_available():
        return "no CUDA device"
    if any(k.startswith("dali") for k in kinds) and not dali_available() and not torch.cuda.is_available():
        return "NVIDIA DALI does not import"
    return None


def make_loader(store, kind: str, args, *, train: bool):
    from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
    from stacktrain.pipelines.loaders import build_loader
    aug = dict(flip=(True, True, True), jitter=8) if train else dict(flip=(False, False, False), jitter=0)
    return build_loader(store, store.stack_ids, train=train,
                        patch=PatchConfig(size=tuple(args.patch), stride=tuple(args.stride), edge="fit"),
                        prep=PreprocessConfig(normalize=args.normalize, **aug),
                        cfg=LoaderConfig(loader=kind, batch_size=args.batch_size, workers=args.workers,
                                         prefetch=args.prefetch, dtype=args.dtype, seed=args.seed),
                        device_id=0 if kind == "dali" else None)


def check_equal(store, args, *, train: bool) -> dict:
    """One epoch from each loader, batch by batch in lockstep: images within the cast's tolerance,
    side outputs exact."""
    from stacktrain.pipelines import graph
    graph.CHECK_INFLATE = True  # let nvCOMP validate output sizes (it syncs; fine for a check)
    ref_loader = make_loader(store, args.reference, args, train=train)
    cand_loader = make_loader(store, args.candidate, args, train=train)
    tol = TOLERANCE[args.dtype]
    patches = off = batches = 0
    max_diff, side_equal, counts_equal = 0.0, True, len(ref_loader) == len(cand_loader)
    try:
        for ref, cand in zip(ref_loader.epoch(3), cand_loader.epoch(3), strict=counts_equal):
            batches += 1
            a, b = ref.images.float().cpu(), cand.images.float().cpu()
            if a.shape != b.shape:
                counts_equal = False
                break
            diff = (b - a).abs()
            max_diff = max(max_diff, float(diff.max()))
            off += int((diff > tol + tol * a.abs()).sum())
            patches += len(a)
            side_equal &= all(torch.equal(getattr(ref, k).cpu(), getattr(cand, k).cpu())
                              for k in ("labels", "stack_index", "position"))
    finally:
        ref_loader.close()
        cand_loader.close()
        graph.CHECK_INFLATE = False
    return {"patches": patches, "batches": batches, "max_abs_diff": max_diff, "elements_off": off,
            "tolerance": tol, "side_outputs_equal": side_equal, "shapes_and_counts_equal": counts_equal,
            "ok": counts_equal and side_equal and off == 0 and patches > 0}


def measure_throughput(store, kind: str, args) -> dict:
    """Train epochs of one loader: one warm-up, then the median of --epochs timed epochs."""
    loader = make_loader(store, kind, args, train=True)
    sync = torch.cuda.synchronize if kind == "dali" else (lambda: None)
    times, n = [], 0
    try:
        for epoch in range(args.epochs + 1):  # consecutive epochs: the pipeline is built once
            sync()
            start = time.perf_counter()
            n = sum(len(b) for b in loader.epoch(epoch))
            sync()
            if epoch:  # epoch 0 builds the pipeline and warms the caches
                times.append(time.perf_counter() - start)
    finally:
        loader.close()
    median = statistics.median(times)
    return {"patches_per_epoch": n, "epoch_s": times, "patches_per_s": n / median,
            "gb_per_s_uint8": n * int(np.prod(args.patch)) * args.shape[0] / median / 1e9}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--stacks", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=4, default=[3, 64, 512, 512], metavar=("C", "Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    p.add_argument("--stride", type=int, nargs=3, default=[8, 64, 64], metavar=("D", "H", "W"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="fp16")
    p.add_argument("--normalize", choices=["scale", "meanstd", "percentile"], default="percentile")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="dali-cpu")
    p.add_argument("--candidate", default="dali", help="the loader checked against --reference")
    b = p.add_argument_group("benchmarks at true size")
    b.add_argument("--benches", default="loader,model,train", help="comma-separated, or 'none' (check only)")
    b.add_argument("--bench-segments", type=int, default=3, help="timed segments per measurement")
    b.add_argument("--bench-shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"),
                   help="stacks of the generated benchmark store")
    b.add_argument("--model", default="resnet3d50")
    b.add_argument("--model-batch", type=int, default=64)
    b.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    b.add_argument("--tiny-models", action="store_true", help="the models' tiny flavors (tests)")
    b.add_argument("--train-steps", type=int, default=4, help="training steps per segment")
    b.add_argument("--cache", type=Path, help="where the generated benchmark store is kept")
    return p.parse_args(argv)


def run_benches(args, report: dict, *, has_dali: bool) -> None:
    """The benchmarks at true size, each one isolated: a failure is recorded and the next one runs."""
    from stacktrain.io import atomic_write_json

    from .loader_bench import bench_loader
    from .model_bench import bench_model
    from .train_bench import bench_train
    cuda = torch.cuda.is_available()
    loaders = [k for k in ("dali", "dali-cpu", "torch") if k == "torch" or (has_dali and (k != "dali" or cuda))]
    wanted = [] if args.benches == "none" else [b.strip() for b in args.benches.split(",") if b.strip()]
    seg = dict(segments=args.bench_segments, warmup=1, seed=args.seed)
    runs = {
        "loader": lambda: bench_loader(cache=args.cache, shape_zyx=tuple(args.bench_shape), loaders=loaders,
                                       patch=tuple(args.patch), batch=args.batch_size, workers=args.workers,
                                       prefetch=args.prefetch, **seg),
        "model": lambda: bench_model(models=[args.model], patch=tuple(args.patch), batch=args.model_batch,
                                     precision=args.precision, tiny=args.tiny_models, **seg),
        "train": lambda: bench_train(cache=args.cache, shape_zyx=tuple(args.bench_shape),
                                     loader="dali" if has_dali and cuda else "torch", model=args.model,
                                     tiny=args.tiny_models, patch=tuple(args.patch), stride=tuple(args.stride),
                                     batch=args.model_batch, precision=args.precision if cuda else "fp32",
                                     workers=args.workers,
                                     steps_per_segment=args.train_steps, **seg),
    }
    report["benches"] = {}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            result = runs[name]()
        except Exception as e:  # noqa: BLE001 -- one failed bench must not lose the others' numbers
            report["benches"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"bench {name}: FAILED {type(e).__name__}: {e}")
            continue
        report["benches"][name] = {"seconds": time.perf_counter() - t0, "json": f"bench_{name}.json"}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / f"bench_{name}.json", result)
        print(summary(name, result))


def summary(name: str, r: dict) -> str:
    """One line per bench for the console (no rich here)."""
    if name == "loader":
        return "bench loader: " + ", ".join(
            f"{k} {v['per_s']:.0f}/s" + (f" ({v['ratio_to_ceiling']:.2f}x {v['ceiling']})" if "ceiling" in v else "")
            for k, v in r["results"].items())
    if name == "model":
        return "bench model: " + ", ".join(
            f"{row['model']} {row.get('patches_per_s', 0):.1f} patches/s {row.get('achieved_tflops', 0):.1f} TFLOP/s "
            f"({100 * row.get('fraction_of_peak', 0):.0f}% of {r['matmul_peak_tflops']:.0f}) "
            f"peak {row.get('peak_memory_gib') or 0:.1f} GiB"
            if "error" not in row else f"{row['model']}: {row['error']}"
            for row in r["results"])
    return (f"bench train: data-wait {r['data_wait_pct']:.1f}%, loader headroom {r['loader_headroom']:.2f}x, "
            f"real {r['results']['real']['per_s']:.1f} vs model alone "
            f"{r['results']['model_alone']['per_s']:.1f} patches/s")


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = skip_reason([args.reference, args.candidate])
    if reason:
        print(f"skipped: {reason}; run this on a CUDA machine with DALI installed")
        return 0
    from stacktrain.io import atomic_write_json
    from stacktrain.pipelines.loaders import dali_available
    from stacktrain.stores.reader import Store
    from stacktrain.testing import tissue, write_store
    has_dali = dali_available()
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "dali": "available" if has_dali else "missing: equality check and DALI loaders skipped"}
    ok = True
    if has_dali:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            t0 = time.perf_counter()
            write_store(Path(tmp) / "gen.zarr", {f"gen{i}": (tissue(tuple(args.shape), seed=i),
                                                          "MALADE" if i % 2 else "SAIN",
                                                          f"g{i}") for i in range(args.stacks)})
            report["store_write_s"] = time.perf_counter() - t0
            store = Store(Path(tmp) / "gen.zarr")
            report["eval_no_aug"] = check_equal(store, args, train=False)
            report["train_aug"] = check_equal(store, args, train=True)
            report["throughput"] = {kind: measure_throughput(store, kind, args)
                                    for kind in (args.candidate, args.reference)}
        ok = report["eval_no_aug"]["ok"] and report["train_aug"]["ok"]
        for name in ("eval_no_aug", "train_aug"):
            r = report[name]
            print(f"{name}: {'OK' if r['ok'] else 'MISMATCH'} {r['patches']} patches, max |diff| "
                  f"{r['max_abs_diff']:.3g} (tolerance {r['tolerance']}), "
                  f"side outputs equal: {r['side_outputs_equal']}")
        for kind, t in report["throughput"].items():
            print(f"{kind}: {t['patches_per_s']:.1f} patches/s ({t['gb_per_s_uint8']:.2f} GB/s of uint8 patches)")
    else:
        print("DALI is missing: the equality check and the DALI loaders are skipped; model and torch-loader "
              "parts run")
    run_benches(args, report, has_dali=has_dali)
    failed = [n for n, b in report.get("benches", {}).items() if "error" in b]
    report["status"] = "mismatch" if not ok else ("partial" if failed or not has_dali else "ok")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_check.json", report)
    print(f"status: {report['status']} -> {args.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
