"""The statistics `convert` stores with each stack, computed in one pass over each slab.

Per stats cell (8x32x32): the fraction of foreground voxels (above the threshold in any channel) and
the mean of every channel; per channel: a histogram (for the percentiles), the sum and the sum of
squares. Everything is integer arithmetic on views of the slab, with temporaries bounded by one
stats cell's depth of slices (never a float64 copy of the slab):
- cell sums: the slices of one z cell are added into a reused integer plane, then summed per y-x
  cell with `np.add.reduceat` (cells at the edges may be partial);
- histograms: `np.bincount` over the uint8 data viewed as uint16 pairs (half the elements; the
  256x256 pair histogram folds back exactly), or over uint16 values, one z cell at a time;
- sums and sums of squares come from the histograms, exactly.

The stored values are the same floats as a float64 `mean()` per cell and a float64 `sum()` per
slab gave: integer sums are exact, and a float64 sum of integers below 2**53 is exact too. Where a
slab's sum of squares could reach 2**53 (bright uint16 data) it is computed the old way, in float64,
channel by channel (`_float_sum_of_squares`), so the value does not change.
"""

from __future__ import annotations

import numpy as np

from .layout import PERCENTILES, STATS_CELL_ZYX

EXACT = 2**53  # float64 holds every integer below this exactly


def _float_sum_of_squares(flat: np.ndarray) -> float:
    """What `(x.astype(float64) ** 2).sum()` gives for a large uint16 channel (rounding included)."""
    f = flat.astype(np.float64)
    np.multiply(f, f, out=f)
    return float(f.sum())


class SlabStats:
    """Streaming statistics of a (C, Z, Y, X) stack fed slab by slab in z order; slabs start on a
    stats-cell boundary in z (the writer's slabs are whole shards and whole cells)."""

    def __init__(self, shape, dtype, threshold: int):
        c, z, y, x = shape
        self.cell = STATS_CELL_ZYX
        self.dtype = np.dtype(dtype)
        self.grid = tuple(-(-n // k) for n, k in zip((z, y, x), self.cell))
        self.fg = np.zeros(self.grid, np.float32)
        self.mean = np.zeros((c, *self.grid), np.float32)
        self.hist = np.zeros((c, np.iinfo(self.dtype).max + 1), np.int64)
        self.sum = np.zeros(c, np.float64)
        self.sumsq = np.zeros(c, np.float64)
        self.threshold = threshold
        ky, kx = self.cell[1:]
        self._y_starts = np.arange(0, y, ky)
        self._x_starts = np.arange(0, x, kx)
        # voxels per y-x cell (edge cells may be smaller)
        self._yx_count = np.outer(np.diff(np.append(self._y_starts, y)), np.diff(np.append(self._x_starts, x)))
        kz = self.cell[0]
        acc = np.uint16 if self.dtype.itemsize == 1 and kz * 255 < 2**16 else np.uint32
        self._plane = np.empty((y, x), acc)  # one channel's sum over the slices of one z cell
        self._mask = np.empty((kz, y, x), bool)  # foreground of one z cell
        self._any = np.empty((kz, y, x), bool)
        self._pair_bins = 1 << 16 if self.dtype.itemsize == 1 else None

    def _cell_sums(self, plane: np.ndarray) -> np.ndarray:
        """Per y-x cell sums of a 2-D integer plane, as int64."""
        rows = np.add.reduceat(plane, self._y_starts, axis=0, dtype=np.int64)
        return np.add.reduceat(rows, self._x_starts, axis=1)

    def _histogram(self, block: np.ndarray) -> np.ndarray:
        """Histogram of one channel's (dz, Y, X) block (C-contiguous), exact counts."""
        bins = self.hist.shape[1]
        if self._pair_bins is None or block.size % 2:
            return np.bincount(block.ravel(), minlength=bins)
        pairs = np.bincount(block.reshape(-1).view(np.uint16), minlength=self._pair_bins).reshape(256, 256)
        return pairs.sum(axis=0) + pairs.sum(axis=1)  # each pair counts both of its bytes

    def add(self, z0: int, slab: np.ndarray) -> None:
        c, dz, y, x = slab.shape
        kz = self.cell[0]
        values = np.arange(self.hist.shape[1], dtype=np.int64)
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
                self.mean[ch, gz] = self._cell_sums(plane) / count
                h = self._histogram(block)
                self.hist[ch] += h
                slab_sums[ch] += int(h @ values)
                slab_sq[ch] += int(h @ (values * values))
                np.greater(block, self.threshold, out=mask)
                if ch == 0:
                    anyfg[...] = mask
                else:
                    np.logical_or(anyfg, mask, out=anyfg)
            fg_plane = np.add.reduce(anyfg.view(np.uint8), axis=0, dtype=np.uint16, out=self._plane[:]
                                     if self._plane.dtype == np.uint16 else None)
            self.fg[gz] = self._cell_sums(fg_plane) / count
        for ch in range(c):
            self.sum[ch] += float(slab_sums[ch])  # < 2**53: the exact float64 sum
            if slab_sq[ch] < EXACT:
                self.sumsq[ch] += float(slab_sq[ch])
            else:
                self.sumsq[ch] += _float_sum_of_squares(slab[ch].ravel())

    def percentiles(self) -> dict[str, list[float]]:
        out = {}
        cdf = np.cumsum(self.hist, axis=1)
        for p in PERCENTILES:
            target = cdf[:, -1] * p / 100.0
            out[f"p{p:g}"] = [float(np.searchsorted(cdf[ch], target[ch])) for ch in range(len(cdf))]
        return out
