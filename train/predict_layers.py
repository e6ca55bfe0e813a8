"""Predictions as viewer layers: each stack's patch probabilities as an OME-Zarr image on the stack's
own grid, so napari (or any OME-Zarr viewer) shows P(MALADE) over the stack.

    DIR/probabilities.zarr/<stack_id>/   OME-Zarr 0.5 image, axes z, y, x, one level, float32

The image has one voxel per grid step (the largest step that every patch position and the patch
size are multiples of: the patch, or the stride with overlap); its scale is that step times the
stack's voxel spacing (µm, or 1.0 per voxel without spacing), so it lies exactly over the stack.
A voxel holds the highest probability of the patches covering it; NaN where no patch reaches.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import zarr

from stacktrain.stores.reader import Store

LAYERS = "probabilities.zarr"


def grid_step(samples: list[dict], patch_size) -> tuple[int, int, int]:
    """Per axis, the gcd of the patch size and every patch position."""
    step = [int(p) for p in patch_size]
    for s in samples:
        step = [math.gcd(a, int(b)) for a, b in zip(step, s["position"])]
    return tuple(step)


def probability_volume(samples: list[dict], patch_size, shape_zyx, step) -> np.ndarray:
    """(Z, Y, X) / step map of the max probability of the covering patches; NaN where none reaches."""
    grid = tuple(-(-n // k) for n, k in zip(shape_zyx, step))
    out = np.full(grid, np.nan, np.float32)
    size = [p // k for p, k in zip(patch_size, step)]
    for s in samples:
        z, y, x = (p // k for p, k in zip(s["position"], step))
        region = out[z:z + size[0], y:y + size[1], x:x + size[2]]
        np.fmax(region, np.float32(s["probability"]), out=region)
    return out


def write_layers(out: Path, store: Store, samples_by_stack: dict[str, list[dict]], patch_size) -> Path:
    """Write every stack's layer (replacing an earlier prediction's) into DIR/probabilities.zarr."""
    root_path = Path(out) / LAYERS
    staging = root_path.with_name(f".{LAYERS}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    root = zarr.open_group(staging, mode="w", zarr_format=3)
    for sid, samples in samples_by_stack.items():
        meta = store.meta(sid)
        step = grid_step(samples, patch_size)
        volume = probability_volume(samples, patch_size, meta.shape[1:], step)
        spacing = meta.spacing_zyx or (1.0, 1.0, 1.0)
        image = root.create_group(sid)
        image.create_array("0", data=volume, chunks=volume.shape, dimension_names=("z", "y", "x"),
                           fill_value=float("nan"))
        unit = {"unit": "micrometer"} if meta.spacing_zyx else {}
        image.attrs.put({"ome": {"version": "0.5", "multiscales": [{
            "name": f"{sid} P(MALADE)",
            "axes": [{"name": ax, "type": "space", **unit} for ax in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [float(k * s) for k, s in zip(step, spacing)]}]}],
        }]}})
    shutil.rmtree(root_path, ignore_errors=True)
    staging.rename(root_path)  # a reader sees the previous layers or the new ones, never half
    return root_path
