"""What users see: consoles, progress bars and tables, set up once for every command.

Piped or captured output gets a wide console, so tables are not cut to 80 columns in logs. Progress bars
show true rates: bytes per second for data, items per second otherwise, and always elapsed and ETA.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["ConvertBar", "byte_bar", "console", "byte_progress", "count_bar", "print_error", "progress"]


def console(*, stderr: bool = False) -> Console:
    """A rich console; when not a terminal, 160 columns wide."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def print_error(message: str) -> None:
    """The one error line of a failed command, on stderr."""
    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)



def progress(*columns: ProgressColumn, con: Console | None = None, transient: bool = False,
             disable: bool = False, bare: bool = False) -> Progress:
    """A rich Progress with the given leading columns, then bar, elapsed and remaining time (`bare`:
    the given columns only)."""
    tail = () if bare else (BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, *tail, console=con or console(stderr=True), transient=transient, disable=disable)


def byte_bar(label: str, *fields: str, con: Console | None = None, disable: bool = False) -> Progress:
    """Data moving: MB done / total and MB/s. `fields` are task fields shown after the label."""
    return progress(TextColumn(label + " [bold]{task.description}"), *(TextColumn(f"{{task.fields[{f}]}}")
                    for f in fields), DownloadColumn(), TransferSpeedColumn(), con=con, disable=disable)


def count_bar(*fields: str, con: Console | None = None, transient: bool = False) -> Progress:
    """Things done: N/M and whatever rate fields the caller keeps up to date."""
    return progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(),
                    *(TextColumn(f"{{task.fields[{f}]}}") for f in fields), con=con, transient=transient)


@contextlib.contextmanager
def byte_progress(enabled: bool, label: str, total_bytes: int) -> Iterator[Callable[[int, str], None]]:
    """Yields advance(nbytes, description); a byte bar when enabled, nothing otherwise."""
    if not enabled:
        yield lambda nbytes, description: None
        return
    with byte_bar(label) as bar:
        task = bar.add_task("", total=total_bytes)
        yield lambda nbytes, description: bar.update(task, advance=nbytes, description=description)


class ConvertBar:
    """`stores.convert.Progress` as a rich bar: stacks done/total, MB of source done / total, and the
    true read rate and ETA: bytes actually converted over the wall time since the start. (rich's own
    speed column averages its last few updates, which arrive in bursts from the workers: it showed
    786 MB/s for a real 45 MB/s.) The total never changes: a skipped or failed stack counts as done,
    but not in the rate. Failed stacks are printed (above the bar) as they happen, also with `bar=False`."""

    def __init__(self, con: Console | None = None, *, bar: bool = True, clock: Callable[[], float] = time.monotonic):
        self.bar = progress(TextColumn("converting"), TextColumn("{task.fields[stacks]}"), DownloadColumn(),
                            TextColumn("{task.fields[rate]}"), BarColumn(), TimeElapsedColumn(),
                            TextColumn("eta {task.fields[eta]}"), con=con, disable=not bar, bare=True)
        self.clock = clock
        self.sizes: list[int] = []
        self.done: list[float] = []
        self.read = 0.0  # source bytes converted (not skipped or failed)
        self.finished, self.task, self.t0 = 0, None, 0.0
        self._scan = None  # the percentile pass of --window pLOW pHIGH, before the first stack

    def start(self, sizes: list[int]) -> None:
        self.sizes, self.done, self.t0 = sizes, [0.0] * len(sizes), self.clock()
        self.task = self.bar.add_task("", total=sum(sizes), stacks=f"0/{len(sizes)} stacks", rate="", eta="-")
        self.bar.start()

    def rate(self) -> float:
        """Source bytes converted per second since the start."""
        return self.read / max(self.clock() - self.t0, 1e-9)

    def _advance(self, index: int, fraction: float, *, converted: bool) -> None:
        fraction = min(max(fraction, self.done[index]), 1.0)
        step = (fraction - self.done[index]) * self.sizes[index]
        self.done[index] = fraction
        self.read += step if converted else 0.0
        remaining = self.bar.tasks[0].total - self.bar.tasks[0].completed - step
        rate = self.rate()
        eta = "-" if rate <= 0 else f"{int(remaining / rate) // 60}:{int(remaining / rate) % 60:02d}"
        self.bar.update(self.task, advance=step, rate=f"{rate / 1e6:,.1f} MB/s", eta=eta)

    def fraction(self, index: int, fraction: float) -> None:
        self._advance(index, fraction, converted=True)

    def finish(self, index: int, outcome) -> None:
        self._advance(index, 1.0, converted=outcome.status == "converted")
        if outcome.error:
            self.bar.console.print(f"[bold red]failed:[/] {escape(outcome.error)}", highlight=False, soft_wrap=True)
        self.finished += 1
        self.bar.update(self.task, stacks=f"{self.finished}/{len(self.sizes)} stacks")

    def scan(self, done: int, total: int) -> None:
        if self._scan is None:
            self._scan = byte_bar("percentiles over the manifest", con=self.bar.console, disable=self.bar.disable)
            self._scan.add_task("", total=total)
            self._scan.start()
        self._scan.update(self._scan.task_ids[0], completed=done)
        if done >= total:
            self._scan.stop()

    def stop(self) -> None:
        self.bar.stop()
