"""The GPU inflate's grid limit (65535 chunks per call): the arithmetic for every chunk shape the README
mentions, the split of a sample's chunks, and the refusal at loader construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stacktrain.errors import PipelineError
from stacktrain.pipelines import inflate
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.inflate import GRID_LIMIT, inflate_plan, max_spanned, split_chunks
from stacktrain.pipelines.loaders import build_loader
from stacktrain.stores.chunks import region_grid
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array

PATCH = (32, 256, 256)
# chunk shape (README: default, "Choosing chunks" rows, the store bench's 8x32x32 and one chunk per patch)
# -> (most, fewest) chunks per 3-channel patch, and inflate calls at batch 64
README_LAYOUTS = {
    (16, 64, 64): (225, 96, 1),
    (32, 64, 64): (150, 48, 1),
    (32, 128, 128): (54, 12, 1),
    (8, 64, 64): (375, 192, 1),
    (8, 32, 32): (1215, 768, 2),
    (32, 256, 256): (24, 3, 1),
}


@pytest.mark.parametrize("chunk", list(README_LAYOUTS))
def test_limit_arithmetic_for_every_readme_layout(chunk):
    most, least, groups = README_LAYOUTS[chunk]
    plan = inflate_plan(patch_zyx=PATCH, chunk_zyx=chunk, channels=3, batch=64)
    assert (plan.max_chunks, plan.min_chunks, plan.groups) == (most, least, groups)
    assert plan.max_chunks_per_call <= GRID_LIMIT
    if plan.groups > 1:  # and no fewer calls would do
        assert 64 * -(-most // (plan.groups - 1)) > GRID_LIMIT
    # the worst case is real: some crop origin touches exactly `most` chunks (region_grid is what gather uses)
    spans = [max((hi - lo) for lo, hi in [region_grid(((s, s + n),) * 1, (c,))[0] for s in range(c)])
             for n, c in zip(PATCH, chunk)]
    assert 3 * int(np.prod(spans)) == most


def test_default_layout_is_safe_up_to_batch_291_then_splits():
    assert inflate_plan(patch_zyx=PATCH, chunk_zyx=(16, 64, 64), channels=3, batch=291).groups == 1
    assert inflate_plan(patch_zyx=PATCH, chunk_zyx=(16, 64, 64), channels=3, batch=292).groups == 2


def test_max_spanned_brute_force():
    for n in range(1, 40):
        for c in (1, 3, 8, 16):
            brute = max(len(range(s // c, (s + n - 1) // c + 1)) for s in range(200))
            assert max_spanned(n, c) == brute


@pytest.mark.parametrize("n, groups", [(3, 3), (96, 2), (1215, 2), (1000, 7)])
def test_split_keeps_order_and_bounds(n, groups):
    offsets, sizes = np.arange(n, dtype=np.int32) * 10, np.full(n, 10, np.int32)
    parts = split_chunks(offsets, sizes, groups)
    assert len(parts) == groups and all(len(o) >= 1 for o, _ in parts)
    np.testing.assert_array_equal(np.concatenate([o for o, _ in parts]), offsets)
    assert max(len(o) for o, _ in parts) == -(-n // groups)


def test_refusal_names_layout_batch_and_limit():
    with pytest.raises(PipelineError, match=r"batch 70000 .*32x256x256 .*8x32x32 chunks .*limit of 65535"):
        inflate_plan(patch_zyx=PATCH, chunk_zyx=(8, 32, 32), channels=3, batch=70000)
    with pytest.raises(PipelineError, match=r"batch 30000 .*limit of 65535"):  # 3 calls > 3 chunks per patch
        inflate_plan(patch_zyx=PATCH, chunk_zyx=(32, 256, 256), channels=3, batch=30000)


def test_gpu_loader_gets_the_groups_or_refuses_at_construction(tmp_path, monkeypatch):
    write_array(tmp_path / "s.zarr", "a", tissue((3, 16, 32, 32)), chunk_zyx=(4, 8, 8), shard_zyx=(16, 32, 32))
    store = Store(tmp_path / "s.zarr")
    built = {}
    from stacktrain.pipelines import dali_loader
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dali_loader.DaliLoader, "__init__",
                        lambda self, **kw: built.update(kw["source"].__dict__))
    monkeypatch.setattr(inflate, "GRID_LIMIT", 400)
    patch = PatchConfig(size=(8, 16, 16))  # 3 * 3*3*3 = 81 chunks per patch at most, 3*2*2*2 = 24 at least
    kw = dict(train=False, patch=patch, prep=PreprocessConfig())
    for batch, groups in ((4, 1), (8, 2), (16, 4)):
        build_loader(store, ["a"], cfg=LoaderConfig(loader="dali", batch_size=batch), **kw)
        assert built["inflate_groups"] == groups
        assert batch * -(-81 // groups) <= 400
    with pytest.raises(PipelineError, match=r"batch 200 of 8x16x16 patches over 4x8x8 chunks .*limit of 400"):
        build_loader(store, ["a"], cfg=LoaderConfig(loader="dali", batch_size=200), **kw)
