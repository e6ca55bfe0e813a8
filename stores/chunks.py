"""Compressed chunk bytes straight from Zarr v3 shard files, and the numpy reassembly of chunks.

zarr-python spends 120-180 us of CPU per chunk (DESIGN §4); a patch touches dozens of chunks, so the
pipelines read shard files themselves: the shard index (n_inner x (offset u64, nbytes u64) + crc32c,
at the end of the file) says where each inner chunk's bytes are. Absent inner chunks (all fill) have
offset = nbytes = 2**64-1 and are replaced by the compressed bytes of a zero chunk, so that every chunk
of a region decodes the same way on the CPU and in DALI's GPU inflate.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import lz4.block
import numcodecs
import numpy as np

from .errors import StoreError

ABSENT = np.uint64(2**64 - 1)
LZ4_HEADER = 4  # numcodecs.LZ4 prefixes each raw LZ4 block with its uncompressed size (u32 LE)


@dataclasses.dataclass(frozen=True)
class ChunkRegion:
    """The chunks covering a box of one stack, in C order over (channel, gz, gy, gx).

    `data[offsets[i]:offsets[i]+sizes[i]]` is chunk i as stored; with `raw_lz4` it is one raw LZ4
    block (header stripped), which is exactly what `fn.decoders.inflate` takes.
    """

    data: np.ndarray  # uint8, 1-D
    offsets: np.ndarray  # int32 (n,)
    sizes: np.ndarray  # int32 (n,)
    grid: tuple[int, int, int, int]  # chunks along c, z, y, x
    chunk_zyx: tuple[int, int, int]
    origin_zyx: tuple[int, int, int]  # voxel coordinates of the region's first voxel
    dtype: str
    codec: str
    raw_lz4: bool

    @property
    def n_chunks(self) -> int:
        return len(self.sizes)

    @property
    def region_shape(self) -> tuple[int, int, int, int]:
        c, gz, gy, gx = self.grid
        cz, cy, cx = self.chunk_zyx
        return (c, gz * cz, gy * cy, gx * cx)


def reassemble(chunks: np.ndarray, grid: tuple[int, int, int, int]) -> np.ndarray:
    """(n, cz, cy, cx) chunks in C order over `grid` -> the (C, Z, Y, X) region.

    The same reshape -> transpose -> reshape runs on the GPU in the DALI graph (pipelines/graph.py).
    """
    c, gz, gy, gx = grid
    _, cz, cy, cx = chunks.shape
    tiles = chunks.reshape(c, gz, gy, gx, cz, cy, cx)
    return tiles.transpose(0, 1, 4, 2, 5, 3, 6).reshape(c, gz * cz, gy * cy, gx * cx)


def reassemble_dims(grid: tuple[int, int, int, int], chunk_zyx: tuple[int, int, int]) -> list[int]:
    """The 7-D shape the chunk tensor takes before the transpose in `reassemble`."""
    return [*grid, *chunk_zyx]


REASSEMBLE_PERM = (0, 1, 4, 2, 5, 3, 6)


@functools.lru_cache(maxsize=16)
def zero_chunk_bytes(codec: str, nbytes: int, raw_lz4: bool) -> bytes:
    """How a chunk of zeros is stored, for absent chunks and for padding outside the array."""
    zeros = np.zeros(nbytes, np.uint8)
    if codec == "lz4":
        return lz4.block.compress(zeros, store_size=False) if raw_lz4 else numcodecs.LZ4().encode(zeros)
    return numcodecs.Zstd().encode(zeros)


class ShardFiles:
    """Reads inner-chunk bytes from the shard files of one array, caching open files and indexes."""

    def __init__(self, array_dir: Path, shape_czyx, chunk_czyx, shard_czyx, itemsize: int):
        self.array_dir = Path(array_dir)
        self.shape = tuple(shape_czyx)
        self.chunk_shape = tuple(chunk_czyx)
        self.shard = tuple(shard_czyx)
        self.inner = tuple(s // c for s, c in zip(self.shard, self.chunk_shape))
        self.n_inner = int(np.prod(self.inner))
        self.chunk_grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape))
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * itemsize
        self._fds: dict[tuple, int | None] = {}
        self._indexes: dict[tuple, np.ndarray | None] = {}

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = dict(self.__dict__)
        state["_fds"], state["_indexes"] = {}, {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._indexes.clear()

    def _shard(self, key: tuple) -> tuple[int | None, np.ndarray | None]:
        if key not in self._fds:
            path = self.array_dir.joinpath("c", *map(str, key))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._fds[key], self._indexes[key] = None, None
                return None, None
            size = os.fstat(fd).st_size
            index_bytes = 16 * self.n_inner + 4
            if size < index_bytes:
                os.close(fd)
                raise StoreError(f"{path}: shard file is truncated ({size} bytes); reconvert this stack")
            raw = os.pread(fd, index_bytes, size - index_bytes)
            self._fds[key] = fd
            self._indexes[key] = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_inner, 2)
        return self._fds[key], self._indexes[key]

    def chunk(self, cidx: tuple[int, int, int, int]) -> bytes | None:
        """Stored bytes of the chunk at chunk-grid index `cidx`, or None when absent / outside."""
        if any(i < 0 or i >= g for i, g in zip(cidx, self.chunk_grid)):
            return None
        key = tuple(i // n for i, n in zip(cidx, self.inner))
        fd, index = self._shard(key)
        if fd is None:
            return None
        local = tuple(i % n for i, n in zip(cidx, self.inner))
        offset, nbytes = index[np.ravel_multi_index(local, self.inner)]
        if offset == ABSENT:
            return None
        data = os.pread(fd, int(nbytes), int(offset))
        if len(data) != nbytes:
            raise StoreError(f"{self.array_dir}: shard {key} is truncated; reconvert this stack")
        return data


def region_grid(box_zyx, chunk_zyx) -> tuple[tuple[int, int], ...]:
    """Chunk index ranges [lo, hi) along z, y, x covering the voxel box ((z0, z1), (y0, y1), (x0, x1))."""
    return tuple((lo // c, -(-hi // c)) for (lo, hi), c in zip(box_zyx, chunk_zyx))


def gather(files: ShardFiles, box_zyx, *, codec: str, dtype: str, raw_lz4: bool) -> ChunkRegion:
    """Collect the stored bytes of every chunk covering `box_zyx` (all channels)."""
    ranges = region_grid(box_zyx, files.chunk_shape[1:])
    n_c = files.shape[0]
    blocks: list[bytes] = []
    zero = None
    for c in range(n_c):
        for gz in range(*ranges[0]):
            for gy in range(*ranges[1]):
                for gx in range(*ranges[2]):
                    data = files.chunk((c, gz, gy, gx))
                    if data is None:
                        zero = zero or zero_chunk_bytes(codec, files.chunk_nbytes, raw_lz4)
                        blocks.append(zero)
                    else:
                        blocks.append(data[LZ4_HEADER:] if raw_lz4 else data)
    sizes = np.fromiter((len(b) for b in blocks), dtype=np.int32, count=len(blocks))
    offsets = np.zeros(len(blocks), np.int32)
    np.cumsum(sizes[:-1], out=offsets[1:])
    data = np.frombuffer(b"".join(blocks), dtype=np.uint8)
    grid = (n_c, *(hi - lo for lo, hi in ranges))
    origin = tuple(lo * c for (lo, _), c in zip(ranges, files.chunk_shape[1:]))
    return ChunkRegion(data, offsets, sizes, grid, tuple(files.chunk_shape[1:]), origin, dtype, codec, raw_lz4)


def decode(region: ChunkRegion) -> np.ndarray:
    """Decode every chunk on the CPU -> (n, cz, cy, cx) in the region's dtype."""
    cz, cy, cx = region.chunk_zyx
    out = np.empty((region.n_chunks, cz, cy, cx), dtype=region.dtype)
    flat = out.reshape(region.n_chunks, -1).view(np.uint8)
    nbytes = flat.shape[1]
    codec = numcodecs.LZ4() if region.codec == "lz4" else numcodecs.Zstd()
    for i, (o, s) in enumerate(zip(region.offsets, region.sizes)):
        block = region.data[o:o + s]
        if region.raw_lz4:
            flat[i] = np.frombuffer(lz4.block.decompress(block, uncompressed_size=nbytes), np.uint8)
        else:
            codec.decode(block, out=flat[i])
    return out
