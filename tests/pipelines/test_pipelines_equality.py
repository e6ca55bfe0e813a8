"""DALI CPU mode == the torch reference loader == numpy slicing of the source stacks, element-wise:
the raw patches (store dtype) and the normalised batches (the one torch normalisation, on the CPU)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.loaders import build_loader, channel_mean_std
from stacktrain.pipelines.normalize import normalize_images
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array

SIZE = (6, 12, 20)  # not chunk-aligned (chunks are 8x16x16): every crop has a non-zero anchor somewhere
NO_AUG = dict(flip=(False, False, False), jitter=0)


@pytest.fixture
def small_store(shared_small_store):
    """conftest's small store, written once per test process: these tests only read it."""
    return shared_small_store


def make(store, kind, *, train=False, edge="fit", normalize="scale", dtype="fp32", batch_size=16,
         norm_stats=None, **aug):
    prep = PreprocessConfig(normalize=normalize, **(aug or NO_AUG))
    cfg = LoaderConfig(loader=kind, batch_size=batch_size, workers=2, prefetch=2, dtype=dtype, seed=7)
    return build_loader(store, store.stack_ids, train=train, patch=PatchConfig(size=SIZE, edge=edge),
                        prep=prep, cfg=cfg, norm_stats=norm_stats)


def read_epoch(loader, epoch=0):
    try:
        return list(loader.epoch(epoch))
    finally:
        loader.close()


def normalized(batches) -> torch.Tensor:
    """What the trainer's input step makes of the batches (on the CPU)."""
    return torch.cat([normalize_images(b.images, b.lo, b.mul, clip=b.norm.clip, dtype=b.norm.dtype)
                      for b in batches])


def raw(batches) -> np.ndarray:
    return torch.cat([b.images for b in batches]).numpy()


def numpy_patch(arrays, sid, start, flips=(0, 0, 0)):
    """The patch at `start` sliced from the source array (zeros past the edge), flipped as asked."""
    arr = arrays[sid]
    padded = np.zeros((arr.shape[0], *(n + s for n, s in zip(arr.shape[1:], SIZE))), arr.dtype)
    padded[:, :arr.shape[1], :arr.shape[2], :arr.shape[3]] = arr
    (z, y, x), (d, h, w) = start, SIZE
    patch = padded[:, z:z + d, y:y + h, x:x + w]
    for axis, f in enumerate(flips, start=1):
        if f:
            patch = np.flip(patch, axis)
    return patch


def expected_images(arrays, loader, batches, lo_mul):
    """What each image must be, from the stack arrays and the source's own choice of crop and flips."""
    plan = loader.source.plan(0)
    out = []
    for i, batch in enumerate(batches):
        rows, slots = plan.batch(i)
        for j, (row, slot) in enumerate(zip(rows, slots)):
            start, flips = loader.source.augmentation(0, int(slot), int(row))
            sid = loader.stack_ids[int(batch.stack_index[j])]
            assert batch.position[j].tolist() == start.tolist()
            lo, mul = lo_mul(sid)
            out.append((numpy_patch(arrays, sid, start, flips).astype(np.float32) - lo) * mul)
    return np.stack(out)


def scale(_sid):
    return np.float32(0), np.float32(1 / 255)


@pytest.mark.parametrize("edge", ["fit", "drop", "pad"])
def test_eval_equal_to_torch_and_numpy_for_every_position(small_store, edge):
    path, arrays = small_store
    store = Store(path)
    dali_batches = read_epoch(make(store, "dali-cpu", edge=edge))
    torch_loader = make(store, "torch", edge=edge)
    index = torch_loader.index
    torch_batches = read_epoch(torch_loader)
    assert dali_batches[0].images.dtype == torch.uint8  # raw out of the pipelines
    np.testing.assert_array_equal(raw(dali_batches), raw(torch_batches))
    dali = normalized(dali_batches).numpy()
    np.testing.assert_array_equal(dali, normalized(torch_batches).numpy())
    positions = torch.cat([b.position for b in dali_batches]).numpy()
    np.testing.assert_array_equal(positions, index.position)  # eval: index order, every position
    patches = np.stack([numpy_patch(arrays, *index.key(r)) for r in range(len(index))])
    np.testing.assert_array_equal(raw(dali_batches), patches)
    np.testing.assert_array_equal(dali, patches.astype(np.float32) * np.float32(1 / 255))
    # the edges are really exercised: patches ending exactly at, or (pad) running past, each stack's end
    ends = index.position + np.array(SIZE)
    extents = np.array([store.meta(s).shape[1:] for s in index.stack_ids])[index.stack]
    assert (ends == extents).any() if edge == "fit" else True
    assert (ends > extents).any() == (edge == "pad")


@pytest.mark.parametrize("normalize", ["percentile", "meanstd"])
def test_normalization_modes_equal(small_store, normalize):
    path, arrays = small_store
    store = Store(path)
    stats = channel_mean_std(store, store.stack_ids)
    dali_loader = make(store, "dali-cpu", normalize=normalize, norm_stats=stats)
    batches = read_epoch(dali_loader)
    ref = read_epoch(make(store, "torch", normalize=normalize, norm_stats=stats))
    assert batches[0].norm.clip == (normalize == "percentile")
    dali = normalized(batches).numpy()
    np.testing.assert_array_equal(dali, normalized(ref).numpy())

    def lo_mul(sid):
        if normalize == "meanstd":
            mean, std = (np.asarray(v, np.float64).reshape(-1, 1, 1, 1) for v in stats)
            return mean.astype(np.float32), (1 / std).astype(np.float32)
        p = store.meta(sid).percentiles
        lo, hi = (np.asarray(p[k], np.float32).reshape(-1, 1, 1, 1) for k in ("p1", "p99"))
        return lo, (1 / (hi - lo).astype(np.float64)).astype(np.float32)

    want = expected_images(arrays, dali_loader, batches, lo_mul)
    if normalize == "percentile":
        want = np.clip(want, 0, 1)
        assert dali.min() == 0 and dali.max() == 1  # the clip did something
    np.testing.assert_allclose(dali, want, rtol=0, atol=0)


def test_train_augmented_batches_equal(small_store):
    """Flips and jitter come from the source, so both loaders crop and flip identically."""
    path, arrays = small_store
    store = Store(path)
    aug = dict(flip=(True, True, True), jitter=3)
    dali_loader = make(store, "dali-cpu", train=True, **aug)
    batches = read_epoch(dali_loader)
    ref = read_epoch(make(store, "torch", train=True, **aug))
    np.testing.assert_array_equal(raw(batches), raw(ref))
    dali = normalized(batches).numpy()
    np.testing.assert_array_equal(dali, normalized(ref).numpy())
    np.testing.assert_array_equal(dali, expected_images(arrays, dali_loader, batches, scale))


def test_flips_are_exact_along_each_axis(small_store):
    path, arrays = small_store
    store = Store(path)
    loader = make(store, "dali-cpu", train=True, flip=(True, True, True), jitter=0)
    batches = read_epoch(loader)
    images = normalized(batches).numpy()
    plan = loader.source.plan(0)
    seen = collections.Counter()
    for k, (row, slot) in enumerate(zip(plan.rows, plan.slots)):
        sid, position = loader.index.key(int(row))
        start, flips = loader.source.augmentation(0, int(slot), int(row))
        assert tuple(start) == position  # no jitter: the grid position
        plain = numpy_patch(arrays, sid, start).astype(np.float32) * np.float32(1 / 255)
        want = plain
        for axis in range(3):
            if flips[axis]:
                want = np.flip(want, axis + 1)
                seen[axis] += 1
        np.testing.assert_array_equal(images[k], want)
        if flips.any():
            assert not np.array_equal(images[k], plain)
    assert all(0 < seen[a] < len(plan.rows) for a in range(3))  # every axis both flipped and not


def test_flip_config_limits_axes(small_store):
    path, _ = small_store
    loader = make(Store(path), "torch", train=True, flip=(False, True, False), jitter=0)
    plan = loader.source.plan(3)
    flags = np.array([loader.source.augmentation(3, int(s), int(r))[1] for r, s in zip(plan.rows, plan.slots)])
    loader.close()
    assert flags[:, [0, 2]].sum() == 0 and 0 < flags[:, 1].sum() < len(flags)


def test_fp16_cast_equal(small_store):
    path, _ = small_store
    store = Store(path)
    dali = normalized(read_epoch(make(store, "dali-cpu", dtype="fp16")))
    ref = normalized(read_epoch(make(store, "torch", dtype="fp16")))
    assert dali.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(dali, ref, rtol=0, atol=0)
    fp32 = normalized(read_epoch(make(store, "torch", dtype="fp32")))
    torch.testing.assert_close(dali, fp32.to(torch.float16), rtol=0, atol=0)  # one rounding of fp32


@pytest.mark.parametrize("kind", ["dali-cpu", "torch"])
def test_uint16_raw_and_normalized(tmp_path, kind):
    """uint16 stores come out as torch.uint16 (DALI hands them over as int16 bytes) and scale by 65535."""
    arr = tissue((3, 16, 32, 40), seed=3, dtype=np.uint16)
    write_array(tmp_path / "u16.zarr", "a", arr)
    write_array(tmp_path / "u16.zarr", "b", arr[:, :, ::-1].copy(), label="MALADE")
    store = Store(tmp_path / "u16.zarr")
    loader = make(store, kind)
    batches = read_epoch(loader)
    assert batches[0].images.dtype == torch.uint16 and arr.max() > 255
    want = np.stack([numpy_patch({"a": arr, "b": arr[:, :, ::-1]}, *loader.index.key(r))
                     for r in range(len(loader.index))])
    np.testing.assert_array_equal(raw(batches), want)
    np.testing.assert_array_equal(normalized(batches).numpy(), want.astype(np.float32) * np.float32(1 / 65535))


def test_channels_last_and_bf16_normalisation():
    """The one normalisation: layout and dtype as asked, values as (x - lo) * mul, clip, per sample."""
    raw8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 6), dtype=np.uint8))
    lo = torch.tensor([[0.0, 10.0, 20.0], [5.0, 5.0, 5.0]]).reshape(2, 3, 1, 1, 1)
    mul = torch.full((2, 3, 1, 1, 1), 1 / 100)
    out = normalize_images(raw8, lo, mul, clip=True, dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last_3d)
    want = np.clip((raw8.numpy().astype(np.float32) - lo.numpy()) * mul.numpy(), 0, 1)
    torch.testing.assert_close(out.float(), torch.from_numpy(want).to(torch.bfloat16).float(), rtol=0, atol=0)
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0
