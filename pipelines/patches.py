"""The patch index: every grid position of every stack, with its label, built from metadata only.

Positions are per-axis grids (stride `patch.step`); the edge policy decides what happens to the
remainder: `drop` leaves it, `fit` adds one patch shifted back to end at the stack's edge, `pad` adds
patches that run past the edge (read as zeros). The foreground filter aggregates the statistics
written at conversion (fraction of foreground voxels per stats cell), so it reads no voxels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stacktrain.errors import PipelineError
from stacktrain.stores.reader import Store

from .config import PatchConfig


@dataclasses.dataclass(frozen=True)
class PatchIndex:
    """All patches of `stack_ids`, in stack order then z, y, x grid order (deterministic)."""

    stack_ids: tuple[str, ...]
    size: tuple[int, int, int]  # patch (z, y, x)
    stack: np.ndarray  # int64 (N,): index into stack_ids
    position: np.ndarray  # int64 (N, 3): patch origin (z, y, x) in voxels
    label: np.ndarray  # int64 (N,): 0 = SAIN, 1 = MALADE

    def __len__(self) -> int:
        return len(self.stack)

    def key(self, row: int) -> tuple[str, tuple[int, int, int]]:
        """(stack_id, (z, y, x)) of one patch: what identifies it across loaders and ranks."""
        return self.stack_ids[int(self.stack[row])], tuple(int(v) for v in self.position[row])

    def class_counts(self) -> tuple[int, int]:
        return int((self.label == 0).sum()), int((self.label == 1).sum())


def axis_positions(extent: int, size: int, step: int, edge: str) -> np.ndarray:
    """Patch origins along one axis of `extent` voxels for the given edge policy."""
    if size <= 0 or step <= 0:
        raise PipelineError(f"patch size {size} and stride {step} must be positive")
    if extent < size and edge != "pad":
        return np.zeros(0, np.int64)  # the caller names the stack in its error
    if edge == "pad":
        last = max(extent - size, 0)
        return np.arange(0, -(-last // step) * step + 1, step, dtype=np.int64)
    pos = np.arange(0, extent - size + 1, step, dtype=np.int64)
    if edge == "fit" and pos[-1] + size < extent:
        pos = np.append(pos, extent - size)
    return pos


def _overlap(positions: np.ndarray, size: int, cell: int, extent: int) -> np.ndarray:
    """(n_positions, n_cells) voxels of each patch [p, p+size) inside each stats cell (and the stack)."""
    n_cells = -(-extent // cell)
    lo = np.arange(n_cells) * cell
    hi = np.minimum(lo + cell, extent)
    start = positions[:, None]
    return np.clip(np.minimum(hi, start + size) - np.maximum(lo, start), 0, None).astype(np.float64)


def foreground_fraction(fg_cells: np.ndarray, cell_zyx, shape_zyx, axes_positions, size) -> np.ndarray:
    """Foreground fraction of every grid patch: overlap-weighted mean of the stats cells it covers.

    Voxels past the stack's edge (edge = pad) count as background. Returns (nz, ny, nx).
    """
    wz, wy, wx = (_overlap(p, s, c, n) for p, s, c, n in zip(axes_positions, size, cell_zyx, shape_zyx))
    fg_voxels = np.einsum("az,by,cx,zyx->abc", wz, wy, wx, fg_cells.astype(np.float64))
    return fg_voxels / float(np.prod(size))


def build_index(store: Store, stack_ids: list[str], patch: PatchConfig) -> PatchIndex:
    """Tile every stack into grid positions; raise PipelineError naming any stack that cannot be tiled."""
    if not stack_ids:
        raise PipelineError(f"{store.path}: no stacks to take patches from (empty store or empty "
                            "split); convert stacks first or check the split")
    size, step = tuple(patch.size), tuple(patch.step)
    if len(size) != 3 or len(step) != 3 or min(*size, *step) <= 0:
        raise PipelineError(f"patch.size {size} and patch.stride {step} must be three positive ints (z, y, x)")
    stacks, positions, labels = [], [], []
    for i, sid in enumerate(stack_ids):
        meta = store.meta(sid)
        shape_zyx = meta.shape[1:]
        if patch.edge != "pad" and any(n < s for n, s in zip(shape_zyx, size)):
            raise PipelineError(
                f"{store.path}: stack {sid!r} of shape (z, y, x) {shape_zyx} is smaller than the patch "
                f"{size}; use a smaller patch.size, patch.edge = \"pad\", or leave this stack out")
        per_axis = [axis_positions(n, s, st, patch.edge) for n, s, st in zip(shape_zyx, size, step)]
        grid = np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3)
        if patch.foreground_min > 0:
            fg = store.stats(sid)["foreground"]
            frac = foreground_fraction(fg, meta.stats_cell_zyx, shape_zyx, per_axis, size)
            grid = grid[frac.reshape(-1) >= patch.foreground_min]
        stacks.append(np.full(len(grid), i, np.int64))
        positions.append(grid)
        labels.append(np.full(len(grid), meta.label_index, np.int64))
    index = PatchIndex(tuple(stack_ids), size, np.concatenate(stacks), np.concatenate(positions),
                       np.concatenate(labels))
    if len(index) == 0:
        raise PipelineError(f"{store.path}: patch.foreground_min = {patch.foreground_min} leaves no patch "
                            f"in {len(stack_ids)} stacks; lower it (0 keeps every patch)")
    return index
