"""What every benchmark shares: warm-up, device sync, the median of N timed segments, CPU cores busy,
and a description of the machine the numbers came from.

Absolute times drift on shared machines, so every figure is a rate measured in segments and reported
as the median, next to the ceilings measured in the same run. Needs only numpy and torch (the GPU
script runs where rich is absent).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

Tick = Callable[[str, float | None], None]  # (what is being measured, latest rate or None)
MIN_WALL_FOR_CPU_S = 1.0


def no_tick(_label: str, _rate: float | None) -> None:
    return None


def cuda_sync() -> Callable[[], None]:
    """torch.cuda.synchronize when CUDA is in use, else a no-op: timings must wait for the device."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds_tree(root: int | None = None) -> float | None:
    """CPU seconds (user + system) used so far by `root` and every live descendant, from /proc.

    Worker processes of the loaders live for the whole measurement, so the difference between two
    calls is the CPU time the measured work took. None where /proc is missing (macOS).
    """
    root = os.getpid() if root is None else root
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    parent, ticks = {}, {}
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(name)
        parent[pid] = int(fields[1])
        own = int(fields[11]) + int(fields[12])  # utime, stime
        ticks[pid] = own + (int(fields[13]) + int(fields[14]) if pid == root else 0)  # + reaped children
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p not in (root, 0, 1) and p in parent:
            p = parent[p]
        if p == root:
            total += t
    return total / _clock_ticks()


def _timed(segment: Callable[[], int], sync: Callable[[], None], label: str) -> tuple[int, float, float | None]:
    """(items, wall seconds, CPU seconds of this process tree) of one segment, between device syncs."""
    cpu0 = cpu_seconds_tree()
    sync()
    start = time.perf_counter()
    n = segment()
    sync()
    wall = time.perf_counter() - start
    cpu1 = cpu_seconds_tree()
    if n <= 0:
        raise RuntimeError(f"{label}: a timed segment delivered nothing")
    return n, wall, (cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)


def _summary(runs: list[tuple[int, float, float | None]], warmup: int) -> dict[str, Any]:
    rates = [n / wall for n, wall, _ in runs]
    walls = [wall for _, wall, _ in runs]
    cpus = [cpu for _, _, cpu in runs]
    items = sum(n for n, _, _ in runs)
    # /proc counts CPU time in clock ticks (10 ms): below a second of wall time the ratio is noise.
    cpu = sum(cpus) if None not in cpus and sum(walls) >= MIN_WALL_FOR_CPU_S else None
    return {"per_s": statistics.median(rates), "segment_rates": rates, "items_per_segment": runs[-1][0],
            "segments": len(runs), "warmup": warmup, "wall_s": sum(walls),
            "cores_busy": cpu / sum(walls) if cpu is not None else None,
            "cpu_ms_per_item": 1e3 * cpu / items if cpu is not None else None}


def measure(segment: Callable[[], int], *, label: str, segments: int = 5, warmup: int = 1,
            sync: Callable[[], None] | None = None, tick: Tick = no_tick) -> dict[str, Any]:
    """Run `segment` (returns how many items it delivered) `warmup` times untimed, then `segments`
    times timed between device syncs. Returns the median rate, every segment's rate, the CPU cores
    kept busy (CPU seconds of this process tree / wall seconds) and CPU milliseconds per item."""
    return measure_interleaved({label: segment}, segments=segments, warmup=warmup, sync=sync, tick=tick)[label]


def measure_interleaved(segment_fns: dict[str, Callable[[], int]], *, segments: int = 5, warmup: int = 1,
                        sync: Callable[[], None] | None = None, tick: Tick = no_tick) -> dict[str, dict[str, Any]]:
    """`measure` for several things at once, taking turns segment by segment, so that load from other
    processes on a shared machine falls on all of them alike and their ratios stay meaningful."""
    sync = sync or (lambda: None)
    if segments < 1:
        raise ValueError(f"segments = {segments}; measure at least one")
    for _ in range(warmup):
        for label, segment in segment_fns.items():
            segment()
            tick(label, None)
    runs: dict[str, list] = {label: [] for label in segment_fns}
    for _ in range(segments):
        for label, segment in segment_fns.items():
            runs[label].append(_timed(segment, sync, label))
            n, wall, _ = runs[label][-1]
            tick(label, n / wall)
    return {label: _summary(r, warmup) for label, r in runs.items()}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """The machine and software the numbers belong to."""
    import numpy as np
    import torch
    info: dict[str, Any] = {"name": machine_name(), "cores": available_cores(), "arch": platform.machine(),
                            "cpu": _cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
                            "torch": torch.__version__, "gpu": None, "dali": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except ImportError:
        pass
    return info


def machine_name() -> str:
    """A short file-name-safe name: `cpu2-x86_64` here, `h200-x86_64` on one H200."""
    import torch
    arch = platform.machine() or "unknown"
    if torch.cuda.is_available():
        words = torch.cuda.get_device_name(0).lower().replace("nvidia", "").split()
        model = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
        count = torch.cuda.device_count()
        return f"{'' if count == 1 else f'{count}x'}{model}-{arch}"
    return f"cpu{available_cores()}-{arch}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
