"""The DALI graph: plain functions over graph nodes, `@pipeline_def` only at the top.

GPU mode:  compressed bytes --.gpu()--> inflate (nvCOMP LZ4, in `inflate_groups` calls: pipelines/
           inflate.py) -> reassemble -> crop -> flip, on the device, in the store dtype: the crop
           happens before anything is widened, and normalisation runs in torch (pipelines/normalize.py).
CPU mode:  the workers hand over finished patches (decoded, reassembled, cropped, flipped by numpy):
           the graph runs no operator at all, it only batches them.
Reassembly is the numpy `stores.chunks.reassemble` as graph ops: reshape to 7-D (c, gz, gy, gx,
cz, cy, cx) -> transpose REASSEMBLE_PERM -> reshape to the (C, Z, Y, X) region.
`gpu_graph` takes its `inflate` and `to_device` steps as arguments, so that a CPU test can run the
exact GPU-mode graph with only the inflate node swapped for a CPU decode of the same blocks.
"""

from __future__ import annotations

import os

from nvidia.dali import fn, pipeline_def, types

from stacktrain.stores.chunks import REASSEMBLE_PERM

from .source import SIDE_FIELDS, PatchSource

# Let inflate check its output sizes (it synchronizes the stream): for checks such as gpu_check.py.
CHECK_INFLATE = False
DALI_STORE_DTYPES = {"uint8": types.UINT8, "uint16": types.UINT16}
OUTPUT_MAP = ["images", *SIDE_FIELDS]
# DALI's torch plugin has no uint16: such patches leave the graph reinterpreted (no copy) as int16 and
# the loader views them as torch.uint16 again.
DALI_TORCH_VIEW = {"uint16": types.INT16}


def deliverable(patch, store_dtype: str):
    """The patch as DALI's torch plugin can hand it over (same bytes)."""
    view = DALI_TORCH_VIEW.get(store_dtype)
    return patch if view is None else fn.reinterpret(patch, dtype=view)


def inflate_chunks(data, offsets, sizes, chunk_shape, store_dtype: str):
    """Raw LZ4 blocks of one region (already on the device) -> (n_chunks, cz, cy, cx) on the GPU."""
    return fn.decoders.inflate(data, chunk_offsets=offsets, chunk_sizes=sizes, shape=chunk_shape,
                               dtype=DALI_STORE_DTYPES[store_dtype], check_output_size=CHECK_INFLATE)


def inflate_groups(inputs: dict, groups: int, store_dtype: str, inflate, to_device):
    """Every chunk of a sample, inflated in `groups` calls over the same device bytes, in C order."""
    data = to_device(inputs["data"])
    parts = [inflate(data, inputs[f"offsets_{k}"], inputs[f"sizes_{k}"], inputs["chunk_shape"], store_dtype)
             for k in range(groups)]
    return parts[0] if groups == 1 else fn.cat(*parts, axis=0)


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


def _gpu(node):
    return node.gpu()


def gpu_graph(inputs: dict, *, store_dtype: str, patch_cdhw, groups: int = 1, inflate=inflate_chunks,
              to_device=_gpu):
    """GPU-mode source outputs (by field name) -> (patch in the store dtype, *side outputs)."""
    chunks = inflate_groups(inputs, groups, store_dtype, inflate, to_device)
    region = reassemble(chunks, inputs["dims7"], inputs["dims4"])
    patch = flip(crop(region, inputs["anchor"], patch_cdhw), inputs["flips"])
    return (deliverable(patch, store_dtype), *(to_device(inputs[k]) for k in SIDE_FIELDS))


def cpu_graph(inputs: dict, store_dtype: str):
    """CPU-mode source outputs -> the same outputs: the workers finished the patches."""
    return (deliverable(inputs["patch"], store_dtype), *(inputs[k] for k in SIDE_FIELDS))


@pipeline_def
def patch_pipeline(source: PatchSource, *, gpu: bool, parallel: bool, prefetch: int, store_dtype: str,
                   patch_cdhw):
    parallel_args = {"parallel": True, "prefetch_queue_depth": prefetch} if parallel else {}
    outputs = fn.external_source(source, num_outputs=len(source.fields), batch=True, batch_info=True,
                                 **parallel_args)
    inputs = dict(zip(source.fields, outputs))
    if gpu:
        return gpu_graph(inputs, store_dtype=store_dtype, patch_cdhw=patch_cdhw, groups=source.inflate_groups)
    return cpu_graph(inputs, store_dtype)


def build_pipeline(source: PatchSource, *, gpu: bool, device_id: int | None, batch_size: int,
                   workers: int, prefetch: int, store_dtype: str, patch_cdhw, seed: int, start_method: str):
    """Construct the pipeline, start its workers, then build it (workers first: before DALI touches CUDA)."""
    parallel = workers > 0
    pipe = patch_pipeline(source, gpu=gpu, parallel=parallel, prefetch=prefetch, store_dtype=store_dtype,
                          patch_cdhw=tuple(patch_cdhw), batch_size=batch_size,
                          num_threads=min(4, os.cpu_count() or 1), device_id=device_id if gpu else None,
                          seed=seed, prefetch_queue_depth=prefetch, py_num_workers=max(workers, 1),
                          py_start_method=start_method)
    if parallel:
        pipe.start_py_workers()
    pipe.build()
    return pipe
