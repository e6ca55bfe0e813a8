"""The patch index: every grid position of every stack, with its label, built from metadata only.

Positions are per-axis grids (stride `patch.step`); the edge policy decides what happens to the
remainder: `drop` leaves it, `fit` adds one patch shifted back to end at the stack's edge, `pad` adds
patches that run past the edge (read as zeros). Patches wholly outside a stack's valid region (the
zeros `convert --pad` added) are never indexed, whatever the filter; the patch at the origin always
is, so a stack smaller than one patch keeps one. The foreground filter aggregates the statistics
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
    valid: np.ndarray | None = None  # int64 (S, 3): each stack's valid region (z, y, x); None: no padding

    def __len__(self) -> int:
        return len(self.stack)

    def key(self, row: int) -> tuple[str, tuple[int, int, int]]:
        """(stack_id, (z, y, x)) of one patch: what identifies it across loaders and ranks."""
        return self.stack_ids[int(self.stack[row])], tuple(int(v) for v in self.position[row])

    def class_counts(self) -> tuple[int, int]:
        return int((self.label == 0).sum()), int((self.label == 1).sum())

    def padded_fraction(self, stack: np.ndarray, position: np.ndarray) -> np.ndarray:
        """float64 (N,): share of each patch (stack index, origin z, y, x) outside its stack's valid region."""
        if self.valid is None:
            return np.zeros(len(stack))
        return padded_fraction(self.valid[np.asarray(stack, np.int64)], position, self.size)


def padded_fraction(valid_zyx: np.ndarray, position: np.ndarray, size) -> np.ndarray:
    """Share of each patch's voxels outside the valid region [0, valid) on some axis: --pad's zeros, or
    past the stored edge (edge = pad). 1.0 for a patch wholly in padding."""
    inside = np.clip(np.minimum(np.asarray(position) + np.asarray(size), valid_zyx) - position, 0, None)
    return 1.0 - np.prod(inside, axis=-1, dtype=np.float64) / float(np.prod(size))


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


def _stored_foreground(store: Store, sid: str, axes_positions, size) -> np.ndarray:
    """`foreground_fraction` over the stack's valid region: the stats cells it covers, padding as background."""
    meta = store.meta(sid)
    cells = tuple(slice(0, -(-v // c)) for v, c in zip(meta.valid, meta.stats_cell_zyx))
    fg = store.stats(sid)["foreground"][cells]
    return foreground_fraction(fg, meta.stats_cell_zyx, meta.valid, axes_positions, size)


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
        keep = (grid < np.array(meta.valid)).all(axis=1)  # not wholly in padding; the origin always stays
        if patch.foreground_min > 0:
            frac = _stored_foreground(store, sid, per_axis, size)
            keep &= frac.reshape(-1) >= patch.foreground_min
        grid = grid[keep]
        stacks.append(np.full(len(grid), i, np.int64))
        positions.append(grid)
        labels.append(np.full(len(grid), meta.label_index, np.int64))
    valid = np.array([store.meta(sid).valid for sid in stack_ids], np.int64).reshape(-1, 3)
    index = PatchIndex(tuple(stack_ids), size, np.concatenate(stacks), np.concatenate(positions),
                       np.concatenate(labels), valid)
    if len(index) == 0:
        raise PipelineError(f"{store.path}: patch.foreground_min = {patch.foreground_min} leaves no patch "
                            f"in {len(stack_ids)} stacks; lower it (0 keeps every patch)")
    return index
