"""The GPU check's equality cases: stores generated in seconds (stacktrain.testing, numpy only) and the
lockstep comparison of two loaders, raw bytes exactly and normalised batches within the cast's tolerance.

Cases (each an eval epoch without augmentation and a train epoch with flips + jitter):
- u8-fit-fp16-percentile: uint8, `fit` edge, fp16, per-stack percentile clip;
- u8-pad-bf16-scale:      uint8, stacks that do not divide into patches, `pad` edge, bf16;
- u16-fit-bf16-meanstd:   uint16, `fit` edge, bf16, per-channel mean/std;
- near-limit:             4x8x8 chunks, 8x32x32 patches off the chunk grid (225 chunks each), an eval
                          batch just under CUDA's 65535-chunk inflate limit and one that needs 3
                          inflate calls (pipelines/inflate.py).
"""

from __future__ import annotations

import time
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch

TOLERANCE = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}  # relative+absolute, one rounding of each dtype
SIDE = ("labels", "stack_index", "position", "lo", "mul")
NEAR = dict(shape=(3, 32, 128, 128), chunk=(4, 8, 8), shard=(16, 32, 32), patch=(8, 32, 32), stride=(3, 13, 13))


def write_store(path: Path, *, stacks: int, shape_czyx, dtype=np.uint8, chunk=(16, 64, 64),
                shard=(32, 256, 256)) -> Path:
    """`stacks` tissue-like stacks (alternating SAIN / MALADE), numpy only: seconds, not synth's minutes."""
    from stacktrain.testing import tissue, write_store
    arrays = {f"gen{i}": (tissue(tuple(shape_czyx), seed=i, dtype=dtype), "MALADE" if i % 2 else "SAIN", f"g{i}")
              for i in range(stacks)}
    return write_store(path, arrays, chunk_zyx=chunk, shard_zyx=shard)


def cases(args) -> list[dict]:
    """The case list for this run's sizes (--shape, --patch, --stride, --batch-size)."""
    c, z, y, x = args.shape
    odd = (c, z - 3, y - 37, x - 21)  # no whole number of patches or chunks along any axis
    base = dict(patch=tuple(args.patch), stride=tuple(args.stride), batch=args.batch_size, chunk=(16, 64, 64),
                shard=(32, 256, 256), train=True)
    out = [dict(base, name="u8-fit-fp16-percentile", dtype="uint8", shape=tuple(args.shape), edge="fit",
                out="fp16", normalize="percentile"),
           dict(base, name="u8-pad-bf16-scale", dtype="uint8", shape=odd, edge="pad", out="bf16", normalize="scale"),
           dict(base, name="u16-fit-bf16-meanstd", dtype="uint16", shape=tuple(args.shape), edge="fit", out="bf16",
                normalize="meanstd")]
    if args.near_limit:
        from stacktrain.pipelines.inflate import inflate_plan
        n = inflate_plan(patch_zyx=NEAR["patch"], chunk_zyx=NEAR["chunk"], channels=3, batch=1).max_chunks
        under = 65535 // n  # the largest batch inflated in one call
        for batch in (under, 2 * under):
            out.append(dict(name=f"near-limit-batch{batch}", dtype="uint8", shape=NEAR["shape"], edge="fit",
                            out="bf16", normalize="scale", patch=NEAR["patch"], stride=NEAR["stride"], batch=batch,
                            chunk=NEAR["chunk"], shard=NEAR["shard"], train=False))
    return out


def make_loader(store, kind: str, case: dict, args, *, train: bool):
    from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
    from stacktrain.pipelines.loaders import build_loader, channel_mean_std
    aug = dict(flip=(True, True, True), jitter=8) if train else dict(flip=(False, False, False), jitter=0)
    stats = channel_mean_std(store, store.stack_ids) if case["normalize"] == "meanstd" else None
    return build_loader(store, store.stack_ids, train=train,
                        patch=PatchConfig(size=case["patch"], stride=case["stride"], edge=case["edge"]),
                        prep=PreprocessConfig(normalize=case["normalize"], **aug), norm_stats=stats,
                        cfg=LoaderConfig(loader=kind, batch_size=case["batch"], workers=args.workers,
                                         prefetch=args.prefetch, dtype=case["out"], seed=args.seed,
                                         channels_last=True),
                        device_id=0 if kind == "dali" or (kind == "torch" and torch.cuda.is_available()) else None)


def _normalized(batch, device):
    from stacktrain.pipelines.normalize import normalize_images
    images = normalize_images(batch.images.to(device), batch.lo.to(device), batch.mul.to(device),
                              clip=batch.norm.clip, dtype=batch.norm.dtype, channels_last=batch.norm.channels_last)
    return images.float().cpu()


def compare(store, case: dict, args, *, train: bool) -> dict:
    """One epoch of --reference and --candidate in lockstep: raw images and side outputs exactly equal,
    normalised images (each on its own loader's device) within the cast's tolerance."""
    from stacktrain.pipelines import graph
    graph.CHECK_INFLATE = True  # let nvCOMP validate output sizes (it syncs; fine for a check)
    ref_loader = make_loader(store, args.reference, case, args, train=train)
    cand_loader = make_loader(store, args.candidate, case, args, train=train)
    tol = TOLERANCE[case["out"]]
    r = {"patches": 0, "batches": 0, "max_abs_diff": 0.0, "elements_off": 0, "tolerance": tol,
         "raw_equal": True, "side_outputs_equal": True, "shapes_and_counts_equal": len(ref_loader) == len(cand_loader),
         "inflate_groups": cand_loader.source.inflate_groups, "raw_dtype": str(ref_loader.spec.raw_dtype)}
    try:
        for ref, cand in zip_longest(ref_loader.epoch(3), cand_loader.epoch(3)):
            if ref is None or cand is None or ref.images.shape != cand.images.shape:
                r["shapes_and_counts_equal"] = False
                break
            r["batches"] += 1
            r["patches"] += len(ref)
            r["raw_equal"] &= torch.equal(ref.images.cpu(), cand.images.cpu())
            r["side_outputs_equal"] &= all(torch.equal(getattr(ref, k).cpu(), getattr(cand, k).cpu()) for k in SIDE)
            a, b = _normalized(ref, ref.images.device), _normalized(cand, cand.images.device)
            diff = (b - a).abs()
            r["max_abs_diff"] = max(r["max_abs_diff"], float(diff.max()))
            r["elements_off"] += int((diff > tol + tol * a.abs()).sum())
    finally:
        ref_loader.close()
        cand_loader.close()
        graph.CHECK_INFLATE = False
    r["ok"] = (r["shapes_and_counts_equal"] and r["raw_equal"] and r["side_outputs_equal"]
               and r["elements_off"] == 0 and r["patches"] > 0)
    return r


def chunks_per_batch(store, case: dict) -> int:
    """The most chunks any eval batch of this case hands to inflate (all calls together)."""
    from stacktrain.pipelines.config import PatchConfig
    from stacktrain.pipelines.patches import build_index
    index = build_index(store, store.stack_ids, PatchConfig(size=case["patch"], stride=case["stride"]))
    counts = [store.chunk_region(index.stack_ids[int(s)], tuple((int(p), int(p) + n) for p, n in
                                 zip(pos, case["patch"])), raw_lz4=True).n_chunks
              for s, pos in zip(index.stack, index.position)]
    b = case["batch"]
    return max(sum(counts[i:i + b]) for i in range(0, len(counts), b))


def run_case(tmp: Path, case: dict, args) -> dict:
    t0 = time.perf_counter()
    from stacktrain.stores.reader import Store
    path = write_store(tmp / f"{case['name']}.zarr", stacks=args.stacks, shape_czyx=case["shape"],
                       dtype=np.dtype(case["dtype"]), chunk=case["chunk"], shard=case["shard"])
    store = Store(path)
    out = {"case": {k: list(v) if isinstance(v, tuple) else v for k, v in case.items()},
           "store_write_s": time.perf_counter() - t0}
    if case["name"].startswith("near-limit"):
        out["max_chunks_in_a_batch"] = chunks_per_batch(store, case)
    out["eval_no_aug"] = compare(store, case, args, train=False)
    if case["train"]:
        out["train_aug"] = compare(store, case, args, train=True)
    out["ok"] = all(out[k]["ok"] for k in ("eval_no_aug", "train_aug") if k in out)
    out["seconds"] = time.perf_counter() - t0
    return out
