"""The exact GPU-mode graph (`graph.gpu_graph`), run on DALI's CPU backend with only the inflate node
swapped for a CPU LZ4 decode of the same blocks: byte equality with numpy slicing of the source stacks
for reassembly, crops, flips, jitter, absent chunks, the pad edge, uint16 and sub-batched inflate."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

from stacktrain.pipelines import graph
from stacktrain.pipelines.config import PatchConfig, PreprocessConfig
from stacktrain.pipelines.normalize import stack_norm_params
from stacktrain.pipelines.patches import build_index
from stacktrain.pipelines.source import PatchSource
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array

SIZE = (6, 12, 20)  # not chunk-aligned (chunks are 8x16x16)
SHAPES = [(20, 40, 48), (16, 32, 32), (24, 50, 36)]


def _arrays(dtype):
    out = {}
    for i, shape in enumerate(SHAPES):
        arr = tissue((3, *shape), seed=10 + i, dtype=dtype)
        if i == 0:
            arr[:, :16, :32, :32] = 0  # whole chunks of fill: zarr stores none of them (absent chunks)
        out[f"s{i}"] = arr
    return out


@pytest.fixture(scope="module", params=["uint8", "uint16"])
def stores(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"gpu-graph-{request.param}") / "s.zarr"
    arrays = _arrays(np.dtype(request.param))
    for i, (sid, arr) in enumerate(arrays.items()):
        write_array(path, sid, arr, label="MALADE" if i % 2 else "SAIN")
    return Store(path), arrays, request.param


def cpu_inflate(data, offsets, sizes, chunk_shape, store_dtype):
    """The node that replaces fn.decoders.inflate: the same blocks, decoded by lz4's block decoder."""
    dtype = np.dtype(store_dtype)

    def decode(blob, offs, lens, shape):
        n = int(np.prod(shape)) * dtype.itemsize
        blocks = [np.frombuffer(lz4.block.decompress(blob[o:o + s].tobytes(), uncompressed_size=n), dtype)
                  for o, s in zip(offs.tolist(), lens.tolist())]
        return np.stack(blocks).reshape(len(blocks), *(int(v) for v in shape))
    return fn.python_function(data, offsets, sizes, chunk_shape, function=decode, num_outputs=1)


def run_gpu_graph(source: PatchSource, epoch: int, store_dtype: str) -> list[dict[str, np.ndarray]]:
    """Every batch of `epoch` through graph.gpu_graph on the CPU (inflate swapped, no device transfers)."""
    source.epoch_offset = epoch if source.train else 0

    @pipeline_def(batch_size=source.batch_size, num_threads=1, device_id=None, exec_async=False,
                  exec_pipelined=False, prefetch_queue_depth=1)
    def pipe():
        outs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True)
        return graph.gpu_graph(dict(zip(source.fields, outs)), store_dtype=store_dtype,
                               patch_cdhw=(3, *source.index.size), groups=source.inflate_groups,
                               inflate=cpu_inflate, to_device=lambda node: node)
    p = pipe()
    p.build()
    batches = []
    for _ in range(len(source.plan(epoch))):
        outs = p.run()
        arrays = [np.stack([np.asarray(t) for t in out]) for out in outs]
        images = arrays[0].view(store_dtype)  # uint16 leaves the graph as int16 bytes
        batches.append(dict(zip(graph.OUTPUT_MAP, [images, *arrays[1:]])))
    return batches


def make_source(store, *, train, edge="fit", groups=1, jitter=0, flip=(False, False, False), batch=8):
    index = build_index(store, store.stack_ids, PatchConfig(size=SIZE, edge=edge))
    norm, _ = stack_norm_params(store, store.stack_ids, PreprocessConfig(), train=True)
    return PatchSource(store, index, norm, train=train, raw_lz4=True, batch_size=batch, seed=3, flip=flip,
                       jitter=jitter, inflate_groups=groups)


def expected(arrays, source, epoch, batches):
    """numpy slicing of the stacks (zeros past the edge), flipped as the source chose."""
    plan = source.plan(epoch)
    out = []
    for i, batch in enumerate(batches):
        rows, slots = plan.batch(i)
        for j, (row, slot) in enumerate(zip(rows, slots)):
            start, flips = source.augmentation(epoch, int(slot), int(row))
            assert batch["position"][j].tolist() == start.tolist()
            arr = arrays[source.index.stack_ids[int(batch["stack_index"][j])]]
            padded = np.zeros((3, *(n + s for n, s in zip(arr.shape[1:], SIZE))), arr.dtype)
            padded[:, :arr.shape[1], :arr.shape[2], :arr.shape[3]] = arr
            (z, y, x), (d, h, w) = start, SIZE
            patch = padded[:, z:z + d, y:y + h, x:x + w]
            for axis, f in enumerate(flips, start=1):
                patch = np.flip(patch, axis) if f else patch
            out.append(patch)
    return np.stack(out)


@pytest.mark.parametrize("edge", ["fit", "pad"])
def test_eval_bytes_equal_numpy(stores, edge):
    store, arrays, dtype = stores
    source = make_source(store, train=False, edge=edge)
    batches = run_gpu_graph(source, 0, dtype)
    images = np.concatenate([b["images"] for b in batches])
    assert images.dtype == np.dtype(dtype) and len(images) == len(source.index)
    np.testing.assert_array_equal(images, expected(arrays, source, 0, batches))
    ends = source.index.position + np.array(SIZE)
    extents = np.array([store.meta(s).shape[1:] for s in source.index.stack_ids])[source.index.stack]
    assert (ends > extents).any() == (edge == "pad")  # pad really runs past an edge
    first = source.index.stack == 0
    assert (images[first] == 0).all(axis=(1, 2, 3, 4)).any()  # a patch made of absent chunks only
    lo = np.concatenate([b["lo"] for b in batches])
    assert lo.shape == (len(images), 3, 1, 1, 1) and lo.dtype == np.float32


def test_train_flips_and_jitter_bytes_equal_numpy(stores):
    store, arrays, dtype = stores
    source = make_source(store, train=True, jitter=3, flip=(True, True, True))
    for epoch in (0, 1):
        batches = run_gpu_graph(source, epoch, dtype)
        want = expected(arrays, source, epoch, batches)
        np.testing.assert_array_equal(np.concatenate([b["images"] for b in batches]), want)
    plan = source.plan(1)
    flips = np.array([source.augmentation(1, int(s), int(r))[1] for r, s in zip(plan.rows, plan.slots)])
    assert (0 < flips.sum(axis=0)).all() and (flips.sum(axis=0) < len(flips)).all()  # each axis both ways


@pytest.mark.parametrize("groups", [2, 3])
def test_sub_batched_inflate_gives_the_same_bytes(stores, groups):
    store, arrays, dtype = stores
    source = make_source(store, train=True, jitter=2, flip=(True, False, True), groups=groups)
    assert source.fields[:1 + 2 * groups] == ("data", *(f"{k}_{g}" for g in range(groups)
                                                        for k in ("offsets", "sizes")))
    batches = run_gpu_graph(source, 2, dtype)
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in batches]),
                                  expected(arrays, source, 2, batches))
