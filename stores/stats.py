"""The statistics `convert` stores with each stack, computed in one pass over each slab.

Per stats cell (8x32x32): the fraction of foreground voxels (above the threshold in any channel) and
the mean of every channel; per channel: a histogram (for the percentiles), the sum and the sum of
squares. Only the valid region (the source's voxels, not `--pad`'s zeros) counts: a cell partly in
padding holds the fraction and means of its valid voxels, a cell wholly in padding 0.
Everything is integer arithmetic on views of the slab, with temporaries bounded by one stats cell's
depth of slices (never a float64 copy of the slab):
- cell sums: the slices of one z cell are added into a reused integer plane, then summed per y-x
  cell with `np.add.reduceat` (cells at the edges may be partial);
- histograms: Pillow's `Image.histogram` over the uint8 data of one z cell (shared, not copied),
  `np.bincount` over uint16 values;
- sums and sums of squares come from the histograms, exactly.

The stored values are the same floats as a float64 `mean()` per cell and a float64 `sum()` per
slab gave: integer sums are exact, and a float64 sum of integers below 2**53 is exact too. Where a
slab's sum of squares reaches 2**53 (bright uint16 data) it is computed the old way, in float64,
channel by channel (`_float_sum`), so the value does not change.
"""

from __future__ import annotations

import functools

import numpy as np

from .layout import PERCENTILES, STATS_CELL_ZYX

EXACT = 2**53  # float64 holds every integer below this exactly


@functools.cache
def _pillow():
    """PIL.Image, or None where Pillow is missing (the bare GPU node): np.bincount then counts."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _float_sum(flat: np.ndarray, squares: bool) -> float:
    """What `f = x.astype(float64); f.sum()` (or `(f * f).sum()`) gives, rounding included: for sums that
    reach 2**53, where the order of numpy's pairwise additions shows in the result."""
    f = flat.astype(np.float64)
    if squares:
        np.multiply(f, f, out=f)
    return float(f.sum())


class SlabStats:
    """Streaming statistics of a (C, Z, Y, X) stack fed slab by slab in z order; slabs start on a
    stats-cell boundary in z (the writer's slabs are whole shards and whole cells)."""

    def __init__(self, shape, dtype, threshold: int, valid_zyx=None):
        c, z, y, x = shape
        self.cell = STATS_CELL_ZYX
        self.dtype = np.dtype(dtype)
        self.grid = tuple(-(-n // k) for n, k in zip((z, y, x), self.cell))
        # only the source's voxels count (--pad's zeros do not): cells wholly in padding stay 0
        self.valid = tuple(valid_zyx) if valid_zyx is not None else (z, y, x)
        _, y, x = self.valid
        self.fg = np.zeros(self.grid, np.float32)
        self.mean = np.zeros((c, *self.grid), np.float32)
        self.hist = np.zeros((c, np.iinfo(self.dtype).max + 1), np.int64)
        self.sum = np.zeros(c, np.float64)
        self.sumsq = np.zeros(c, np.float64)
        self.threshold = threshold
        ky, kx = self.cell[1:]
        self._y_starts = np.arange(0, y, ky)
        self._x_starts = np.arange(0, x, kx)
        self._yx_cells = (slice(0, len(self._y_starts)), slice(0, len(self._x_starts)))
        # voxels per y-x cell (edge cells may be smaller)
        self._yx_count = np.outer(np.diff(np.append(self._y_starts, y)), np.diff(np.append(self._x_starts, x)))
        kz = self.cell[0]
        acc = np.uint16 if self.dtype.itemsize == 1 and kz * 255 < 2**16 else np.uint32
        self._plane = np.empty((y, x), acc)  # one channel's sum over the slices of one z cell
        self._mask = np.empty((kz, y, x), bool)  # foreground of one z cell
        self._any = np.empty((kz, y, x), bool)
        self._fg_plane = np.empty((y, x), np.uint8)  # foreground voxels per (y, x) over one z cell (<= 8)
        self._values = np.arange(self.hist.shape[1], dtype=np.int64)
        self._squares = self._values * self._values

    def _valid_part(self, z0: int, slab: np.ndarray) -> np.ndarray:
        """The slab's voxels inside the valid region (a contiguous copy only where y or x is padded)."""
        vz, vy, vx = self.valid
        if slab.shape[2:] == (vy, vx):
            return slab[:, :max(vz - z0, 0)]
        return np.ascontiguousarray(slab[:, :max(vz - z0, 0), :vy, :vx])

    def _cell_sums(self, plane: np.ndarray) -> np.ndarray:
        """Per y-x cell sums of a 2-D integer plane (uint32 holds one cell's sum: 8x32x32x65535 < 2**32).
        Rows are summed per cell as whole-row vector adds (10x faster than `reduceat` along y), then
        per x cell with `reduceat`; a partial last cell row is summed on its own."""
        ky = self.cell[1]
        y, x = plane.shape
        full = y - y % ky
        rows = plane[:full].reshape(-1, ky, x).sum(axis=1, dtype=np.uint32)
        if full < y:
            rows = np.concatenate([rows, plane[full:].sum(axis=0, dtype=np.uint32, keepdims=True)])
        return np.add.reduceat(rows, self._x_starts, axis=1).astype(np.int64)

    def _histogram(self, block: np.ndarray) -> np.ndarray:
        """Histogram of one channel's (dz, Y, X) block (C-contiguous), exact counts."""
        if self.dtype == np.uint8 and block.flags.c_contiguous and _pillow() is not None:
            # Pillow counts an 8-bit image in C without widening it (np.bincount first copies it to int64)
            Image = _pillow()
            dz, y, x = block.shape
            image = Image.frombuffer("L", (x, dz * y), block, "raw", "L", 0, 1)  # shares the memory
            return np.array(image.histogram(), np.int64)
        return np.bincount(block.ravel(), minlength=self.hist.shape[1])

    def add(self, z0: int, slab: np.ndarray) -> None:
        slab = self._valid_part(z0, slab)
        c, dz, y, x = slab.shape
        kz = self.cell[0]
        values, squares = self._values, self._squares
        slab_sums = np.zeros(c, np.int64)
        slab_sq = np.zeros(c, np.int64)  # exact; below 2**63 for any slab of < 2**31 uint16 voxels
        for lo in range(0, dz, kz):
            hi = min(lo + kz, dz)
            gz, n = (z0 + lo) // kz, hi - lo
            count = n * self._yx_count
            mask, anyfg = self._mask[:n], self._any[:n]
            for ch in range(c):
                block = slab[ch, lo:hi]
                plane = np.add.reduce(block, axis=0, dtype=self._plane.dtype, out=self._plane)
                self.mean[(ch, gz, *self._yx_cells)] = self._cell_sums(plane) / count
                h = self._histogram(block)
                self.hist[ch] += h
                slab_sums[ch] += int(h @ values)
                slab_sq[ch] += int(h @ squares)
                np.greater(block, self.threshold, out=mask)
                if ch == 0:
                    anyfg[...] = mask
                else:
                    np.logical_or(anyfg, mask, out=anyfg)
            fg_plane = np.add.reduce(anyfg.view(np.uint8), axis=0, dtype=np.uint8, out=self._fg_plane)
            self.fg[(gz, *self._yx_cells)] = self._cell_sums(fg_plane) / count
        for ch in range(c):
            # below 2**53 the float64 sum of integers is exact, whatever the order of the additions
            self.sum[ch] += float(slab_sums[ch]) if slab_sums[ch] < EXACT else _float_sum(slab[ch].ravel(), False)
            if slab_sq[ch] < EXACT:
                self.sumsq[ch] += float(slab_sq[ch])
            else:
                self.sumsq[ch] += _float_sum(slab[ch].ravel(), True)

    def percentiles(self) -> dict[str, list[float]]:
        out = {}
        cdf = np.cumsum(self.hist, axis=1)
        for p in PERCENTILES:
            target = cdf[:, -1] * p / 100.0
            out[f"p{p:g}"] = [float(np.searchsorted(cdf[ch], target[ch])) for ch in range(len(cdf))]
        return out
