"""Compressed chunk bytes straight from Zarr v3 shard files, and the numpy reassembly of chunks.

zarr-python spends 120-180 us of CPU per chunk (README, "Choosing chunks"); a patch touches dozens of chunks, so the
pipelines read shard files themselves: the shard index (n_inner x (offset u64, nbytes u64) + crc32c,
at the end of the file) says where each inner chunk's bytes are. Absent inner chunks (all fill) have
offset = nbytes = 2**64-1 and are replaced by the compressed bytes of a zero chunk, so that every chunk
of a region decodes the same way on the CPU and in DALI's GPU inflate.

Nothing damaged is read silently: opening a shard checks it against the stack's completeness record
(present, listed, of the recorded size), the index's crc32c, and that every chunk lies inside the file;
a chunk that does not decode to its size is refused on decode. Each is one StoreError naming the
stack, the shard file (and chunk) and pointing to `stacktrain verify`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import OrderedDict
from pathlib import Path

import lz4.block
import numcodecs
import numcodecs.blosc
import numcodecs.lz4
import numcodecs.zstd
import numpy as np

from stacktrain.errors import StoreError

from .buffers import POOL, BufferPool  # noqa: F401 (BufferPool: re-exported, as before)
from .integrity import damaged, declared_size, index_problem, record_problem

ABSENT = np.uint64(2**64 - 1)
MAX_OPEN_SHARDS = 16  # per stack; the Store keeps at most MAX_OPEN_STACKS stacks open
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
    # where the chunks come from, for the error naming a chunk that does not decode
    stack_id: str = "?"
    array_dir: str = ""
    shard_chunks: tuple[int, ...] = ()  # chunks per shard along c, z, y, x

    def chunk_place(self, i: int) -> str:
        """'<shard file>: chunk (c, z, y, x)' of chunk i (chunk-grid coordinates of the whole stack)."""
        c, *zyx = (int(v) for v in np.unravel_index(i, self.grid))
        cidx = (c, *(v + o // k for v, o, k in zip(zyx, self.origin_zyx, self.chunk_zyx)))
        shard = "/".join(str(v // n) for v, n in zip(cidx, self.shard_chunks)) if self.shard_chunks else "?"
        return f"{self.array_dir}/c/{shard}: chunk {cidx}"

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
    if codec == "blosc-lz4":  # benchmarks/store_bench.py compares it; stores are written lz4 or zstd
        return numcodecs.Blosc(cname="lz4").encode(zeros)
    return numcodecs.Zstd().encode(zeros)


class ShardFiles:
    """Reads inner-chunk bytes from the shard files of one array, caching open files and indexes."""

    def __init__(self, array_dir: Path, shape_czyx, chunk_czyx, shard_czyx, itemsize: int, *,
                 stack_id: str = "?", record: dict | None = None):
        self.array_dir = Path(array_dir)
        self.stack_id = stack_id
        self.record = record
        self.shape = tuple(shape_czyx)
        self.chunk_shape = tuple(chunk_czyx)
        self.shard = tuple(shard_czyx)
        self.inner = tuple(s // c for s, c in zip(self.shard, self.chunk_shape))
        self.n_inner = int(np.prod(self.inner))
        self.chunk_grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape))
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * itemsize
        if record is not None:  # a shape that claims more (or fewer) shards than were written
            grid = tuple(-(-g // i) for g, i in zip(self.chunk_grid[1:], self.inner[1:]))
            if tuple(record.get("grid", ())) != grid:
                raise damaged(stack_id, self.array_dir.parent.parent / "zarr.json",
                              f"its shape {self.shape} means {grid} shards (z, y, x), but "
                              f"{tuple(record.get('grid', ()))} were written")
        self._fds: OrderedDict[tuple, int | None] = OrderedDict()  # least recently used first
        self._indexes: dict[tuple, np.ndarray | None] = {}

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = dict(self.__dict__)
        state["_fds"], state["_indexes"] = OrderedDict(), {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._indexes.clear()

    def trim(self) -> None:
        """Close the least recently used shard files beyond MAX_OPEN_SHARDS (between reads, never
        during one: a region's descriptors are all collected before they are read)."""
        while len(self._fds) > MAX_OPEN_SHARDS:
            old_key, old_fd = self._fds.popitem(last=False)
            self._indexes.pop(old_key, None)
            if old_fd is not None:
                os.close(old_fd)

    def _shard(self, key: tuple) -> tuple[int | None, np.ndarray | None]:
        if key in self._fds:
            self._fds.move_to_end(key)
        else:
            rel = "c/" + "/".join(map(str, key))
            path = self.array_dir / rel
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if problem := record_problem(self.record, rel, None):
                    raise damaged(self.stack_id, path, problem) from None
                self._fds[key], self._indexes[key] = None, None
                return None, None
            try:
                size = os.fstat(fd).st_size
                index_bytes = 16 * self.n_inner + 4
                problem = record_problem(self.record, rel, size)
                if problem is None and size < index_bytes:
                    problem = f"shard file is truncated ({size} bytes, less than its {index_bytes}-byte index)"
                if problem is None:
                    index, problem = index_problem(os.pread(fd, index_bytes, size - index_bytes), size, self.n_inner)
                if problem:
                    raise damaged(self.stack_id, path, problem)
            except BaseException:
                os.close(fd)
                raise
            self._fds[key] = fd
            self._indexes[key] = index
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
            raise damaged(self.stack_id, self.array_dir.joinpath("c", *map(str, key)), "shard file is truncated")
        return data


def region_grid(box_zyx, chunk_zyx) -> tuple[tuple[int, int], ...]:
    """Chunk index ranges [lo, hi) along z, y, x covering the voxel box ((z0, z1), (y0, y1), (x0, x1))."""
    return tuple((lo // c, -(-hi // c)) for (lo, hi), c in zip(box_zyx, chunk_zyx))


def gather(files: ShardFiles, box_zyx, *, codec: str, dtype: str, raw_lz4: bool) -> ChunkRegion:
    """Collect the stored bytes of every chunk covering `box_zyx` (all channels).

    Chunks that lie next to each other in a shard file are read with one `preadv` straight into the
    region's buffer (a patch-aligned box is one read per shard), and each chunk is located by its
    offset in that buffer: nothing is copied twice. `raw_lz4` moves each offset past numcodecs'
    4-byte size header instead of stripping it. Absent and outside chunks all point at one stored
    zero chunk. (Per-chunk Python calls made this 5-10x slower than the reads: benchmarks/results.)
    """
    files.trim()
    ranges = region_grid(box_zyx, files.chunk_shape[1:])
    grid = (files.shape[0], *(hi - lo for lo, hi in ranges))
    cidx = np.indices(grid).reshape(4, -1).T + np.array([0, *(lo for lo, _ in ranges)])
    n = len(cidx)
    file_off = np.full(n, -1, np.int64)  # -1: read as the zero chunk
    nbytes = np.zeros(n, np.int64)
    inside = np.flatnonzero(((cidx >= 0) & (cidx < files.chunk_grid)).all(axis=1))
    keys = cidx[inside] // files.inner
    local = np.ravel_multi_index(tuple((cidx[inside] - keys * files.inner).T), files.inner)
    shard_grid = tuple(-(-g // i) for g, i in zip(files.chunk_grid, files.inner))
    shard_of = np.ravel_multi_index(tuple(keys.T), shard_grid)
    runs: list[tuple[int, int, int]] = []  # (fd, file offset, length), in buffer order
    run_of = np.full(n, -1, np.int64)
    for shard in np.unique(shard_of).tolist():
        mine = np.flatnonzero(shard_of == shard)
        fd, index = files._shard(tuple(int(k) for k in np.unravel_index(shard, shard_grid)))
        if fd is None:
            continue
        off, nb = index[local[mine]].T.astype(np.int64)  # ABSENT (2**64-1) wraps to -1
        present = off >= 0
        if not present.any():
            continue
        rows, off, nb = inside[mine][present], off[present], nb[present]
        order = np.argsort(off, kind="stable")
        rows, off, nb = rows[order], off[order], nb[order]
        # A new read starts where the next chunk is not adjacent; small gaps are cheaper to read through.
        gap = off[1:] - (off[:-1] + nb[:-1])
        starts = np.flatnonzero(np.concatenate(([True], gap > _GAP_READ_THROUGH))).tolist()
        for a, b in zip(starts, starts[1:] + [len(off)]):
            run_of[rows[a:b]] = len(runs)
            file_off[rows[a:b]] = off[a:b]
            nbytes[rows[a:b]] = nb[a:b]
            runs.append((fd, int(off[a]), int(off[b - 1] + nb[b - 1] - off[a])))
    run_pos = np.cumsum([0] + [length for _, _, length in runs])
    zero = zero_chunk_bytes(codec, files.chunk_nbytes, False) if (file_off < 0).any() else b""
    data = POOL.take(int(run_pos[-1]) + len(zero))
    for (fd, offset, length), pos in zip(runs, run_pos.tolist()):
        if os.preadv(fd, [memoryview(data[pos:pos + length])], offset) != length:
            raise damaged(files.stack_id, files.array_dir, "a shard file shrank while it was read")
    data[len(data) - len(zero):] = np.frombuffer(zero, np.uint8)
    absent = file_off < 0
    found = np.flatnonzero(~absent)
    offsets = np.full(n, run_pos[-1], np.int64)
    offsets[found] = (run_pos[run_of[found]] + file_off[found]
                      - np.asarray([r[1] for r in runs], np.int64)[run_of[found]])
    nbytes[absent] = len(zero)
    if raw_lz4 and len(found):  # the GPU inflates without the size header: check what it announces here
        heads = data[offsets[found, None] + np.arange(LZ4_HEADER)].copy().view("<u4").ravel()
        if (bad := np.flatnonzero(heads != files.chunk_nbytes)).size:
            i = int(found[bad[0]])
            raise damaged(files.stack_id, files.array_dir, f"chunk {tuple(int(v) for v in cidx[i])} announces "
                          f"{int(heads[bad[0]])} decoded bytes, a chunk has {files.chunk_nbytes}")
    header = LZ4_HEADER if raw_lz4 else 0
    origin = tuple(lo * c for (lo, _), c in zip(ranges, files.chunk_shape[1:]))
    return ChunkRegion(data, (offsets + header).astype(np.int32), (nbytes - header).astype(np.int32), grid,
                       tuple(files.chunk_shape[1:]), origin, dtype, codec, raw_lz4,
                       stack_id=files.stack_id, array_dir=str(files.array_dir), shard_chunks=tuple(files.inner))


_GAP_READ_THROUGH = 16 << 10  # bytes: reading a gap this small costs less than another system call


def chunk_decoder(codec: str):
    """(source buffer, destination row) -> None, decoding straight into the destination."""
    if codec == "lz4":
        return numcodecs.lz4.decompress
    if codec == "zstd":
        return numcodecs.zstd.decompress
    if codec == "blosc-lz4":
        return numcodecs.blosc.decompress
    raise StoreError(f"unknown codec {codec!r}; this stacktrain decodes lz4, zstd and blosc-lz4")


def decode_chunk(region: ChunkRegion, i: int, source, dest: np.ndarray, decompress) -> None:
    """Decode stored chunk i into `dest` (one row), or raise StoreError naming the stack, file and chunk."""
    try:
        size = declared_size(region.codec, source)
        if size is not None and size != dest.nbytes:
            raise ValueError(f"it announces {size} decoded bytes, a chunk has {dest.nbytes}")
        decompress(source, dest)
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise damaged(region.stack_id, region.chunk_place(i), f"does not decode ({text})") from None


def decode(region: ChunkRegion) -> np.ndarray:
    """Decode every chunk on the CPU -> (n, cz, cy, cx) in the region's dtype."""
    cz, cy, cx = region.chunk_zyx
    itemsize = np.dtype(region.dtype).itemsize
    out = POOL.take(region.n_chunks * cz * cy * cx * itemsize).view(region.dtype).reshape(region.n_chunks, cz, cy, cx)
    flat = out.reshape(region.n_chunks, -1).view(np.uint8)
    nbytes = flat.shape[1]
    source = memoryview(region.data)
    pairs = zip(region.offsets.tolist(), region.sizes.tolist())
    if region.raw_lz4:  # raw blocks carry no size header: the block decoder needs the size
        def raw_block(src, dest):
            block = lz4.block.decompress(src, uncompressed_size=nbytes)
            if len(block) != nbytes:
                raise ValueError(f"{len(block)} decoded bytes, a chunk has {nbytes}")
            dest[:] = np.frombuffer(block, np.uint8)
        codec = dataclasses.replace(region, codec="raw-lz4")
        for i, (o, s) in enumerate(pairs):
            decode_chunk(codec, i, source[o:o + s], flat[i], raw_block)
        return out
    decompress = chunk_decoder(region.codec)
    for i, (o, s) in enumerate(pairs):
        decode_chunk(region, i, source[o:o + s], flat[i], decompress)
    return out
