"""Shard files of a Zarr v3 array written straight from slabs: the same bytes zarr-python writes.

zarr-python spends 120-180 us of CPU per chunk on its way through the codec pipeline (README,
"Choosing chunks"); a 3x64x1024x1024 stack has 3,072 chunks, so `convert` assembles the shard files
itself, as zarr's sharding codec lays them out (`zarr.codecs.sharding`):
- inner chunks in zarr's Morton order (`zarr.core.indexing.morton_order_iter`), each one encoded by
  the same numcodecs codec zarr wraps (`numcodecs.LZ4`, `numcodecs.Zstd`), concatenated;
- chunks whose voxels all equal the fill value (0) are not stored (zarr's `write_empty_chunks=False`):
  their index entry is (2**64-1, 2**64-1); a shard with no stored chunk is not written at all;
- edge chunks are padded with the fill value to the full chunk shape;
- at the end, the index: (offset, nbytes) as little-endian uint64 per inner chunk in C order, and the
  crc32c of the index (google_crc32c, what zarr's `Crc32cCodec` uses), little-endian uint32.
The array's zarr.json is written by zarr-python (`create_array`); tests/stores/test_shards.py checks
the files byte for byte against zarr-python's own for both codecs, edges and empty chunks included.
Each shard is copied once, chunk-major, into a reused buffer (one strided copy), its empty chunks found
in one vectorized pass, and each chunk encoded from there; the encoded parts go to the file with one
vectored write.
While writing, each shard's byte size, the crc32c of its bytes and the crc32c of its content (each
stored chunk's index position and its buffer just encoded, in file order) go into `files`, the stack's
completeness record: computed from bytes already in cache, so the checksums cost no second pass.
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
from zarr.core.indexing import morton_order_iter

from .layout import shard_relpath

ABSENT = 2**64 - 1
ZSTD_LEVEL = 3  # the writer's ZstdCodec(level=3)


def chunk_encoder(codec: str):
    """bytes-like -> bytes, the numcodecs codec behind zarr's LZ4 / ZstdCodec(level=3) of the store."""
    if codec == "lz4":
        return numcodecs.LZ4().encode
    if codec == "zstd":
        return numcodecs.Zstd(level=ZSTD_LEVEL, checksum=False).encode
    raise ValueError(f"unknown codec {codec!r}")


class ShardWriter:
    """Writes the shards of one (C, Z, Y, X) array from slabs that start on a shard boundary in z and
    span whole shards in z (the last may end with the array). Shards hold all C channels."""

    def __init__(self, array_dir: Path, shape, dtype, *, codec: str, chunk_zyx, shard_zyx):
        self.array_dir = Path(array_dir)
        self.shape = tuple(shape)
        self.chunk = tuple(chunk_zyx)
        self.shard = tuple(shard_zyx)
        c = self.shape[0]
        self.inner = (c, *(s // k for s, k in zip(self.shard, self.chunk)))
        # zarr's order of the chunks inside a shard, as positions in the C-order index
        self.order = [int(np.ravel_multi_index(key, self.inner)) for key in morton_order_iter(self.inner)]
        self.encode = chunk_encoder(codec)
        # One shard's chunks, chunk after chunk in C order over (c, iz, iy, ix): filled by one strided
        # copy per shard (per-chunk copies cost more in Python calls than in bytes), reused.
        self.tiles = np.empty((*self.inner, *self.chunk), dtype)
        self.edge = np.empty((c, *self.shard), dtype)  # a shard cut by the array's edge, padded with 0
        self.index = np.empty((int(np.prod(self.inner)), 2), "<u8")
        self.shards_written = 0
        self.bytes_written = 0
        self.files: dict[str, list[int]] = {}  # "c/0/z/y/x" -> [size, file crc32c, content crc32c]

    def write_slab(self, z0: int, slab: np.ndarray) -> None:
        sz = self.shard[0]
        if z0 % sz:
            raise ValueError(f"slab at z={z0} does not start on a shard boundary ({sz})")
        _, dz, y, x = slab.shape
        for lz in range(0, dz, sz):
            for y0 in range(0, y, self.shard[1]):
                for x0 in range(0, x, self.shard[2]):
                    self._write_shard(slab, lz, y0, x0, (z0 + lz) // sz)

    def _chunks(self, slab: np.ndarray, lz: int, y0: int, x0: int) -> np.ndarray:
        """(n_inner, chunk bytes) rows of the shard at (lz, y0, x0) of the slab, zero past the array's edge."""
        (sz, sy, sx), (kz, ky, kx) = self.shard, self.chunk
        block = slab[:, lz:lz + sz, y0:y0 + sy, x0:x0 + sx]
        if block.shape[1:] != self.shard:
            self.edge.fill(0)
            self.edge[:, :block.shape[1], :block.shape[2], :block.shape[3]] = block
            block = self.edge
        c, iz, iy, ix = self.inner
        np.copyto(self.tiles.transpose(0, 1, 4, 2, 5, 3, 6), block.reshape(c, iz, kz, iy, ky, ix, kx))
        return self.tiles.reshape(len(self.index), -1).view(np.uint8)

    def _write_shard(self, slab: np.ndarray, lz: int, y0: int, x0: int, gz: int) -> None:
        rows, index = self._chunks(slab, lz, y0, x0), self.index
        words = rows.view(np.uint64) if rows.shape[1] % 8 == 0 else rows
        stored = words.any(axis=1)  # chunks equal to the fill value (0) are not stored
        index.fill(ABSENT)
        parts: list[bytes] = []
        offset = content = 0
        for position in self.order:
            if not stored[position]:
                continue
            buf = rows[position]
            # each chunk's index position goes in too: the content checksum also sees chunks swapped in
            # the index (a file checksum cannot: crc(index + crc(index)) is the same for every index)
            content = google_crc32c.extend(content, position.to_bytes(4, "little"))
            content = google_crc32c.extend(content, buf)
            data = self.encode(buf)
            parts.append(data)
            index[position] = (offset, len(data))
            offset += len(data)
        if not parts:
            return
        table = index.tobytes()
        parts += [table, google_crc32c.value(table).to_bytes(4, "little")]
        rel = shard_relpath(gz, y0 // self.shard[1], x0 // self.shard[2])
        path = self.array_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        file_crc = 0
        for part in parts:
            file_crc = google_crc32c.extend(file_crc, part)
        with open(path, "wb") as f:
            f.writelines(parts)
        size = offset + len(table) + 4
        self.files[rel] = [size, file_crc, content]
        self.shards_written += 1
        self.bytes_written += size
