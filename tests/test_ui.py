"""The convert bar's rate and total: true bytes over wall time, a total that never moves."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from stacktrain.ui import ConvertBar


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _bar():
    clock = Clock()
    bar = ConvertBar(Console(file=io.StringIO()), bar=False, clock=clock)
    bar.start([100e6, 200e6, 300e6])
    return bar, clock


def test_rate_is_converted_bytes_over_wall_time_whatever_the_bursts():
    bar, clock = _bar()
    clock.now += 10.0
    bar.fraction(1, 0.5)  # 100 MB reported at once after 10 s, as a worker's burst arrives
    assert bar.rate() == 10e6
    assert bar.bar.tasks[0].fields["rate"] == "10.0 MB/s"
    clock.now += 10.0
    bar.finish(1, SimpleNamespace(status="converted", error=None))
    assert bar.rate() == 200e6 / 20.0


def test_skipped_and_failed_stacks_keep_the_total_and_do_not_count_in_the_rate():
    bar, clock = _bar()
    clock.now += 5.0
    bar.finish(0, SimpleNamespace(status="skipped", error=None))
    bar.fraction(2, 0.1)
    bar.finish(2, SimpleNamespace(status="failed", error="x.npy: broken"))
    task = bar.bar.tasks[0]
    assert task.total == 600e6 and task.completed == 400e6
    assert bar.rate() == 30e6 / 5.0  # only the 10 % of stack 2 that was read
    assert task.fields["stacks"] == "2/3 stacks"
    assert task.fields["eta"] == f"0:{int(200e6 / 6e6):02d}"
