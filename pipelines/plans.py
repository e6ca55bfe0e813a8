"""Epoch plans: which patch each rank reads in which batch, reproducible from (seed, epoch).

A plan lists `rows` (indices into the PatchIndex) and `slots` (the sample's place in the global,
pre-sharding epoch order). Per-sample augmentation is seeded by (seed, epoch, slot), so it does not
depend on the loader, the worker that reads the sample, or how many ranks share the epoch.

Train: a seeded permutation (or a class-balanced draw of the same length), cut to a multiple of
world_size * batch_size and dealt round-robin to the ranks: disjoint, equal batch counts, every batch
full. The remainder (< world_size * batch_size patches) is left out of that epoch; it changes with the
shuffle, so no patch is left out for good.
Eval: every patch exactly once in index order, split into contiguous disjoint blocks per rank; the
last batch of a rank may be partial. Nothing is padded or repeated (the evaluator averages per stack).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stacktrain.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    rows: np.ndarray  # int64 (n,): patch index rows, in delivery order, for this rank
    slots: np.ndarray  # int64 (n,): global slot of each sample (seeds its augmentation)
    batch_size: int

    def __len__(self) -> int:
        """Batches in this rank's epoch."""
        return -(-len(self.rows) // self.batch_size)

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, slots) of batch i; empty arrays past the end."""
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.rows[sl], self.slots[sl]


def train_batches(n_patches: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank gets per train epoch."""
    return n_patches // (batch_size * world_size)


def check_sharding(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise PipelineError(f"loader.batch_size = {batch_size}; it must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffled epoch of len(labels) rows drawing half from each class.

    The minority class is repeated as whole shuffled passes (each patch appears floor or ceil times);
    the majority class is subsampled without replacement.
    """
    n = len(labels)
    members = [np.flatnonzero(labels == c) for c in (0, 1)]
    if min(len(m) for m in members) == 0:
        raise PipelineError("loader.balance = true needs training patches of both classes (SAIN and "
                            f"MALADE); these stacks give {len(members[0])} SAIN and {len(members[1])} "
                            "MALADE patches. Check the split or set loader.balance = false")
    wanted = (n // 2, n - n // 2)
    draws = []
    for rows, k in zip(members, wanted):
        passes = [rng.permutation(rows) for _ in range(-(-k // len(rows)))]
        draws.append(np.concatenate(passes)[:k])
    return rng.permutation(np.concatenate(draws))


def train_plan(labels: np.ndarray, *, seed: int, epoch: int, batch_size: int, rank: int = 0,
               world_size: int = 1, balance: bool = False) -> EpochPlan:
    check_sharding(batch_size, rank, world_size)
    rng = np.random.default_rng((seed, epoch))
    order = balanced_order(labels, rng) if balance else rng.permutation(len(labels))
    per_rank = train_batches(len(labels), batch_size, world_size) * batch_size
    if per_rank == 0:
        raise PipelineError(f"{len(labels)} training patches do not fill one batch of {batch_size} "
                            f"per rank on {world_size} rank(s); lower loader.batch_size or patch.stride")
    slots = np.arange(per_rank * world_size, dtype=np.int64)[rank::world_size]
    return EpochPlan(order[slots].astype(np.int64), slots, batch_size)


def eval_plan(n_patches: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> EpochPlan:
    check_sharding(batch_size, rank, world_size)
    rows = np.array_split(np.arange(n_patches, dtype=np.int64), world_size)[rank]
    return EpochPlan(rows, rows.copy(), batch_size)
