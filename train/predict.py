"""`stacktrain predict CHECKPOINT STORE.zarr --out DIR [--stacks ...]`: a trained model over whole stacks.

Every patch of the chosen stacks goes through the eval loader (the checkpoint's patch size and
normalisation) and the model; patch probabilities are aggregated per stack as in training.

    DIR/patches.csv        stack_id, z, y, x, probability, label
    DIR/stacks.csv         stack_id, aggregated_probability, predicted_label, predicted_class, label, n_patches
    DIR/predictions.json   the same plus checkpoint, store, aggregation, threshold and metrics against the
                           stored labels (over the labelled stacks; null when none is: an unlabeled stack's
                           label is empty in the CSV files, null in the JSON)
A stack is MALADE when its probability is >= the checkpoint's threshold: 0.5, or the one tuned on the
run's validation stacks (train.threshold = "tuned").
    DIR/heatmaps/<id>.png  a mid-slice of the stack next to its patch probabilities (max over z)
    DIR/probabilities.zarr each stack's probabilities as an OME-Zarr image over it (predict_layers.py)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from stacktrain import ui
from stacktrain.errors import ConfigError
from stacktrain.io import atomic_write, atomic_write_csv, atomic_write_text
from stacktrain.stores.intensity import require_same
from stacktrain.stores.layout import CLASS_NAMES
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import require_intact
from stacktrain.train import checkpoint as ckpts
from stacktrain.train.config import config_from_dict
from stacktrain.train.data import make_loader
from stacktrain.train.loop import evaluate
from stacktrain.train.models import build_model
from stacktrain.train.monitor import Monitor
from stacktrain.train.precision import Precision
from stacktrain.train.predict_inputs import input_store
from stacktrain.train.predict_layers import LAYERS, write_layers
from stacktrain.train.runtime import Runtime, pick_device

PATCH_FIELDS = ("stack_id", "z", "y", "x", "probability", "label")
STACK_FIELDS = ("stack_id", "aggregated_probability", "predicted_label", "predicted_class", "label", "n_patches")


def predict(checkpoint: str | Path, source: str | Path | list, out: str | Path, *, stacks: list[str] | None = None,
            keep_store: str | Path | None = None, convert_options: dict[str, Any] | None = None,
            loader: str = "auto", device: str = "auto", batch_size: int | None = None,
            console: Console | None = None) -> dict[str, Any]:
    """Predict every patch of `stacks` (all of the store's by default); write DIR's files; return the JSON.
    `source`: a store, or raw stacks (a manifest, or a list of files) converted first the way the training
    store was (train/predict_inputs.py), into `keep_store` or a temporary store; `convert_options`:
    workers, axes, replicate_channels of that conversion."""

    console = console or ui.console()
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; give a folder for the prediction files")
    _check_flags(loader, device, batch_size)
    ckpt = ckpts.load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"], where=f"{checkpoint} (its config)")
    inputs = list(source) if isinstance(source, (list, tuple)) else [source]
    bar = ui.ConvertBar(console, bar=console.is_terminal)
    with input_store(inputs, ckpt, cfg.patch.size, out=Path(out), store=keep_store, progress=bar,
                     **(convert_options or {})) as (store, converted, kept):
        report = _predict(ckpt, cfg, checkpoint, Store(store), out, stacks or converted, loader=loader,
                          device=device, batch_size=batch_size, console=console)
    if not kept:  # the temporary store is gone: the report names what was read instead
        report["store"] = None
    report["inputs"] = [str(p) for p in inputs]
    atomic_write_text(Path(out) / "predictions.json", json.dumps(report, indent=1))
    return report


def _predict(ckpt: dict[str, Any], cfg, checkpoint, st: Store, out, stacks: list[str] | None, *, loader: str,
             device: str, batch_size: int | None, console: Console) -> dict[str, Any]:
    require_same((ckpt.get("data") or {}).get("intensity"), st, checkpoint)  # the training store's dtype/mapping
    ids = list(stacks) if stacks else st.stack_ids
    for sid in ids:
        st.meta(sid)  # an unknown id: StoreError listing some of the store's
    require_intact(st, ids)
    rt = Runtime(device=pick_device(device))
    cpu = rt.device.type == "cpu"
    batch = cfg.loader.batch_size if batch_size is None else batch_size
    loader_cfg = dataclasses.replace(cfg.loader, loader=loader, batch_size=batch,
                                     dtype="fp32" if cpu else cfg.loader.dtype, channels_last=not cpu and
                                     cfg.loader.channels_last)
    model = build_model(ckpt["model_name"], tiny=ckpt["model_tiny"], options=cfg.model.options)
    ckpts.restore(ckpt, model=model, rng=False, where=checkpoint)
    threshold = ckpts.stack_threshold(ckpt)  # chosen on validation when train.threshold = tuned, else 0.5
    model = model.to(rt.device).eval()
    prec = Precision.create("fp32" if cpu else cfg.train.precision, rt.device)  # the arithmetic it was selected with
    monitor = Monitor(None, enabled=True, epochs=1, log_interval=cfg.train.log_interval, device=rt.device,
                      console=console)
    try:
        with make_loader(cfg, st, ids, train=False, rt=rt, loader_cfg=loader_cfg) as patches:
            result = evaluate(model, patches, cfg, prec=prec, rt=rt, monitor=monitor, threshold=threshold)
    finally:
        monitor.close()

    out = Path(out)
    try:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make the folder ({e.strerror}); give a folder path") from None
    for stale in (out / "heatmaps").glob("*.png"):  # an earlier prediction's: every file in DIR is this one's
        stale.unlink()
    volumes = [{**v, "predicted_class": CLASS_NAMES[v["predicted_label"]]} for v in result.volumes]
    report = {"checkpoint": str(checkpoint), "epoch": int(ckpt["epoch"]), "model": ckpt["model_name"],
              "store": str(st.path), "aggregate": cfg.train.aggregate, "threshold": threshold,
              "patch_size": list(cfg.patch.size), "patch_metrics": result.patch_metrics,
              "volume_metrics": result.volume_metrics, "stacks": volumes, "patches": result.samples}
    atomic_write_csv(out / "patches.csv", [PATCH_FIELDS, *([s["stack_id"], *s["position"], s["probability"],
                                                             s["label"]] for s in result.samples)])
    atomic_write_csv(out / "stacks.csv", [STACK_FIELDS, *([v[k] for k in STACK_FIELDS] for v in volumes)])
    by_stack: dict[str, list[dict]] = {}
    for s in result.samples:
        by_stack.setdefault(s["stack_id"], []).append(s)
    for v in volumes:
        heatmap(out / "heatmaps" / f"{v['stack_id']}.png", st, v, by_stack[v["stack_id"]], cfg.patch.size)
    write_layers(out, st, by_stack, cfg.patch.size)

    table = Table("stack", "label", "probability", "predicted", "patches", title=f"predictions of {checkpoint}")
    for v in volumes:
        table.add_row(v["stack_id"], class_name(v["label"]), f"{v['aggregated_probability']:.3f}",
                      v["predicted_class"], str(v["n_patches"]))
    console.print(table)
    console.print(f"wrote {out}/patches.csv, stacks.csv, predictions.json, {len(volumes)} heatmaps in "
                  f"{out}/heatmaps and the probability layers in {out}/{LAYERS} (OME-Zarr, for napari)",
                  highlight=False, soft_wrap=True)
    return report


def _check_flags(loader: str, device: str, batch_size: int | None) -> None:
    """predict's own options, refused in their own words before anything is read (the training config's
    checks further on name train.* and loader.* keys, which predict's user never wrote)."""
    import torch

    from stacktrain.pipelines.loaders import dali_available
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give at least 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here; give --device cpu or auto")
    if loader == "dali" and not torch.cuda.is_available():
        raise ConfigError("--loader dali decodes on the GPU, but torch sees no CUDA device here; give --loader "
                          "dali-cpu (the same graph on the CPU), torch or auto")
    if loader in ("dali", "dali-cpu") and not dali_available():
        raise ConfigError(f"--loader {loader} needs NVIDIA DALI, which does not import here; give --loader torch")


def class_name(label: int | None) -> str:
    """SAIN / MALADE for a stored label, "unlabeled" for a stack without one."""
    return "unlabeled" if label is None else CLASS_NAMES[label]


def probability_map(samples: list[dict], patch_size, shape_yx) -> np.ndarray:
    """(Y, X) map of the highest probability of the patches covering each pixel (max over z and over
    overlapping patches); NaN where no patch reaches."""
    out = np.full(shape_yx, np.nan)
    _, h, w = patch_size
    for s in samples:
        _, y, x = s["position"]
        region = out[y:y + h, x:x + w]
        np.fmax(region, s["probability"], out=region)
    return out


def _display_slice(store: Store, stack_id: str) -> tuple[np.ndarray, int]:
    """The middle z-slice of the valid region (without convert --pad's zeros) as an image matplotlib
    shows: (Y, X, 3) RGB or (Y, X) grey, in [0, 1], each channel stretched over its stored 1st-99th
    percentile."""
    meta = store.meta(stack_id)
    c = meta.shape[0]
    z, y, x = meta.valid
    mid = z // 2
    plane = store.read(stack_id, ((mid, mid + 1), (0, y), (0, x)))[:, 0].astype(np.float32)
    # contrast from the stack's stored 1st-99th percentiles (not the dtype's range: 16-bit data around
    # 1000-3000 would show black)
    low = np.array(meta.percentiles["p1"], np.float32)[:, None, None]
    high = np.array(meta.percentiles["p99"], np.float32)[:, None, None]
    plane = np.clip((plane - low) / np.maximum(high - low, 1.0), 0.0, 1.0)
    return (np.moveaxis(plane[:3], 0, -1) if c >= 3 else plane[0]), mid


def heatmap(path: Path, store: Store, volume: dict, samples: list[dict], patch_size) -> None:
    """One PNG: the stack's mid-slice and its patch probability map side by side (same pixel grid)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    sid = volume["stack_id"]
    image, mid = _display_slice(store, sid)
    probs = probability_map(samples, patch_size, image.shape[:2])
    aspect = image.shape[0] / image.shape[1]
    fig = Figure(figsize=(10, 4.6 * aspect + 0.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image, cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
    left.set_title(f"{sid} ({class_name(volume['label'])}), slice z={mid}")
    shown = right.imshow(probs, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    right.set_title(f"P(MALADE) per patch, max over z\nstack: {volume['aggregated_probability']:.2f} -> "
                    f"{volume['predicted_class']}")
    fig.colorbar(shown, ax=right, shrink=0.8)
    for ax in (left, right):
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
