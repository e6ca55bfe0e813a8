"""build_loader: the interface the trainer uses, coverage, sharding, reproducibility, errors."""

from __future__ import annotations

import collections
import multiprocessing

import numpy as np
import pytest
import torch

from stacktrain.errors import BatchContractError, PipelineError
from stacktrain.pipelines import loaders
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.contract import BatchSpec, NormSpec, check_batch
from stacktrain.pipelines.loaders import build_loader, channel_mean_std, resolve_loader
from stacktrain.pipelines.normalize import normalize_images
from stacktrain.stores import writer
from stacktrain.stores.reader import Store

PATCH = PatchConfig(size=(8, 16, 16))
AUG = PreprocessConfig(flip=(True, True, True), jitter=2)


@pytest.fixture
def store_arrays(shared_small_store):
    """conftest's small store (read only here) as (Store, arrays)."""
    path, arrays = shared_small_store
    return Store(path), arrays


def make(store, kind, *, train, batch_size=5, rank=0, world_size=1, prep=AUG, **cfg):
    cfg = LoaderConfig(loader=kind, batch_size=batch_size, workers=cfg.pop("workers", 2), seed=11, **cfg)
    return build_loader(store, store.stack_ids, train=train, patch=PATCH, prep=prep, cfg=cfg, rank=rank,
                        world_size=world_size)


def keys(loader, batches):
    return [(loader.stack_ids[int(s)], tuple(p.tolist())) for b in batches
            for s, p in zip(b.stack_index, b.position)]


@pytest.mark.parametrize("kind", ["dali-cpu", "torch"])
def test_eval_covers_every_patch_once_over_two_ranks(store_arrays, kind):
    store, _ = store_arrays
    seen, sizes = collections.Counter(), []
    for rank in range(2):
        with make(store, kind, train=False, rank=rank, world_size=2) as loader:
            batches = list(loader.epoch(0))
            assert len(batches) == len(loader)
            seen.update(keys(loader, batches))
            sizes.append([len(b) for b in batches])
            labels = {k: float(l) for b in batches for k, l in zip(keys(loader, [b]), b.labels)}
            assert all(labels[k] == store.meta(k[0]).label_index for k in labels)
    index = loader.index
    assert len(index) // 2 % 5 != 0  # the batch size does not divide a rank's count
    assert seen == collections.Counter(index.key(r) for r in range(len(index)))  # each exactly once
    assert all(n == 5 for s in sizes for n in s[:-1]) and all(0 < s[-1] < 5 for s in sizes)


def test_train_sharding_two_ranks_disjoint_equal(store_arrays):
    store, _ = store_arrays
    prep = PreprocessConfig(flip=(True, True, True), jitter=0)  # positions stay on the grid
    per_rank = []
    for rank in range(2):
        with make(store, "dali-cpu", train=True, rank=rank, world_size=2, prep=prep) as loader:
            batches = list(loader.epoch(4))
            assert len(batches) == len(loader) and all(len(b) == 5 for b in batches)
            per_rank.append(keys(loader, batches))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == len(per_rank[0])
    assert len(per_rank[0]) * 2 > len(loader.index) - 2 * 5  # only the remainder is left out


@pytest.mark.parametrize("kind", ["dali-cpu", "torch"])
def test_epochs_reproducible_and_different(store_arrays, kind):
    store, _ = store_arrays
    with make(store, kind, train=True) as loader:
        first = list(loader.epoch(1))
        next_epoch = list(loader.epoch(2))
        again = list(loader.epoch(1))  # out of sequence: DALI rebuilds its pipeline
    with make(store, kind, train=True, workers=0) as fresh:
        partial = next(iter(fresh.epoch(0)))  # abandon an epoch midway
        assert len(partial) == 5
        fresh_first = list(fresh.epoch(1))
    for other in (again, fresh_first):
        assert len(other) == len(first)
        for a, b in zip(first, other):
            assert torch.equal(a.images, b.images) and torch.equal(a.position, b.position)
            assert torch.equal(a.labels, b.labels) and torch.equal(a.stack_index, b.stack_index)
    assert keys(loader, first) != keys(loader, next_epoch)


def test_bf16_channels_last_and_spec(store_arrays):
    store, _ = store_arrays
    with make(store, "dali-cpu", train=False, dtype="bf16", channels_last=True) as loader:
        assert loader.kind == "dali-cpu"
        assert loader.spec == BatchSpec(3, (8, 16, 16), torch.bfloat16, "cpu", 5, raw_dtype=torch.uint8,
                                        clip=False, channels_last=True)
        batch = next(iter(loader.epoch(0)))
    assert batch.images.dtype == torch.uint8  # raw out of the loader; the trainer normalises
    assert batch.norm == NormSpec(torch.bfloat16, clip=False, channels_last=True)
    assert batch.lo.shape == batch.mul.shape == (5, 3, 1, 1, 1)
    images = normalize_images(batch.images, batch.lo, batch.mul, clip=batch.norm.clip, dtype=batch.norm.dtype,
                              channels_last=batch.norm.channels_last)
    assert images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last_3d)
    assert batch.labels.dtype == torch.float32 and batch.position.dtype == torch.int64


def test_contract_violations_are_listed(store_arrays):
    store, _ = store_arrays
    with make(store, "torch", train=False) as loader:
        batch = next(iter(loader.epoch(0)))
        check_batch(batch, loader.spec)
        batch.images = batch.images.float()
        batch.lo = batch.lo[:, :2]
        with pytest.raises(BatchContractError, match=r"images.dtype: expected torch.uint8 .*\n.*lo.shape"):
            check_batch(batch, loader.spec)


@pytest.mark.parametrize("kind", ["dali-cpu", "torch"])
def test_close_stops_workers(store_arrays, kind):
    store, _ = store_arrays
    before = len(multiprocessing.active_children())
    loader = make(store, kind, train=False)
    next(iter(loader.epoch(0)))
    assert len(multiprocessing.active_children()) >= before + 2
    loader.close()
    assert len(multiprocessing.active_children()) == before


def test_channel_mean_std_matches_voxels(store_arrays):
    store, arrays = store_arrays
    ids = ["s0", "s2"]
    voxels = np.concatenate([arrays[s].reshape(3, -1) for s in ids], axis=1).astype(np.float64)
    mean, std = channel_mean_std(store, ids)
    np.testing.assert_allclose(mean, voxels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(std, voxels.std(axis=1), rtol=1e-6)


def test_auto_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_loader("auto") == "dali-cpu"
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    assert resolve_loader("auto") == "torch"
    with pytest.raises(PipelineError, match="needs NVIDIA DALI"):
        resolve_loader("dali-cpu")


def test_bad_inputs_are_clear_errors(store_arrays, tmp_path, monkeypatch):
    store, _ = store_arrays
    cfg = LoaderConfig(loader="torch", batch_size=4)
    kw = dict(train=True, patch=PATCH, prep=PreprocessConfig(), cfg=cfg)
    with pytest.raises(PipelineError, match=r"'s1' .* smaller than the patch"):
        build_loader(store, ["s1"], **{**kw, "patch": PatchConfig(size=(32, 16, 16))})
    writer.init_store(tmp_path / "empty.zarr")
    with pytest.raises(PipelineError, match="has no stacks"):
        build_loader(Store(tmp_path / "empty.zarr"), [], **kw)
    with pytest.raises(PipelineError, match="no stacks were given"):
        build_loader(store, [], **kw)
    with pytest.raises(PipelineError, match="'tpu' is not a loader; choose one of auto, dali"):
        resolve_loader("tpu")
    with pytest.raises(ValueError, match="choose one of"):
        LoaderConfig(loader="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="no CUDA device; use loader = \"dali-cpu\""):
        build_loader(store, store.stack_ids, **{**kw, "cfg": LoaderConfig(loader="dali")})
    with pytest.raises(PipelineError, match="needs the training stacks' statistics"):
        build_loader(store, ["s0"], **{**kw, "train": False, "prep": PreprocessConfig(normalize="meanstd")})
    with pytest.raises(PipelineError, match="do not fill one batch"):
        build_loader(store, ["s1"], **{**kw, "cfg": LoaderConfig(loader="torch", batch_size=64)})


def test_spawned_workers_deliver_the_same(store_arrays, monkeypatch):
    """GPU mode starts its workers with spawn: the source must pickle and import cleanly there."""
    from stacktrain.pipelines import dali_loader
    store, _ = store_arrays
    with make(store, "torch", train=True, workers=0) as loader:
        want = list(loader.epoch(0))
    monkeypatch.setattr(dali_loader, "start_method", lambda gpu=False: "spawn")
    with make(store, "dali-cpu", train=True) as loader:
        got = list(loader.epoch(0))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.images, b.images) and torch.equal(a.position, b.position)


@pytest.mark.parametrize("initialized, available, gpu, want", [
    (False, False, False, "fork"), (True, False, False, "spawn"), (False, True, False, "spawn"),
    (False, False, True, "spawn")])
def test_one_start_method_rule(monkeypatch, initialized, available, gpu, want):
    """fork only where no CUDA driver can be up: faked driver states, one rule for every loader."""
    from stacktrain.pipelines import workers
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert workers.start_method(gpu=gpu) == want
