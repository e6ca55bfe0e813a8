"""What a run shows while it trains: a rich progress bar, one log line per epoch, TensorBoard curves.

    monitor = Monitor(run_dir, enabled=rt.is_main, epochs=cfg.train.epochs, log_interval=50)
    meter = monitor.meter("train", epoch, n_batches, patches_per_batch)
    for batch in meter.iterate(loader.epoch(epoch)):     # times the waits for the loader
        ...
        meter.step(loss_sum)          # .item() (a host-device sync) only every log_interval steps
    stats = meter.finish()            # patches/s, data-wait %, torch's peak and device-used memory
    monitor.epoch_line(entry, ...)    # the log line and the epoch's scalars

Only rank 0 shows or writes anything (`enabled`); the other ranks still time their epochs.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from stacktrain import ui
from stacktrain.train.results import f1_malade, level_metrics

GIB = 2 ** 30


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset, or the process' peak RSS on the CPU.
    On a GPU this counts torch's tensors only: not DALI's pools, NCCL's buffers or the CUDA context."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def device_used_gib(device: torch.device) -> float | None:
    """Memory in use on the whole GPU now (cudaMemGetInfo: total - free), whoever holds it: torch, DALI,
    NCCL, the contexts, other processes. None on the CPU. Cheap, and it does not synchronise."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GIB


def memory_text(th: dict[str, Any]) -> str:
    """"peak 1.23 GiB" on the CPU (RSS); "torch peak 40.1 GiB, device used 52.3 GiB" on a GPU."""
    if th.get("device_used_gib") is None:
        return f"peak {th['peak_memory_gib']:.2f} GiB"
    return f"torch peak {th['peak_memory_gib']:.2f} GiB, device used {th['device_used_gib']:.2f} GiB"


class Meter:
    """Timing of one pass over a loader; drives the progress bar's task."""

    def __init__(self, monitor: Monitor, kind: str, epoch: int, n_batches: int, patches_per_batch: int):
        self.monitor, self.kind, self.epoch = monitor, kind, epoch
        self.n_batches, self.patches_per_batch = n_batches, patches_per_batch
        self.steps = self.patches = 0
        self.wait_s = 0.0
        self.loss: float | None = None
        self.task = None
        self.device_used: float | None = None  # highest device_used_gib seen at the sync points
        if monitor.progress is not None:
            self.task = monitor.progress.add_task(kind, total=n_batches,
                                                  epoch=f"{epoch} ({epoch + 1}/{monitor.epochs})",
                                                  kind=kind, rate="-", loss="-")

    def iterate(self, batches: Iterable) -> Iterator:
        if self.monitor.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.monitor.device)
        self.t0 = time.perf_counter()
        iterator = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.wait_s += time.perf_counter() - t
            self.patches += len(batch)
            yield batch

    def step(self, loss_sum: torch.Tensor | None = None) -> None:
        """One batch done; every `log_interval` steps read the running loss (the only sync)."""
        self.steps += 1
        sync = self.steps % self.monitor.log_interval == 0 or self.steps == self.n_batches
        if sync:
            self._sample_device_memory()
        if sync and loss_sum is not None:
            self.loss = loss_sum.item() / self.steps
            self.monitor.scalar(f"{self.kind}/running_loss", self.loss, self.epoch * self.n_batches + self.steps)
        if self.task is not None:
            rate = self.patches / max(time.perf_counter() - self.t0, 1e-9)
            fields = {"rate": f"{rate:,.0f}"} if sync or self.steps < 3 else {}
            if self.loss is not None:
                fields["loss"] = f"{self.loss:.4f}"
            self.monitor.progress.update(self.task, advance=1, **fields)

    def _sample_device_memory(self) -> None:
        used = device_used_gib(self.monitor.device)
        if used is not None:
            self.device_used = max(self.device_used or 0.0, used)

    def finish(self, world_size: int = 1) -> dict[str, float]:
        """patches/s over all ranks, share of the time spent waiting for data, memory: torch's peak and
        the most device memory seen in use (DALI and NCCL included; sampled at the log intervals)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        if self.task is not None:
            self.monitor.progress.remove_task(self.task)
        self._sample_device_memory()
        out = {"train_patches_per_s": self.patches * world_size / elapsed,
               "data_wait_pct": 100.0 * self.wait_s / elapsed, "train_s": elapsed,
               "peak_memory_gib": peak_memory_gib(self.monitor.device)}
        if self.device_used is not None:
            out["device_used_gib"] = self.device_used
        return out


class Monitor:
    def __init__(self, run_dir: Path | None, *, enabled: bool, epochs: int, log_interval: int,
                 device: torch.device, console: Console | None = None):
        self.enabled, self.epochs, self.log_interval, self.device = enabled, epochs, log_interval, device
        self.console = console or ui.console(stderr=True)
        self.writer = self.progress = None
        if enabled and run_dir is not None:  # no run directory (predict): no curves
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if enabled:
            self.progress = ui.progress(
                TextColumn("epoch {task.fields[epoch]} {task.fields[kind]}"), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} patches/s"), TextColumn("loss {task.fields[loss]}"),
                con=self.console, transient=True)
            self.progress.start()

    def meter(self, kind: str, epoch: int, n_batches: int, patches_per_batch: int) -> Meter:
        return Meter(self, kind, epoch, n_batches, patches_per_batch)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch_line(self, entry: dict[str, Any], *, improved: bool, level: str) -> None:
        """The epoch's log line (loss | lr | patches/s | data-wait % | peak memory | F1) and curves."""
        e, th = entry["epoch"], entry["throughput"]
        patch_f1, stack_f1 = f1_malade(entry, "patch"), f1_malade(entry, "stack")
        threshold = entry.get("threshold", 0.5)
        tuned = f" (threshold {threshold:.3f})" if "fixed_volume_metrics" in entry else ""
        self.print(f"epoch {e} ({e + 1}/{self.epochs}) | loss {entry['train_loss']:.4f} | val_loss "
                   f"{entry['val_loss']:.4f} | lr {entry['lr']:.2e} | {th['train_patches_per_s']:,.1f} patches/s"
                   f" | data-wait {th['data_wait_pct']:.1f}% | {memory_text(th)} | "
                   f"F1(MALADE) patch {patch_f1:.3f} stack {stack_f1:.3f}{tuned} | {entry['wall_s']:.1f} s"
                   + (f" | best ({level})" if improved else ""))
        for tag, value in (("loss/train", entry["train_loss"]), ("loss/val", entry["val_loss"]),
                           ("lr", entry["lr"]), ("val_stack/threshold", threshold),
                           ("throughput/patches_per_s", th["train_patches_per_s"]),
                           ("throughput/data_wait_pct", th["data_wait_pct"]),
                           ("memory/peak_gib", th["peak_memory_gib"]),
                           ("memory/device_used_gib", th.get("device_used_gib"))):
            self.scalar(tag, value, e)
        for level_name in ("patch", "stack"):
            m = level_metrics(entry, level_name)
            for name, value in (("f1_MALADE", m["f1"]["MALADE"]), ("f1_SAIN", m["f1"]["SAIN"]),
                                ("accuracy", m["accuracy"]), ("roc_auc", m["roc_auc"])):
                self.scalar(f"val_{level_name}/{name}", value, e)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
