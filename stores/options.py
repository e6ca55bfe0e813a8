"""How `convert` turns raw stacks into stored ones. The fields are the options of `stacktrain convert`:
the command line takes its defaults, choices and help from here, so there is one list."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from stacktrain.choices import Codec, Scale, TargetDtype
from stacktrain.config import check_choices, require
from stacktrain.errors import ConfigError

from .intensity import check_request, option_values
from .layout import DEFAULT_CHUNK_ZYX, DEFAULT_FOREGROUND_THRESHOLD, DEFAULT_SHARD_ZYX, LABELS, STATS_CELL_ZYX

DEFAULT_MIN_PATCH_ZYX = (32, 256, 256)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


DEFAULT_WORKERS = available_cores()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    codec: Codec = "lz4"
    """lz4: raw LZ4 blocks, inflatable on the GPU by DALI; zstd: core Zarr codec, any reader, CPU only."""
    workers: int = DEFAULT_WORKERS
    """Stacks converted in parallel processes, default one per available core (this process's CPU
    affinity), never more than there are stacks; 1 converts in this process. Each worker reads with
    one thread while it compresses, and holds at most two slabs of 32 slices (3x32x1024x1024 uint8:
    100 MB each). Scripts that call convert with workers > 1 need the usual
    `if __name__ == "__main__":` guard."""
    overwrite: bool = False
    """Reconvert stacks already in the store instead of skipping (or refusing) them."""
    label_map: str | None = None
    """Other label words, as WORD=SAIN or WORD=MALADE pairs, e.g. "healthy=SAIN,diseased=MALADE" (any case)."""
    axes: str | None = None
    """Source axis order for manifest rows without an `axes` cell, e.g. zyxc; unset infers it."""
    replicate_channels: bool = False
    """Copy a 1-channel source to the 3 stored channels (otherwise it is an error)."""
    scale: Scale = "none"
    """Store the stacks as uint8 by a per-stack mapping: minmax (each stack's own range to 0..255) or clip
    (to 0..255); stacks already uint8 are stored as they are."""
    dtype: TargetDtype = "keep"
    """The store's dtype: keep (the sources' uint8 or uint16, when they all agree), uint8 or uint16. Sources
    of another dtype need --window, except int16 into uint16 (+32768, lossless); one store holds one dtype."""
    window: tuple[str, str] | None = None
    """LOW HIGH mapped onto the whole --dtype range (clipped), for every source not already in --dtype:
    values (e.g. 0 4095, -1024 3071) or percentiles over every source of the manifest that it maps (e.g.
    p0.5 p99.5: one extra pass before writing), recorded in the store and reused when it grows."""
    pad: bool = False
    """Zero-pad stacks smaller than min_patch_zyx (at the end of each axis) instead of refusing them
    (an empty stack, with a zero-length axis, is refused all the same)."""
    allow_unlabeled: bool = False
    """Accept manifest rows with an empty label (or no label column) and an empty group: stacks to predict
    on. They are stored unlabeled; split leaves them out and train refuses them."""
    allow_gaps: bool = False
    """Convert a DICOM series with missing slices (a step over 1.5x the median slice spacing) instead of
    refusing it; the slices are stacked as they are and the gaps recorded in the stack's metadata (gaps)."""
    chunk_zyx: tuple[int, int, int] = DEFAULT_CHUNK_ZYX
    """Chunk shape (one channel per chunk)."""
    shard_zyx: tuple[int, int, int] = DEFAULT_SHARD_ZYX
    """Shard shape (all channels), a multiple of the chunk."""
    min_patch_zyx: tuple[int, int, int] = DEFAULT_MIN_PATCH_ZYX
    """Smallest stack accepted without pad: one training patch."""
    foreground_threshold: int = DEFAULT_FOREGROUND_THRESHOLD
    """Voxels above this in any channel count as foreground in the patch statistics."""
    levels: int | None = None
    """Pyramid levels written beside level 0 for viewers (each halves y and x, and z while it stays >= 32;
    block means, zstd): 0 writes none; default: halve until the smaller of y and x is under 256 (3 for
    1024x1024, none under 256). Training reads level 0 only."""

    def __post_init__(self):
        check_choices(self, "convert")
        self.labels()  # refuses a malformed --label-map now
        check_request(self.dtype, self.window, self.scale)
        require(self.workers >= 1, "--workers", self.workers, "give at least 1")
        require(self.levels is None or self.levels >= 0, "--levels", self.levels, "give 0 (no pyramid) or more")
        require(self.foreground_threshold >= 0, "--foreground-threshold", self.foreground_threshold,
                "give 0 or more")
        for name, zyx in (("chunk", self.chunk_zyx), ("shard", self.shard_zyx), ("min-patch", self.min_patch_zyx)):
            require(len(zyx) == 3 and all(int(n) == n and n >= 1 for n in zyx), f"--{name}", zyx,
                    "give three positive integers Z Y X")
        if any(s % c for s, c in zip(self.shard_zyx, self.chunk_zyx)):
            raise ConfigError(f"--shard {self.shard_zyx} must be a multiple of --chunk {self.chunk_zyx} "
                              "along every axis")

    def with_mapping(self, record: dict[str, Any]) -> ConvertOptions:
        """These options with a store's recorded dtype and mapping (stores.intensity.mapping_of): what
        converts new raw stacks exactly as that store's were."""
        return dataclasses.replace(self, **option_values(record))

    def labels(self) -> dict[str, str]:
        """--label-map as {word (lower case): SAIN or MALADE}."""
        mapping = {}
        for pair in filter(None, (p.strip() for p in (self.label_map or "").split(","))):
            word, sep, label = pair.partition("=")
            require(bool(sep and word.strip()) and label.strip().upper() in LABELS, "--label-map", self.label_map,
                    f"give WORD=SAIN or WORD=MALADE pairs separated by commas, e.g. healthy=SAIN,diseased=MALADE "
                    f"({pair!r} is not one)")
            mapping[word.strip().lower()] = label.strip().upper()
        return mapping

    @property
    def slab_depth(self) -> int:
        """Slices written at once: whole shards and whole statistics cells, so no write is partial."""
        return math.lcm(self.shard_zyx[0], STATS_CELL_ZYX[0])
