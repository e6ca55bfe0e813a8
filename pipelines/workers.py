"""How worker processes start, decided in one place for every loader and benchmark.

fork starts a worker in milliseconds and does not re-import the caller's `__main__`; but a process
whose CUDA driver is up must not fork (DALI refuses, torch's children inherit a broken context). Asking
torch whether CUDA is available is itself enough to bring the driver up, so: spawn wherever CUDA is
initialised or available, and for GPU pipelines; fork everywhere else. Scripts that use spawned
workers need the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import multiprocessing
import sys


def cuda_may_be_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    dali = sys.modules.get("nvidia.dali.backend")
    if dali is not None and getattr(dali, "IsDriverInitialized", lambda: False)():
        return True
    if torch is None:
        import torch
    return torch.cuda.is_available()


def start_method(*, gpu: bool = False) -> str:
    """"spawn" or "fork" for worker processes started now (see the module docstring)."""
    if gpu or "fork" not in multiprocessing.get_all_start_methods() or cuda_may_be_initialized():
        return "spawn"
    return "fork"
