"""Before a run starts: can this machine run this config? All problems at once, in one line.

- Device, precision and loader are checked together (a GPU preset on a CPU machine gets one message
  listing every key to change, not one refusal per try).
- The training memory is estimated on the meta device (no memory, no compute): what autograd saves
  for backward per patch, times the batch, plus 16 bytes per parameter (fp32 weights, gradients and
  Adam's two moments). It must fit in the GPU's memory, or on the CPU in the host's available RAM;
  otherwise the run is refused with the largest batch that fits. `train.memory_check = false`
  (`stacktrain train --force`) starts it anyway.
"""

from __future__ import annotations

import functools
import json

import torch

from stacktrain.errors import ConfigError
from stacktrain.stores.guards import available_memory
from stacktrain.train.config import TrainConfig, resolve_precision

GIB = 2**30
HEADROOM = 0.9  # of the memory: cuDNN workspaces, the loader's buffers, the allocator's slack


def _dali_available() -> bool:
    from stacktrain.pipelines.loaders import dali_available
    return dali_available()


def machine_problems(cfg: TrainConfig, has_cuda: bool, has_dali: bool) -> list[str]:
    """What in `cfg` this machine cannot run (device, precision, loader), each with the fix."""
    problems = []
    t, loader = cfg.train, cfg.loader.loader
    on_gpu = has_cuda and t.device != "cpu"
    if t.device == "cuda" and not has_cuda:
        problems.append('train.device = "cuda" but torch sees no CUDA device: set "cpu" or "auto"')
    if not on_gpu and t.precision in ("bf16", "fp16"):
        problems.append(f'train.precision = "{t.precision}" on the CPU, which trains in fp32: set "fp32" or "auto"')
    if loader == "dali" and not has_cuda:
        problems.append('loader.loader = "dali" decodes on the GPU: set "dali-cpu", "torch" or "auto"')
    if loader in ("dali", "dali-cpu") and not has_dali:
        problems.append(f'loader.loader = "{loader}" needs NVIDIA DALI, which does not import here: set "torch"')
    return problems


def activation_bytes_per_patch(cfg: TrainConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes autograd saves per patch, parameter count) of the config's model, run on the meta device."""
    return _estimate(cfg.model.name, cfg.model.tiny, json.dumps(cfg.model.options or {}, sort_keys=True),
                     tuple(cfg.patch.size), dtype)


@functools.cache  # a study checks each distinct config, then every run again: estimate each once per process
def _estimate(name: str, tiny: bool, options: str, patch: tuple[int, int, int], dtype: torch.dtype) -> tuple[int, int]:
    from stacktrain.train.models import build_model, saved_activation_bytes

    with torch.device("meta"):  # no memory, no compute: ~0.5 s for ResNet3D-50 (MONAI's import aside)
        model = build_model(name, tiny=tiny, options=json.loads(options)).to(dtype).train()
        # batch 2, halved: BatchNorm refuses one value per channel (a batch of 1 at a 1x1x1 bottleneck)
        x = torch.empty(2, 3, *patch, dtype=dtype)
        return saved_activation_bytes(model, x) // 2, sum(p.numel() for p in model.parameters())


def memory_problem(cfg: TrainConfig, on_gpu: bool, available: int, world_size: int = 1) -> str | None:
    """The refusal when the estimated training memory exceeds `available` bytes, else None."""
    precision = resolve_precision(cfg.train.precision, "cuda" if on_gpu else "cpu", True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    per_patch, params = activation_bytes_per_patch(cfg, dtype)
    batch = cfg.loader.batch_size  # per rank
    need = batch * per_patch + 16 * params
    budget = HEADROOM * available
    if need <= budget:
        return None
    fits = int((budget - 16 * params) // per_patch) if budget > 16 * params else 0
    where = "GPU" if on_gpu else "host (RAM available now)"
    advice = (f"set loader.batch_size = {fits}" if fits >= 1 else "choose a smaller model or patch")
    model, patch = cfg.model.name + (" (tiny)" if cfg.model.tiny else ""), "x".join(map(str, cfg.patch.size))
    return (f"{model} at batch {batch} of {patch} patches ({precision}) needs about {need / GIB:.1f} GiB to train, "
            f"the {where} has {available / GIB:.1f} GiB; {advice}, or start it anyway with --force "
            "(train.memory_check = false)")


def preflight(cfg: TrainConfig) -> None:
    """Refuse, in one ConfigError line, a config this machine cannot run or that would not fit."""
    has_cuda = torch.cuda.is_available()
    problems = machine_problems(cfg, has_cuda, _dali_available())
    if problems:
        raise ConfigError(f"this machine cannot run the config as it stands ({len(problems)} problem(s)): "
                          + "; ".join(problems))
    if not cfg.train.memory_check:
        return
    on_gpu = cfg.train.device != "cpu" and has_cuda
    available = torch.cuda.mem_get_info()[1] if on_gpu else available_memory()
    problem = memory_problem(cfg, on_gpu, available)
    if problem:
        raise ConfigError(problem)
