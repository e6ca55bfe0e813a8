"""GPU check: one prepared run for a CUDA machine. DALI's GPU pipeline against its CPU mode, then the
benchmarks at true size as the seed preset trains, all written as JSON under --out.

    python -m stacktrain.bench.gpu_check --out gpu-check-out      # installed
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --out gpu-check-out   # from a checkout, offline node

Needs only torch, numpy and what the device kit installs (DALI, zarr, numcodecs, lz4, crc32c); MONAI
is optional (benchmarks/resnet3d.py stands in), and from a checkout the `stacktrain` package is mapped
onto the folders without installing anything. In one run:
1. equality (benchmarks/gpu_cases.py): fp16 and bf16, uint8 and uint16, the fit and pad edges, and
   eval batches just under and over CUDA's inflate limit; raw patches and side outputs exactly equal,
   normalised batches within the cast's tolerance; stores generated with numpy in seconds;
2. `bench loader` (dali, dali-cpu, torch, all delivering uint8; normalisation on the device apart);
3. `bench model`: resnet3d50, 3x32x256x256, batch 64, bf16, channels_last_3d (the seed preset);
4. `bench train`: the same model fed by the dali loader: data-wait %, loader headroom.
Memory: torch's peak and the device memory in use (cudaMemGetInfo: DALI and NCCL included).
gpu_check.json is rewritten after every step and on any failure; exit 1 on a mismatch or an error.
Without CUDA it prints "skipped: no CUDA device" and exits 0. `--candidate torch` runs the comparison
on any machine (how this script is tested on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def skip_reason(kinds: list[str]) -> str | None:
    """Why this machine cannot run the check, or None; imports nothing beyond torch (and DALI)."""
    if "dali" in kinds and not torch.cuda.is_available():
        return "no CUDA device"
    if any(k.startswith("dali") for k in kinds):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI does not import (install the device kit's wheels: README, GPU checks)"
    return None


def ensure_package() -> str:
    """Make `import stacktrain` work from a checkout: a folder of symlinks mapping the package onto the
    repository's folders (pyproject.toml's package-dir), put first on sys.path. Spawned workers get it too."""
    try:
        import stacktrain  # noqa: F401
        return "installed"
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="stacktrain-pkg-")) / "stacktrain"
    root.mkdir()
    for f in (REPO / "core").iterdir():
        (root / f.name).symlink_to(f)
    for name, folder in (("stores", "stores"), ("pipelines", "pipelines"), ("train", "train"), ("bench", "benchmarks")):
        (root / name).symlink_to(REPO / folder)
    sys.path.insert(0, str(root.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root.parent), os.environ.get("PYTHONPATH")]))
    return f"mapped from {REPO}"


def memory() -> dict:
    """torch's peak allocation and the device memory in use now (everyone's), GiB."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(0)
    return {"torch_peak_gib": torch.cuda.max_memory_allocated(0) / 2**30, "device_used_gib": (total - free) / 2**30,
            "device_total_gib": total / 2**30}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and bench_*.json")
    p.add_argument("--stacks", type=int, default=2, help="stacks per equality store")
    p.add_argument("--shape", type=int, nargs=4, default=[3, 64, 512, 512], metavar=("C", "Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    p.add_argument("--stride", type=int, nargs=3, default=[16, 128, 128], metavar=("D", "H", "W"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--near-limit", action=argparse.BooleanOptionalAction, default=True,
                   help="the batches just under and over the inflate limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="dali-cpu")
    p.add_argument("--candidate", default="dali", help="the loader checked against --reference")
    b = p.add_argument_group("benchmarks at true size")
    b.add_argument("--benches", default="loader,model,train", help="comma-separated, or 'none' (check only)")
    b.add_argument("--bench-segments", type=int, default=3, help="timed segments per measurement")
    b.add_argument("--bench-stacks", type=int, default=4)
    b.add_argument("--bench-shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    b.add_argument("--model", default="resnet3d50")
    b.add_argument("--model-batch", type=int, default=64)
    b.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    b.add_argument("--tiny-models", action="store_true", help="the models' tiny flavors (tests)")
    b.add_argument("--train-steps", type=int, default=4, help="training steps per segment")
    return p.parse_args(argv)


def run_benches(args, report: dict, store: Path, save) -> None:
    """The benchmarks at true size, each one isolated: a failure is recorded and the next one runs."""
    from stacktrain.io import atomic_write_json

    from .loader_bench import bench_loader
    from .model_bench import bench_model
    from .train_bench import bench_train
    cuda = torch.cuda.is_available()
    has_dali = skip_reason(["dali-cpu"]) is None
    loaders = [k for k in ("dali", "dali-cpu", "torch") if k == "torch" or (has_dali and (k != "dali" or cuda))]
    wanted = [] if args.benches == "none" else [b.strip() for b in args.benches.split(",") if b.strip()]
    seg = dict(segments=args.bench_segments, warmup=1, seed=args.seed)
    runs = {
        "loader": lambda: bench_loader(store=store, loaders=loaders, patch=tuple(args.patch), batch=args.batch_size,
                                       workers=args.workers, prefetch=args.prefetch, dtype=args.precision, **seg),
        "model": lambda: bench_model(models=[args.model], patch=tuple(args.patch), batch=args.model_batch,
                                     precision=args.precision, tiny=args.tiny_models, channels_last=cuda, **seg),
        "train": lambda: bench_train(store=store, loader="dali" if has_dali and cuda else "torch", model=args.model,
                                     tiny=args.tiny_models, patch=tuple(args.patch), stride=tuple(args.stride),
                                     batch=args.model_batch, precision=args.precision if cuda else "fp32",
                                     workers=args.workers, channels_last=cuda, steps_per_segment=args.train_steps,
                                     **seg),
    }
    for name in wanted:
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(0)
        try:
            result = runs[name]()
        except Exception as e:  # noqa: BLE001 -- one failed bench must not lose the others' numbers
            report["benches"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"bench {name}: FAILED {type(e).__name__}: {e}", flush=True)
            save()
            continue
        report["benches"][name] = {"seconds": time.perf_counter() - t0, "json": f"bench_{name}.json", **memory()}
        atomic_write_json(args.out / f"bench_{name}.json", result)
        print(summary(name, result), flush=True)
        save()


def summary(name: str, r: dict) -> str:
    """One line per bench for the console."""
    if name == "loader":
        return "bench loader: " + ", ".join(
            f"{k} {v['per_s']:.0f}/s" + (f" ({v['ratio_to_ceiling']:.2f}x {v['ceiling']})" if "ceiling" in v else "")
            for k, v in r["results"].items())
    if name == "model":
        return "bench model: " + ", ".join(
            f"{row['model']} {row.get('patches_per_s', 0):.1f} patches/s {row.get('achieved_tflops', 0):.1f} TFLOP/s "
            f"({100 * row.get('fraction_of_peak', 0):.0f}% of {r['matmul_peak_tflops']:.0f}) "
            f"torch peak {row.get('peak_memory_gib') or 0:.1f} GiB, "
            f"device used {row.get('device_used_gib') or 0:.1f} GiB"
            if "error" not in row else f"{row['model']}: {row['error']}" for row in r["results"])
    return (f"bench train: data-wait {r['data_wait_pct']:.1f}%, loader headroom {r['loader_headroom']:.2f}x, "
            f"real {r['results']['real']['per_s']:.1f} vs model alone {r['results']['model_alone']['per_s']:.1f} "
            "patches/s")


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = skip_reason([args.reference, args.candidate])
    if reason:
        print(f"skipped: {reason}; run this on a CUDA machine with DALI installed")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "cases": {}, "benches": {}, "status": "running"}
    t_start = time.perf_counter()

    def save() -> None:
        report["seconds"] = time.perf_counter() - t_start
        tmp = args.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, args.out / "gpu_check.json")

    try:
        report["package"] = ensure_package()
        from . import gpu_cases
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            for case in gpu_cases.cases(args):
                r = report["cases"][case["name"]] = gpu_cases.run_case(Path(tmp), case, args)
                for part in ("eval_no_aug", "train_aug"):
                    if part in r:
                        c = r[part]
                        print(f"{case['name']} {part}: {'OK' if c['ok'] else 'MISMATCH'} {c['patches']} patches, "
                              f"raw equal {c['raw_equal']}, max |diff| {c['max_abs_diff']:.3g} (tolerance "
                              f"{c['tolerance']}), side outputs equal {c['side_outputs_equal']}, inflate calls "
                              f"{c['inflate_groups']}", flush=True)
                save()
            t0 = time.perf_counter()
            store = gpu_cases.write_store(Path(tmp) / "bench.zarr", stacks=args.bench_stacks,
                                          shape_czyx=(3, *args.bench_shape))
            report["bench_store_write_s"] = time.perf_counter() - t0
            run_benches(args, report, store, save)
        ok = all(c["ok"] for c in report["cases"].values())
        failed = [n for n, b in report["benches"].items() if "error" in b]
        report["status"] = "mismatch" if not ok else ("partial" if failed else "ok")
    except Exception as e:  # noqa: BLE001 -- whatever happens, leave the JSON saying what
        report["status"], report["error"] = "error", f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        print(report["traceback"], file=sys.stderr)
    report.update(memory())
    save()
    print(f"status: {report['status']} in {report['seconds']:.0f} s -> {args.out / 'gpu_check.json'}", flush=True)
    return 0 if report["status"] in ("ok", "partial") else 1


if __name__ == "__main__":
    sys.exit(main())
