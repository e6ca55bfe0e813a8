"""The GPU inflate's launch limit, and how a batch's chunks are split to stay under it.

DALI's `fn.decoders.inflate` launches one CUDA block along grid z per chunk of the whole batch
(`inflate_gpu.cu`: `dim3 grid(1, 1, total_chunks)`), and CUDA caps grid z at 65535: a batch of more
chunks fails with `cudaErrorInvalidConfiguration`. So GPU mode inflates in `groups` sub-batches: the
source splits each sample's chunk list into `groups` contiguous parts (offsets_k, sizes_k), the graph
runs one inflate per part over the same device bytes and concatenates the parts in order. Every
inflate call then sees at most batch x ceil(max_chunks / groups) chunks.

    plan = inflate_plan(patch_zyx=(32, 256, 256), chunk_zyx=(8, 32, 32), channels=3, batch=64)
    plan.max_chunks, plan.groups        # 1215 chunks per sample at worst, 2 inflate calls
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stacktrain.errors import PipelineError

GRID_LIMIT = 65535  # CUDA's maximum grid z dimension


def max_spanned(n: int, chunk: int) -> int:
    """Most chunks an interval of `n` voxels can touch along an axis of `chunk`-voxel chunks (any start)."""
    return max((s + n - 1) // chunk - s // chunk + 1 for s in range(min(chunk, n + chunk)))


def min_spanned(n: int, chunk: int) -> int:
    """Fewest chunks such an interval touches (chunk-aligned start)."""
    return -(-n // chunk)


@dataclasses.dataclass(frozen=True)
class InflatePlan:
    max_chunks: int  # per sample, worst case over crop origins
    min_chunks: int  # per sample, aligned
    batch: int
    groups: int  # inflate calls per batch

    @property
    def max_chunks_per_call(self) -> int:
        return self.batch * -(-self.max_chunks // self.groups)


def inflate_plan(*, patch_zyx, chunk_zyx, channels: int, batch: int, limit: int | None = None) -> InflatePlan:
    """The fewest inflate calls per batch that keep every call at or under `limit` chunks; refuses
    (PipelineError naming the layout, batch and limit) when even one chunk group per sample is too many."""
    limit = GRID_LIMIT if limit is None else limit
    most = channels * int(np.prod([max_spanned(n, c) for n, c in zip(patch_zyx, chunk_zyx)]))
    least = channels * int(np.prod([min_spanned(n, c) for n, c in zip(patch_zyx, chunk_zyx)]))
    per_sample_cap = limit // batch  # chunks per sample and call that fit
    groups = -(-most // per_sample_cap) if per_sample_cap else 0
    if per_sample_cap == 0 or groups > least:
        layout = "x".join(map(str, chunk_zyx))
        raise PipelineError(
            f"GPU inflate: batch {batch} of {'x'.join(map(str, patch_zyx))} patches over {layout} chunks "
            f"({most} chunks per patch at most) cannot be split under CUDA's limit of {limit} chunks per "
            f"inflate call; lower loader.batch_size, or reconvert with larger chunks (--chunk 16 64 64)")
    return InflatePlan(most, least, batch, groups)


def split_chunks(offsets: np.ndarray, sizes: np.ndarray, groups: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One sample's chunk list as `groups` contiguous, non-empty parts, in order (C order is kept)."""
    bounds = np.arange(groups + 1) * len(offsets) // groups  # floor: parts differ by at most one chunk
    return [(offsets[a:b], sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
