"""Epoch plans: seeded shuffles, class balance, rank sharding, eval coverage (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from stacktrain.errors import PipelineError
from stacktrain.pipelines.plans import eval_plan, train_batches, train_plan

LABELS = np.array([0] * 70 + [1] * 33)


def test_train_shuffle_is_reproducible_and_differs_across_epochs():
    a = train_plan(LABELS, seed=3, epoch=5, batch_size=8)
    b = train_plan(LABELS, seed=3, epoch=5, batch_size=8)
    c = train_plan(LABELS, seed=3, epoch=6, batch_size=8)
    d = train_plan(LABELS, seed=4, epoch=5, batch_size=8)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert not np.array_equal(a.rows, c.rows) and not np.array_equal(a.rows, d.rows)
    assert len(a) == 103 // 8 and len(a.rows) == len(a) * 8
    assert len(set(a.rows.tolist())) == len(a.rows)  # a shuffle, no repeats


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_sharding_is_disjoint_with_equal_batches(world_size):
    plans = [train_plan(LABELS, seed=0, epoch=1, batch_size=4, rank=r, world_size=world_size)
             for r in range(world_size)]
    counts = {len(p) for p in plans}
    assert counts == {train_batches(len(LABELS), 4, world_size)}
    every = np.concatenate([p.rows for p in plans])
    assert len(set(every.tolist())) == len(every)  # disjoint
    slots = np.sort(np.concatenate([p.slots for p in plans]))
    np.testing.assert_array_equal(slots, np.arange(len(slots)))  # together: one global order
    assert len(LABELS) - len(every) < world_size * 4  # only the remainder is left out


def test_balanced_epoch_has_both_classes_equally():
    plan = train_plan(LABELS, seed=1, epoch=0, batch_size=1, balance=True)
    counts = np.bincount(LABELS[plan.rows], minlength=2)
    assert abs(counts[0] - counts[1]) <= 1 and counts.sum() == len(LABELS)
    minority = plan.rows[LABELS[plan.rows] == 1]
    uses = np.bincount(minority, minlength=len(LABELS))[LABELS == 1]
    assert uses.min() >= 1 and uses.max() - uses.min() <= 1  # whole passes over the minority
    majority = plan.rows[LABELS[plan.rows] == 0]
    assert len(set(majority.tolist())) == len(majority)  # subsampled without replacement


def test_balance_needs_both_classes():
    with pytest.raises(PipelineError, match="both classes"):
        train_plan(np.zeros(10, int), seed=0, epoch=0, batch_size=2, balance=True)


def test_train_epoch_smaller_than_one_batch_is_an_error():
    with pytest.raises(PipelineError, match="do not fill one batch"):
        train_plan(LABELS[:7], seed=0, epoch=0, batch_size=4, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_plan_covers_every_patch_once(world_size):
    plans = [eval_plan(103, batch_size=8, rank=r, world_size=world_size) for r in range(world_size)]
    batches = [p.batch(i)[0] for p in plans for i in range(len(p))]
    every = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(every), np.arange(103))
    assert all(len(b) == 8 for p in plans for b in [p.batch(i)[0] for i in range(len(p) - 1)])
    assert all(0 < len(p.batch(len(p) - 1)[0]) <= 8 for p in plans)
    np.testing.assert_array_equal(plans[0].rows, eval_plan(103, batch_size=8, world_size=world_size).rows)


def test_bad_rank_is_an_error():
    with pytest.raises(PipelineError, match="rank 2"):
        eval_plan(10, batch_size=2, rank=2, world_size=2)


# -- per-stack sampling and a fixed number of steps -------------------------------------------------
STACKS = np.array([0] * 60 + [1] * 10 + [2] * 25 + [3] * 8)  # stacks 0-1 SAIN, 2-3 MALADE (as LABELS)


@pytest.mark.parametrize("balance", [False, True], ids=["per-stack", "per-stack-and-class"])
def test_per_stack_epoch_gives_every_stack_an_equal_share(balance):
    n = len(LABELS)
    plan = train_plan(LABELS, seed=2, epoch=0, batch_size=1, stacks=STACKS, per_stack=True, balance=balance)
    counts = np.bincount(STACKS[plan.rows], minlength=4)
    assert counts.sum() == n
    if balance:  # half per class, then equal within it
        assert abs(counts[:2].sum() - counts[2:].sum()) <= 1
        assert abs(counts[0] - counts[1]) <= 1 and abs(counts[2] - counts[3]) <= 1
    else:
        assert counts.max() - counts.min() <= 1
    for s in range(4):  # a small stack repeats as whole passes: each of its patches floor or ceil times
        per_patch = np.bincount(plan.rows[STACKS[plan.rows] == s], minlength=n)[STACKS == s]
        assert per_patch.max() - per_patch.min() <= 1


def test_per_stack_plan_is_reproducible_and_changes_with_the_epoch():
    a, b, c = (train_plan(LABELS, seed=1, epoch=e, batch_size=4, stacks=STACKS, per_stack=True) for e in (0, 0, 1))
    np.testing.assert_array_equal(a.rows, b.rows)
    assert not np.array_equal(a.rows, c.rows)


@pytest.mark.parametrize("steps", [3, 40], ids=["fewer-than-a-pass", "more-than-a-pass"])
@pytest.mark.parametrize("sampling", ["patch", "per-stack"])
def test_steps_per_epoch_fixes_the_batches_on_every_rank(steps, sampling):
    plans = [train_plan(LABELS, seed=0, epoch=0, batch_size=4, rank=r, world_size=2, stacks=STACKS,
                        per_stack=sampling == "per-stack", steps=steps) for r in range(2)]
    assert [len(p) for p in plans] == [steps, steps] and all(len(p.rows) == steps * 4 for p in plans)
    every = np.concatenate([p.rows for p in plans])
    uses = np.bincount(every, minlength=len(LABELS))
    if sampling == "patch":  # whole passes over the patches: each used floor or ceil times
        assert uses.max() - uses.min() <= 1


def test_steps_per_epoch_with_one_pass_equals_the_default_plan():
    steps = train_batches(len(LABELS), 8, 1)
    default = train_plan(LABELS, seed=5, epoch=2, batch_size=8)
    fixed = train_plan(LABELS, seed=5, epoch=2, batch_size=8, steps=steps)
    assert len(default) == len(fixed) == steps
