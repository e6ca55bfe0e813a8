"""Where training runs: the device, the DDP process group (from torchrun's environment), seeds.

    rt = setup_runtime("auto")          # reads WORLD_SIZE / RANK / LOCAL_RANK set by torchrun
    rt.gather(obj)                      # every rank's obj, on every rank (validation predictions)
    rt.mean(value)                      # a float averaged over ranks (training loss)
    rt.close()

Without torchrun's variables it is one process (rank 0 of 1) and no process group is made.
Under torchrun: NCCL with one GPU per rank (LOCAL_RANK), or gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stacktrain.train.config import ConfigError

DDP_TIMEOUT = _dt.timedelta(minutes=30)  # validation on rank 0 can be long on big stores


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device_id(self) -> int | None:
        """What build_loader wants: the GPU index, or None on the CPU."""
        return self.device.index if self.device.type == "cuda" else None

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (pickled: for small things like predictions)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        """`value` averaged over the ranks (equal weights: every rank trains as many batches)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") \
            from None


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """auto: the GPU of this rank when CUDA is available, else the CPU."""
    has_cuda = torch.cuda.is_available()
    if preference == "cuda" and not has_cuda:
        raise ConfigError("train.device = \"cuda\" but torch sees no CUDA device; set train.device = "
                          "\"cpu\" or \"auto\" (and loader.loader = \"dali-cpu\")")
    if preference == "cpu" or not has_cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                          "start torchrun with --nproc_per_node at most the GPU count")
    return torch.device("cuda", local_rank)


def setup_runtime(device_preference: str = "auto") -> Runtime:
    """One process, or this rank of a torchrun job (its process group initialised)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rt = Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)
    if rt.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=DDP_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return rt


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation; the loaders seed themselves per epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms for the run only (it is process-wide state)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def cpu_threads(rt: Runtime, loader_workers: int):
    """On the CPU, leave each loader worker process a core: torch's OpenMP threads spin while they
    wait, and one thread more than there are free cores made the demo's training 3-4x slower on 2
    cores. OMP_NUM_THREADS, when set (torchrun sets 1), wins. Restored afterwards."""
    if rt.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // rt.world_size - loader_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
