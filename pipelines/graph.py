"""The DALI graph: plain functions over graph nodes, `@pipeline_def` only at the top.

GPU mode:  compressed bytes --.gpu()--> inflate (nvCOMP LZ4) -> reassemble -> crop -> flip
           -> normalize -> cast, all on the device.
CPU mode:  decoded chunks (the workers ran numcodecs) -> the same reassemble -> crop -> flip
           -> normalize -> cast, on DALI's CPU threads (`device_id=None`).
Reassembly is the numpy `stores.chunks.reassemble` as graph ops: reshape to 7-D (c, gz, gy, gx,
cz, cy, cx) -> transpose REASSEMBLE_PERM -> reshape to the (C, Z, Y, X) region.
"""

from __future__ import annotations

import os

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from stacktrain.stores.chunks import REASSEMBLE_PERM

from .source import PatchSource

# Let inflate check its output sizes (it synchronizes the stream): for checks such as gpu_check.py.
CHECK_INFLATE = False
DALI_STORE_DTYPES = {"uint8": types.UINT8, "uint16": types.UINT16}
# DALI 2.4 has no bfloat16: bf16 leaves the graph as fp32 and torch casts it on the device.
DALI_OUT_DTYPES = {"fp16": types.FLOAT16, "fp32": types.FLOAT, "bf16": types.FLOAT}


def inflate_chunks(data, offsets, sizes, chunk_shape, store_dtype: str):
    """Raw LZ4 blocks of one region -> (n_chunks, cz, cy, cx) on the GPU."""
    return fn.decoders.inflate(data.gpu(), chunk_offsets=offsets, chunk_sizes=sizes, shape=chunk_shape,
                               dtype=DALI_STORE_DTYPES[store_dtype], check_output_size=CHECK_INFLATE)


def reassemble(chunks, dims7, dims4):
    """(n, cz, cy, cx) chunks in C order over (c, gz, gy, gx) -> the (C, Z, Y, X) region, layout CDHW."""
    tiles = fn.reshape(chunks, shape=dims7, layout="")
    tiles = fn.transpose(tiles, perm=list(REASSEMBLE_PERM))
    return fn.reshape(tiles, shape=dims4, layout="CDHW")


def crop(region, anchor, patch_cdhw):
    """The patch at `anchor` (0, z, y, x) inside the region; the region always contains it."""
    return fn.slice(region, start=anchor, shape=list(patch_cdhw), axes=[0, 1, 2, 3])


def flip(patch, flips):
    """Per-sample flips along z, y, x (0/1 each, chosen by the source)."""
    return fn.flip(patch, depthwise=flips[0], vertical=flips[1], horizontal=flips[2])


def normalize(patch, lo, mul, clip: bool, gpu: bool):
    """(x - lo) * mul per channel in float32, then optionally clip to [0, 1] (pipelines/normalize.py)."""
    if gpu:
        lo, mul = lo.gpu(), mul.gpu()
    out = (fn.cast(patch, dtype=types.FLOAT) - lo) * mul
    return dmath.clamp(out, 0.0, 1.0) if clip else out


def patch_graph(inputs: dict, *, gpu: bool, store_dtype: str, out_dtype: str, patch_cdhw, clip: bool):
    """Source outputs (by field name) -> (images, labels, stack_index, position)."""
    if gpu:
        chunks = inflate_chunks(inputs["data"], inputs["offsets"], inputs["sizes"],
                                inputs["chunk_shape"], store_dtype)
    else:
        chunks = inputs["chunks"]
    region = reassemble(chunks, inputs["dims7"], inputs["dims4"])
    patch = flip(crop(region, inputs["anchor"], patch_cdhw), inputs["flips"])
    images = normalize(patch, inputs["lo"], inputs["mul"], clip, gpu)
    if out_dtype == "fp16":
        images = fn.cast(images, dtype=types.FLOAT16)
    side = (inputs["label"], inputs["stack_index"], inputs["position"])
    if gpu:
        side = tuple(node.gpu() for node in side)
    return (images, *side)


@pipeline_def
def patch_pipeline(source: PatchSource, *, gpu: bool, parallel: bool, prefetch: int, store_dtype: str,
                   out_dtype: str, patch_cdhw, clip: bool):
    parallel_args = {"parallel": True, "prefetch_queue_depth": prefetch} if parallel else {}
    outputs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True,
                                 **parallel_args)
    inputs = dict(zip(source.fields, outputs))
    return patch_graph(inputs, gpu=gpu, store_dtype=store_dtype, out_dtype=out_dtype,
                       patch_cdhw=patch_cdhw, clip=clip)


OUTPUT_MAP = ["images", "labels", "stack_index", "position"]


def build_pipeline(source: PatchSource, *, gpu: bool, device_id: int | None, batch_size: int,
                   workers: int, prefetch: int, store_dtype: str, out_dtype: str, patch_cdhw,
                   clip: bool, seed: int, start_method: str):
    """Construct the pipeline, start its workers, then build it (workers first: before DALI touches CUDA)."""
    parallel = workers > 0
    pipe = patch_pipeline(source, gpu=gpu, parallel=parallel, prefetch=prefetch, store_dtype=store_dtype,
                          out_dtype=out_dtype, patch_cdhw=tuple(patch_cdhw), clip=clip,
                          batch_size=batch_size, num_threads=min(4, os.cpu_count() or 1),
                          device_id=device_id if gpu else None, seed=seed, prefetch_queue_depth=prefetch,
                          py_num_workers=max(workers, 1), py_start_method=start_method)
    if parallel:
        pipe.start_py_workers()
    pipe.build()
    return pipe
