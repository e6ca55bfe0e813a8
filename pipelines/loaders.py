"""`build_loader`: one entry point for the three loaders, which share one interface (`PatchLoader`).

    loader = build_loader(store, train_ids, train=True, patch=..., prep=..., cfg=...)
    for epoch in range(n):
        for batch in loader.epoch(epoch):   # Batch: images NCDHW, labels, stack_index, position
            ...

"dali" decodes on the GPU, "dali-cpu" runs the same graph on the CPU, "torch" is the reference
DataLoader; "auto" picks dali when CUDA and DALI are present, else dali-cpu, else torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from stacktrain.choices import LoaderKind, options
from stacktrain.errors import PipelineError
from stacktrain.stores.layout import GPU_CODECS
from stacktrain.stores.reader import Store

from .base import PatchLoader
from .config import LoaderConfig, PatchConfig, PreprocessConfig
from .contract import DTYPES, RAW_DTYPES, BatchSpec
from .inflate import inflate_plan
from .normalize import channel_mean_std, stack_norm_params
from .patches import build_index
from .source import PatchSource
from .torch_loader import TorchLoader

__all__ = ["PatchLoader", "build_loader", "channel_mean_std", "resolve_loader"]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:  # not installed (macOS, no extra) or its libraries are missing
        return False
    return True


def resolve_loader(name: str) -> str:
    """The loader that `name` means on this machine; raise PipelineError for an impossible choice."""
    if name not in options(LoaderKind):
        raise PipelineError(f"loader.loader = {name!r} is not a loader; choose one of "
                            f"{', '.join(options(LoaderKind))}")
    has_cuda, has_dali = torch.cuda.is_available(), dali_available()
    if name == "auto":
        return "dali" if has_cuda and has_dali else "dali-cpu" if has_dali else "torch"
    if name in ("dali", "dali-cpu") and not has_dali:
        raise PipelineError(f"loader.loader = {name!r} needs NVIDIA DALI, which does not import here; "
                            "install nvidia-dali-cuda130 (a dependency on Linux) or use loader = \"torch\"")
    if name == "dali" and not has_cuda:
        raise PipelineError("loader.loader = \"dali\" decodes on the GPU, but torch sees no CUDA device; "
                            "use loader = \"dali-cpu\" (same graph on the CPU), \"torch\" or \"auto\"")
    return name


def _check_stacks(store: Store, stack_ids: list[str], kind: str) -> tuple[int, str]:
    """(channels, dtype) shared by every stack; DALI needs one dtype, every loader one channel count."""
    metas = [store.meta(s) for s in stack_ids]
    channels = {m.shape[0] for m in metas}
    dtypes = {m.dtype for m in metas}
    if len(channels) > 1:
        raise PipelineError(f"{store.path}: stacks have different channel counts {sorted(channels)}; "
                            "a batch needs one; convert them with the same channels or load them separately")
    if len(dtypes) > 1 and kind != "torch":
        raise PipelineError(f"{store.path}: stacks mix dtypes {sorted(dtypes)}; the DALI graph decodes one "
                            "dtype; reconvert them to one dtype or use loader = \"torch\"")
    if kind == "dali":
        for sid, m in zip(stack_ids, metas):
            if m.codec not in GPU_CODECS:  # the store's own error says: reconvert with lz4 or use CPU mode
                store.chunk_region(sid, ((0, 1), (0, 1), (0, 1)), raw_lz4=True)
    # torch batches a mix as the widest dtype (values unchanged; each stack keeps its own lo/mul)
    return channels.pop(), max(dtypes, key=lambda d: np.dtype(d).itemsize)


def _device(kind: str, device_id: int | None) -> torch.device:
    if kind == "dali":
        return torch.device("cuda", device_id if device_id is not None else int(os.environ.get("LOCAL_RANK", 0)))
    if kind == "torch" and device_id is not None:
        if not torch.cuda.is_available():
            raise PipelineError(f"device_id = {device_id} but torch sees no CUDA device; pass device_id=None")
        return torch.device("cuda", device_id)
    return torch.device("cpu")


def build_loader(store: Store, stack_ids: list[str], *, train: bool, patch: PatchConfig,
                 prep: PreprocessConfig, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 device_id: int | None = None,
                 norm_stats: tuple[list[float], list[float]] | None = None) -> PatchLoader:
    """A loader over the patches of `stack_ids`: shuffled and augmented when `train`, else every patch once.

    `norm_stats` (from `channel_mean_std(store, train_ids)`) gives an eval loader the training
    statistics for normalize = "meanstd". Images land on the GPU for "dali" (and for "torch" with a
    `device_id`), otherwise on the CPU; `loader.spec` says which.
    """
    stack_ids = list(stack_ids)
    if not store.stack_ids:
        raise PipelineError(f"{store.path}: the store has no stacks; add some with `stacktrain convert`")
    if not stack_ids:
        raise PipelineError(f"{store.path}: no stacks were given to load (empty split?); "
                            f"the store has {len(store.stack_ids)}")
    if cfg.seed < 0:
        raise PipelineError(f"loader.seed = {cfg.seed}; use a seed >= 0")
    kind = resolve_loader(cfg.loader)
    channels, store_dtype = _check_stacks(store, stack_ids, kind)
    index = build_index(store, stack_ids, patch)
    norm, clip = stack_norm_params(store, stack_ids, prep, train=train, norm_stats=norm_stats)
    groups = _inflate_groups(store, stack_ids, patch, channels, cfg.batch_size) if kind == "dali" else 1
    source = PatchSource(store, index, norm, train=train, raw_lz4=kind == "dali", batch_size=cfg.batch_size,
                         seed=cfg.seed, rank=rank, world_size=world_size, balance=cfg.balance and train,
                         sampling=cfg.sampling, steps_per_epoch=cfg.steps_per_epoch,
                         flip=prep.flip, jitter=prep.jitter, inflate_groups=groups, patch_dtype=store_dtype)
    device = _device(kind, device_id)
    spec = BatchSpec(channels, tuple(patch.size), DTYPES[cfg.dtype], device.type, cfg.batch_size,
                     raw_dtype=RAW_DTYPES[store_dtype], clip=clip, channels_last=cfg.channels_last)
    common = dict(stack_ids=stack_ids, index=index, spec=spec, source=source, cfg=cfg)
    if kind == "torch":
        return TorchLoader(device=device, **common)
    from .dali_loader import DaliLoader
    return DaliLoader(gpu=kind == "dali", device=device, store_dtype=store_dtype, **common)


def _inflate_groups(store: Store, stack_ids: list[str], patch: PatchConfig, channels: int, batch: int) -> int:
    """Inflate calls per batch in GPU mode (pipelines/inflate.py): the worst chunk layout of these stacks."""
    plans = [inflate_plan(patch_zyx=patch.size, chunk_zyx=layout, channels=channels, batch=batch)
             for layout in {tuple(store.meta(s).chunk_zyx) for s in stack_ids}]
    groups = max(p.groups for p in plans)
    if groups > min(p.min_chunks for p in plans):  # every sample needs a chunk in every inflate call
        raise PipelineError(f"{store.path}: these stacks mix chunk layouts that need {groups} inflate calls per "
                            "batch, more than the smallest layout has chunks per patch; reconvert them with one "
                            "--chunk, or lower loader.batch_size")
    return groups
