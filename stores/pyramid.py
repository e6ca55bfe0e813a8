"""The multiscale pyramid beside a stack's level 0: levels 1..k, streamed from level 0's slabs.

Each level halves y and x (ceil: an odd edge's last block averages the one row or column there is),
and halves z only while the halved depth stays >= MIN_LEVEL_Z (one default patch deep), so a level
never gets thinner than a patch. Level k is the block mean of level 0 over its whole block (2^k in y
and x), rounded half up in integers: each level keeps sums, not means, so rounding never compounds
from level to level, and the next level adds those sums in pairs (about 1/7 more work than level 0
alone, not k times).

Streaming: level 0 arrives in z order, slab by slab. Each level holds at most one row of sums it
could not pair yet (its carry) and one shard's depth of its own output, written to zarr when the
shard is complete, so memory does not grow with the stack's depth. Levels >= 1 use zstd, a core Zarr v3
codec every reader opens (level 0 stays LZ4 for the GPU): zarr-python creates each level's array
(`create_array`, its zarr.json), and `stores.shards.ShardWriter` writes its shard files, the bytes zarr
writes without zarr's per-chunk cost.
Training and patch reading use level 0 only.
"""

from __future__ import annotations

import math

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from stacktrain.errors import StoreError

from .layout import PYRAMID_MIN_YX, PYRAMID_MIN_Z
from .shards import ZSTD_LEVEL, ShardWriter


def default_levels(shape) -> int:
    """Halvings until the smaller of y and x is under PYRAMID_MIN_YX (3 for 1024 x 1024, 0 under 256)."""
    y, x = shape[-2:]
    k = 0
    while min(y, x) >= PYRAMID_MIN_YX:
        y, x, k = -(-y // 2), -(-x // 2), k + 1
    return k


def level_shapes(shape, levels: int | None) -> list[tuple[int, int, int]]:
    """(z, y, x) of levels 1..k of a (C, Z, Y, X) stack; `levels` None: default_levels."""
    k = default_levels(shape) if levels is None else int(levels)
    if k < 0:
        raise StoreError(f"--levels {levels}: give 0 (no pyramid) or more")
    z, y, x = shape[1:]
    out = []
    for i in range(k):
        if y == 1 and x == 1:
            raise StoreError(f"--levels {levels}: a stack of shape {tuple(shape)} halves only {i} times "
                             f"in y and x; give at most {i}, or omit --levels for the default")
        half_z = -(-z // 2)
        z, y, x = (half_z if half_z >= PYRAMID_MIN_Z else z), -(-y // 2), -(-x // 2)
        out.append((z, y, x))
    return out


def factors(shape, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """How many level-0 voxels one voxel of each level spans along z, y, x (level 0 first: 1, 1, 1)."""
    out = [(1, 1, 1)]
    prev = tuple(shape[1:])
    for s in shapes:
        out.append(tuple(f * (2 if n < p else 1) for f, n, p in zip(out[-1], s, prev)))
        prev = s
    return out


def _pair(a: np.ndarray, axis: int, dtype) -> np.ndarray:
    """Sums of neighbouring pairs along `axis` in `dtype`; an odd last element stands alone."""
    n = a.shape[axis]
    h = n // 2

    def cut(s):
        return (slice(None),) * axis + (s,)

    out = np.empty(a.shape[:axis] + (h + n % 2,) + a.shape[axis + 1:], dtype)
    np.add(a[cut(slice(0, 2 * h, 2))], a[cut(slice(1, 2 * h, 2))], out=out[cut(slice(0, h))], dtype=dtype)
    if n % 2:
        out[cut(slice(h, h + 1))] = a[cut(slice(n - 1, n))]
    return out


def _sum_dtype(dtype: np.dtype, block: int) -> np.dtype:
    """The narrowest unsigned type that holds a whole block's sum plus half the block (the rounding):
    uint16 for uint8 data up to 4x4x4 blocks, so the widest level costs the least memory traffic."""
    top = int(np.iinfo(dtype).max) * block + block
    return next(np.dtype(t) for t in (np.uint16, np.uint32, np.uint64) if top < np.iinfo(t).max)


def _level_grid(n: int, chunk: int, shard: int) -> tuple[int, int]:
    """A level's chunk and shard along one axis: level 0's, shrunk to the level where it is smaller."""
    chunk = min(chunk, n)
    return chunk, min(shard, -(-n // chunk) * chunk)


class _Level:
    """One level: pairs the sums it is given, writes their means a shard deep at a time, passes the sums on."""

    def __init__(self, array, shards: ShardWriter, halve_z: bool, counts_yx: np.ndarray, sum_dtype, dtype):
        self.array = array
        self.shards = shards
        self.halve_z = halve_z
        self.cyx = counts_yx.astype(sum_dtype)
        first = int(counts_yx.flat[0])  # every block whole in y and x (no odd edge): one count for all
        self.uniform_yx = first if bool((counts_yx == first).all()) else None
        self.sum_dtype = sum_dtype
        c, _, y, x = array.shape
        self.out = np.empty((c, array.shards[1], y, x), dtype)  # one shard deep: writes stay shard-aligned
        self.filled = 0
        self.written = 0
        self.carry: tuple[np.ndarray, np.ndarray] | None = None
        self.next: _Level | None = None

    def push(self, block: np.ndarray, zc: np.ndarray) -> None:
        """`block`: (C, n, Y, X) sums (or voxels) of the level above, `zc`: level-0 slices per row."""
        s = _pair(_pair(block, 2, self.sum_dtype), 3, self.sum_dtype)
        if self.carry is not None:
            s, zc = np.concatenate([self.carry[0], s], axis=1), np.concatenate([self.carry[1], zc])
            self.carry = None
        if self.halve_z:
            even = s.shape[1] - s.shape[1] % 2
            if even < s.shape[1]:
                self.carry = (s[:, even:].copy(), zc[even:])
                s, zc = s[:, :even], zc[:even]
            s, zc = _pair(s, 1, self.sum_dtype), _pair(zc, 0, zc.dtype)
        if s.shape[1]:
            self._emit(s, zc)

    def _emit(self, s: np.ndarray, zc: np.ndarray) -> None:
        n = self.uniform_yx * int(zc[0]) if self.uniform_yx and bool((zc == zc[0]).all()) else 0
        if n and n & (n - 1) == 0:  # whole blocks: a shift, much cheaper than integer division
            mean = (s + n // 2) >> n.bit_length() - 1
        else:
            count = zc.astype(self.sum_dtype)[:, None, None] * self.cyx[None]
            mean = (s + count // 2) // count  # the block mean, rounded half up, exactly
        depth = self.out.shape[1]
        i = 0
        while i < mean.shape[1]:
            n = min(depth - self.filled, mean.shape[1] - i)
            self.out[:, self.filled:self.filled + n] = mean[:, i:i + n]
            self.filled, i = self.filled + n, i + n
            if self.filled == depth:
                self._flush()
        if self.next is not None:
            self.next.push(s, zc)

    def _flush(self) -> None:
        if self.filled:
            self.shards.write_slab(self.written, self.out[:, :self.filled])
            self.written += self.filled
            self.filled = 0

    def finish(self) -> None:
        if self.carry is not None:
            s, zc = self.carry
            self.carry = None
            self._emit(_pair(s, 1, self.sum_dtype), _pair(zc, 0, zc.dtype))
        self._flush()
        if self.written != self.array.shape[1]:
            raise StoreError(f"pyramid level {self.array.path}: wrote {self.written} of {self.array.shape[1]} slices")


class PyramidWriter:
    """Creates levels 1..k in `image` (a zarr group beside level 0) and fills them from level 0's slabs,
    given in z order with `add`; `finish` writes what is left."""

    def __init__(self, image: zarr.Group, shape, dtype: str, levels: int | None, *, chunk_zyx, shard_zyx):
        self.shape = tuple(shape)
        self.shapes = level_shapes(self.shape, levels)
        self.factors = factors(self.shape, self.shapes)
        c = self.shape[0]
        dtype = np.dtype(dtype)
        self.levels: list[_Level] = []
        cy, cx = np.ones(self.shape[2], np.int64), np.ones(self.shape[3], np.int64)
        prev = self.shape[1:]
        for k, zyx in enumerate(self.shapes, start=1):
            sum_dtype = _sum_dtype(dtype, math.prod(self.factors[k]))
            grid = [_level_grid(n, ch, sh) for n, ch, sh in zip(zyx, chunk_zyx, shard_zyx)]
            array = image.create_array(str(k), shape=(c, *zyx), dtype=dtype, chunks=(1, *(g[0] for g in grid)),
                                       shards=(c, *(g[1] for g in grid)), compressors=[ZstdCodec(level=ZSTD_LEVEL)],
                                       fill_value=0, dimension_names=("c", "z", "y", "x"))
            cy, cx = _pair(cy, 0, np.int64), _pair(cx, 0, np.int64)
            # the shard files as zarr would write them, without its per-chunk cost (stores/shards.py)
            shards = ShardWriter(image.store_path.store.root / array.path, array.shape, dtype, codec="zstd",
                                 chunk_zyx=array.chunks[1:], shard_zyx=array.shards[1:])
            level = _Level(array, shards, zyx[0] < prev[0], cy[:, None] * cx[None, :], sum_dtype, dtype)
            if self.levels:
                self.levels[-1].next = level
            self.levels.append(level)
            prev = zyx
        # level 1 takes level 0 two slices at a time (one when it keeps z): its temporaries stay small
        self.step = 2 if self.levels and self.levels[0].halve_z else 1

    def add(self, slab: np.ndarray) -> None:
        if not self.levels:
            return
        first = self.levels[0]
        for i in range(0, slab.shape[1], self.step):
            piece = slab[:, i:i + self.step]
            first.push(piece, np.ones(piece.shape[1], np.int64))

    def finish(self) -> None:
        for level in self.levels:  # in order: each one's last row feeds the next before it finishes
            level.finish()
