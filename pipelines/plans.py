"""Epoch plans: which patch each rank reads in which batch, reproducible from (seed, epoch).

A plan lists `rows` (indices into the PatchIndex) and `slots` (the sample's place in the global,
pre-sharding epoch order). Per-sample augmentation is seeded by (seed, epoch, slot), so it does not
depend on the loader, the worker that reads the sample, or how many ranks share the epoch.

Train: a seeded permutation of the patches, or a seeded draw (`sampling`: equal shares per class
with `balance`, per stack with "per-stack", both at once: per class, then per stack within it), as
long as the index or `draws` samples (`loader.steps_per_epoch`: the same optimizer steps for every
variant of a study); cut to a multiple of world_size * batch_size and dealt round-robin to the
ranks: disjoint, equal batch counts, every batch full. The remainder (< world_size * batch_size
patches) is left out of that epoch; it changes with the shuffle, so no patch is left out for good.
A draw repeats a share's patches only as whole shuffled passes (each appears floor or ceil times).
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


def _passes(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of `rows`: whole shuffled passes, the last one cut (each row drawn floor or ceil(k/len) times)."""
    passes = [rng.permutation(rows) for _ in range(-(-k // len(rows)))]
    return np.concatenate(passes)[:k] if passes else rows[:0]


def _shares(n: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """n split into `parts` near-equal counts; which parts get one more changes with the draw."""
    counts = np.full(parts, n // parts, np.int64)
    counts[rng.permutation(parts)[: n % parts]] += 1
    return counts


def class_rows(labels: np.ndarray) -> list[np.ndarray]:
    """The rows of each class (SAIN, MALADE); refused when one class has none (nothing to balance)."""
    members = [np.flatnonzero(labels == c) for c in (0, 1)]
    if min(len(m) for m in members) == 0:
        raise PipelineError("loader.balance = true needs training patches of both classes (SAIN and "
                            f"MALADE); these stacks give {len(members[0])} SAIN and {len(members[1])} "
                            "MALADE patches. Check the split or set loader.balance = false")
    return members


def balanced_order(labels: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """A shuffled epoch of n (default len(labels)) rows drawing half from each class.

    The minority class is repeated as whole shuffled passes (each patch appears floor or ceil times);
    the majority class is subsampled without replacement.
    """
    n = len(labels) if n is None else n
    members = class_rows(labels)
    wanted = (n // 2, n - n // 2)
    return rng.permutation(np.concatenate([_passes(rows, k, rng) for rows, k in zip(members, wanted)]))


def per_stack_order(rows: np.ndarray, stacks: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of `rows` (shuffled), each stack of `stacks` (the rows' stack numbers) drawing an equal share:
    a stack of 4,500 patches weighs as much per epoch as one of 20."""
    groups = [rows[stacks[rows] == s] for s in np.unique(stacks[rows])]
    counts = _shares(n, len(groups), rng)
    return rng.permutation(np.concatenate([_passes(g, k, rng) for g, k in zip(groups, counts)]))


def epoch_order(labels: np.ndarray, stacks: np.ndarray | None, rng: np.random.Generator, *, n: int,
                balance: bool, per_stack: bool) -> np.ndarray:
    """The epoch's n rows, before sharding (see the module docstring)."""
    if not per_stack:
        if balance:
            return balanced_order(labels, rng, n)
        return rng.permutation(len(labels)) if n == len(labels) else _passes(np.arange(len(labels)), n, rng)
    if not balance:
        return per_stack_order(np.arange(len(labels)), stacks, n, rng)
    halves = (n // 2, n - n // 2)
    return rng.permutation(np.concatenate([per_stack_order(rows, stacks, k, rng)
                                           for rows, k in zip(class_rows(labels), halves)]))


def train_plan(labels: np.ndarray, *, seed: int, epoch: int, batch_size: int, rank: int = 0,
               world_size: int = 1, balance: bool = False, stacks: np.ndarray | None = None,
               per_stack: bool = False, steps: int = 0) -> EpochPlan:
    """This rank's batches of a train epoch: `steps` full batches per rank, or (steps = 0) as many as one
    pass over the patches fills."""
    check_sharding(batch_size, rank, world_size)
    if per_stack and stacks is None:
        raise ValueError("per-stack sampling needs the patches' stack numbers")
    rng = np.random.default_rng((seed, epoch))
    n = steps * batch_size * world_size if steps else len(labels)
    order = epoch_order(np.asarray(labels), stacks, rng, n=n, balance=balance, per_stack=per_stack)
    per_rank = train_batches(n, batch_size, world_size) * batch_size
    if per_rank == 0:
        raise PipelineError(f"{len(labels)} training patches do not fill one batch of {batch_size} "
                            f"per rank on {world_size} rank(s); lower loader.batch_size or patch.stride")
    slots = np.arange(per_rank * world_size, dtype=np.int64)[rank::world_size]
    return EpochPlan(order[slots].astype(np.int64), slots, batch_size)


def eval_plan(n_patches: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> EpochPlan:
    check_sharding(batch_size, rank, world_size)
    rows = np.array_split(np.arange(n_patches, dtype=np.int64), world_size)[rank]
    return EpochPlan(rows, rows.copy(), batch_size)
