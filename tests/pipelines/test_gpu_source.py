"""GPU mode without a GPU: the source's byte contract, the traced graph, the codec check; the real
GPU run is `gpu`-marked and skips cleanly without CUDA (benchmarks/gpu_check.py runs it on a GPU)."""

from __future__ import annotations

import pickle
import types

import lz4.block
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from stacktrain.errors import StoreError
from stacktrain.pipelines import graph
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.loaders import build_loader
from stacktrain.pipelines.normalize import normalize_images, stack_norm_params
from stacktrain.pipelines.patches import build_index
from stacktrain.pipelines.source import PatchSource
from stacktrain.stores.chunks import reassemble
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array

SIZE = (6, 12, 20)
HAS_CUDA = torch.cuda.is_available()


def gpu_source(store, **kw):
    index = build_index(store, store.stack_ids, PatchConfig(size=SIZE, edge="pad"))
    norm, _ = stack_norm_params(store, store.stack_ids, PreprocessConfig(), train=True)
    return PatchSource(store, index, norm, raw_lz4=True, batch_size=8, seed=5, **kw)


def inflate_on_cpu(sample: dict) -> np.ndarray:
    """What fn.decoders.inflate does, with a plain LZ4 block decoder: block by block."""
    shape = tuple(int(n) for n in sample["chunk_shape"])
    blocks = [np.frombuffer(lz4.block.decompress(sample["data"][o:o + s].tobytes(),
                                                 uncompressed_size=int(np.prod(shape))), np.uint8).reshape(shape)
              for o, s in zip(sample["offsets_0"], sample["sizes_0"])]
    return np.stack(blocks)


def test_raw_bytes_inflate_and_reassemble_to_the_patch(small_store):
    path, arrays = small_store
    store = Store(path)
    source = gpu_source(store, train=True, flip=(True, True, True), jitter=3)
    plan = source.plan(2)
    for row, slot in zip(plan.rows, plan.slots):  # every patch incl. pad edges, jittered
        sample = dict(zip(source.fields, source.sample(2, int(slot), int(row))))
        assert sample["data"].dtype == np.uint8 and sample["data"].ndim == 1
        assert sample["offsets_0"].dtype == sample["sizes_0"].dtype == np.int32
        assert sample["position"].dtype == sample["stack_index"].dtype == np.int64
        assert sample["label"].dtype == np.float32 and sample["label"].shape == ()
        assert sample["lo"].shape == sample["mul"].shape == (3, 1, 1, 1)
        dims7 = sample["dims7"]
        region = reassemble(inflate_on_cpu(sample), tuple(int(g) for g in dims7[:4]))
        assert region.shape == tuple(sample["dims4"]) and list(dims7[4:]) == list(sample["chunk_shape"])
        _, z, y, x = (int(a) for a in sample["anchor"])
        got = region[:, z:z + SIZE[0], y:y + SIZE[1], x:x + SIZE[2]]
        sid = source.index.stack_ids[int(sample["stack_index"])]
        arr = arrays[sid]
        (z0, y0, x0) = sample["position"]
        want = np.zeros((3, *SIZE), np.uint8)  # zeros past the stack's edge (pad)
        part = arr[:, z0:z0 + SIZE[0], y0:y0 + SIZE[1], x0:x0 + SIZE[2]]
        want[:, :part.shape[1], :part.shape[2], :part.shape[3]] = part
        np.testing.assert_array_equal(got, want)


def test_batch_callback_and_pickling(small_store):
    path, _ = small_store
    source = gpu_source(Store(path), train=False)
    n_batches = len(source.plan(0))
    info = types.SimpleNamespace(epoch_idx=0, iteration=n_batches - 1)
    columns = source(info)
    assert len(columns) == len(source.fields)
    assert len(columns[0]) == len(source.index) - 8 * (n_batches - 1)  # the partial last batch
    with pytest.raises(StopIteration):
        source(types.SimpleNamespace(epoch_idx=0, iteration=n_batches))
    clone = pickle.loads(pickle.dumps(source))  # what spawned DALI workers receive
    for a, b in zip(clone(info), columns):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def _op_name(node) -> str:
    return str(node.source.spec).split()[2].rstrip(":")  # "OpSpec for <schema>:"


def test_gpu_graph_is_traced_with_device_ops(small_store):
    """Trace the GPU graph (tracing needs no GPU) and check what runs on the device, in which order."""
    path, _ = small_store
    source = gpu_source(Store(path), train=True)
    traced = {}

    @pipeline_def(batch_size=8, num_threads=1, device_id=0)
    def gpu_graph():
        inputs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True)
        traced["outputs"] = graph.gpu_graph(dict(zip(source.fields, inputs)), store_dtype="uint8",
                                            patch_cdhw=(3, *SIZE))
        return traced["outputs"]

    gpu_graph()
    assert [o.device for o in traced["outputs"]] == ["gpu"] * 6
    chain, node = [], traced["outputs"][0]
    while node.source.inputs:  # follow the image path back to the source
        chain.append(_op_name(node))
        node = node.source.inputs[0]
    # the store dtype all the way: the crop comes before anything could widen it; no cast, no arithmetic
    assert chain[::-1] == ["decoders__Inflate", "Reshape", "Transpose", "Reshape", "Slice", "Flip"]
    pipe = graph.patch_pipeline(source, gpu=True, parallel=False, prefetch=1, store_dtype="uint8",
                                patch_cdhw=(3, *SIZE), batch_size=8, num_threads=1, device_id=0, seed=0)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            pipe.build()


def test_gpu_mode_refuses_a_zstd_store_before_building(tmp_path, monkeypatch):
    write_array(tmp_path / "z.zarr", "a", tissue((1, 16, 32, 32)), codec="zstd")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(graph, "build_pipeline", lambda *a, **k: pytest.fail("pipeline built"))
    with pytest.raises(StoreError, match=r"zstd codec.*--codec lz4.*dali-cpu"):
        build_loader(Store(tmp_path / "z.zarr"), ["a"], train=False, patch=PatchConfig(size=(8, 16, 16)),
                     prep=PreprocessConfig(), cfg=LoaderConfig(loader="dali", batch_size=2))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_batches_equal_cpu_mode(small_store, dtype):
    path, _ = small_store
    store = Store(path)
    results = {}
    for kind in ("dali", "dali-cpu"):
        loader = build_loader(store, store.stack_ids, train=True, patch=PatchConfig(size=SIZE, edge="pad"),
                              prep=PreprocessConfig(jitter=2), device_id=0,
                              cfg=LoaderConfig(loader=kind, batch_size=8, workers=2, dtype=dtype))
        results[kind] = [b for b in loader.epoch(0)]
        loader.close()
    assert results["dali"][0].images.is_cuda and not results["dali-cpu"][0].images.is_cuda
    gpu = torch.cat([b.images.cpu() for b in results["dali"]])
    cpu = torch.cat([b.images for b in results["dali-cpu"]])
    assert torch.equal(gpu, cpu)  # raw patches: byte for byte
    norm = [torch.cat([normalize_images(b.images, b.lo, b.mul, clip=b.norm.clip, dtype=b.norm.dtype).float().cpu()
                       for b in results[k]]) for k in ("dali", "dali-cpu")]
    tol = 1e-3 if dtype == "fp16" else 8e-3
    torch.testing.assert_close(norm[0], norm[1], rtol=tol, atol=tol)


def test_cpu_mode_graph_runs_no_operator_for_uint8(small_store):
    """CPU mode: the workers finish the patches, the graph only batches them (uint16: one reinterpret)."""
    path, _ = small_store
    index = build_index(Store(path), Store(path).stack_ids, PatchConfig(size=SIZE))
    norm, _ = stack_norm_params(Store(path), Store(path).stack_ids, PreprocessConfig(), train=True)
    source = PatchSource(Store(path), index, norm, raw_lz4=False, batch_size=8, train=False)
    for dtype, ops in (("uint8", []), ("uint16", ["Reinterpret"])):
        traced = {}

        @pipeline_def(batch_size=8, num_threads=1, device_id=None)
        def cpu_pipe():
            inputs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True)
            traced["outputs"] = graph.cpu_graph(dict(zip(source.fields, inputs)), dtype)
            return traced["outputs"]

        cpu_pipe()
        node, chain = traced["outputs"][0], []
        while node.source.inputs:
            chain.append(_op_name(node))
            node = node.source.inputs[0]
        assert chain == ops


def test_gpu_graph_with_two_inflate_calls_is_traced_on_the_device(small_store):
    """Sub-batched inflate (pipelines/inflate.py): two inflate nodes on the device, concatenated in order."""
    path, _ = small_store
    source = gpu_source(Store(path), train=True, inflate_groups=2)
    traced = {}

    @pipeline_def(batch_size=8, num_threads=1, device_id=0)
    def two_calls():
        inputs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True)
        traced["outputs"] = graph.gpu_graph(dict(zip(source.fields, inputs)), store_dtype="uint16",
                                            patch_cdhw=(3, *SIZE), groups=2)
        return traced["outputs"]

    two_calls()
    node = traced["outputs"][0]
    assert node.device == "gpu" and _op_name(node) == "Reinterpret"  # uint16 leaves as int16 bytes
    while _op_name(node) != "Cat":
        node = node.source.inputs[0]
    inflates = node.source.inputs
    assert [_op_name(n) for n in inflates] == ["decoders__Inflate"] * 2 and all(n.device == "gpu" for n in inflates)
