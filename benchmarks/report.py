"""Benchmark results as tables (rich in the terminal, Markdown in benchmarks/results/) and JSON files.

Each bench's JSON turns into one or two (title, headers, rows) tables; the terminal and the Markdown
show the same tables. `record` merges a result into `<results>/<machine>-<date>.json` (one file per
machine and day, one section per bench) and rewrites the Markdown next to it, both atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Any

from stacktrain import ui
from stacktrain.io import atomic_write_json, atomic_write_text

from .measure import Tick, machine, no_tick

Table = tuple[str, list[str], list[list[str]]]
RESULTS_DIR = Path(__file__).parent / "results"


def _f(value, fmt: str = ",.1f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _x(value) -> str:
    return _f(value, ".2f") + "x" if value is not None else "-"


SHORT = {"ram": "(a) RAM crop", "bytes": "(b) chunk bytes", "decode": "(c) bytes+decode",
         "source-bytes": "gpu source, bytes", "naive-zarr": "naive zarr (uint8)", "dali": "dali (uint8)",
         "dali-cpu": "dali-cpu (uint8)", "torch": "torch (uint8)", "normalize-cpu": "normalise on the CPU",
         "normalize-cuda": "normalise on the GPU"}


def loader_tables(r: dict) -> list[Table]:
    rows = []
    for key, item in r["results"].items():
        ceiling = SHORT[item["ceiling"]][:3] if item.get("ceiling") else ""
        name = SHORT.get(key, key) + (f" -> {item['dtype']}" if key.startswith("normalize") else "")
        rows.append([name, _f(item["per_s"]), _f(item["gb_per_s"], ".3f"),
                     _f(item.get("cpu_ms_per_item")), _f(item.get("cores_busy"), ".2f"),
                     f"{_x(item.get('ratio_to_ceiling'))} {ceiling}".strip(), _x(item.get("ratio_to_naive"))])
    c = r["config"]
    title = (f"bench loader: {c['patches_per_segment']} patches {'x'.join(map(str, c['patch']))} per segment, "
             f"batch {c['batch']}, {c['workers']} workers, {c['cores_available']} cores, {c['dtype']}")
    tables = [(title, ["what", "patches/s", "GB/s", "CPU ms/p", "cores", "vs ceiling", "vs naive"], rows)]
    bars = [b for b in r.get("bars", []) if b["applies"]]
    if bars:
        tables.append(("bars (default store on the 2-core machine)", ["loader", "against", "value", "target", "met"],
                       [[b["loader"], b["against"], _x(b["value"]), _x(b["target"]), "yes" if b["met"] else "NO"]
                        for b in bars]))
    if r.get("profile"):
        prof = r["profile"]
        worker = prof["worker"]
        per_chunk = worker.get("stages_us_per_chunk", {})
        rows = [["worker: " + k, _f(v, ".2f"), _f(per_chunk.get(k), ".1f")]
                for k, v in worker["stages_ms_per_patch"].items()]
        timed = r["results"].get("dali-cpu", {})
        if timed.get("cpu_ms_per_item") is not None and timed.get("main_cpu_ms_per_item") is not None:
            main = timed["main_cpu_ms_per_item"]
            rows += [["timed run: DALI workers (source + handover to shared memory)",
                      _f(timed["cpu_ms_per_item"] - main, ".2f"), "-"],
                     ["timed run: main process (DALI pipeline, transport, torch tensors)", _f(main, ".2f"), "-"]]
        rows += [["torch: " + k, _f(v, ".2f"), "-"] for k, v in (prof.get("normalize_ms_per_patch") or {}).items()]
        chunks = f", {worker['chunks_per_patch']:.0f} chunks per patch" if "chunks_per_patch" in worker else ""
        tables.append((f"profile of one dali-cpu patch: CPU ms per patch{chunks}",
                       ["stage", "ms/patch", "us/chunk"], rows))
    return tables


def store_tables(r: dict) -> list[Table]:
    rows = []
    for row in r["results"]:
        rows.append([row["codec"] + (" *" if row["default"] else ""), "x".join(map(str, row["chunk_zyx"])),
                     "x".join(map(str, row["shard_zyx"])), _f(row["compression_ratio"], ".2f"),
                     str(row["chunks_per_aligned_patch"]), _f(row["aligned"]["per_s"]),
                     _f(row["aligned"]["gb_per_s"], ".2f"), _f(row["unaligned"]["per_s"]),
                     _f(row["unaligned"]["gb_per_s"], ".2f"), _f(row["aligned"].get("cores_busy"), ".2f"),
                     _f(row["write_s"], ".1f"), "yes" if row["gpu_decodable"] else "no"])
    c = r["config"]
    title = (f"bench store: {c['patches_per_segment']} random {'x'.join(map(str, c['patch']))} patches per segment "
             f"from a {'x'.join(map(str, c['shape_czyx']))} stack, one core (* = the store's default)")
    return [(title, ["codec", "chunk", "shard", "ratio", "chunks", "aligned/s", "GB/s", "unaligned/s", "GB/s",
                     "cores used", "write s", "GPU"], rows)]


CONVERT_ROWS = {"ceiling": "ceiling: read + LZ4 compress, no Zarr", "peer": "peer: imread -> zarr-python create_array",
                "convert 1": "stacktrain convert --workers 1 --levels 0",
                "convert N": "stacktrain convert --workers N --levels 0",
                "convert N, pyramid": "stacktrain convert --workers N (default pyramid levels)"}


def convert_tables(r: dict) -> list[Table]:
    c = r["config"]
    tables = []
    for fmt, part in r["results"].items():
        rows = []
        for key, item in part["results"].items():
            rows.append([CONVERT_ROWS.get(key, key), str(item["processes"]), _f(item["cores_busy"], ".2f"),
                         _f(item["source_mb_per_s"]), _x(item["ratio_to_ceiling"]), _x(item["ratio_to_peer"]),
                         _f(item["peak_rss_mb"], ",.0f")])
        title = (f"bench convert ({fmt}): {c['stacks']} stacks of 3x{'x'.join(map(str, c['shape_zyx']))} uint8 "
                 f"({part['source_bytes'] / 1e6:,.0f} MB), N = {c['workers']} of {c['cores_available']} cores, "
                 f"median of {c['segments']} rounds")
        tables.append((title, ["what", "processes", "cores used", "source MB/s", "vs ceiling", "vs peer",
                               "peak RSS MB/process"], rows))
        if part.get("deeper"):
            d = part["deeper"]
            rows.append([f"convert --workers N, {d['stacks']} stacks 2x deeper ({'x'.join(map(str, d['shape_zyx']))})",
                         str(d["processes"]), _f(d["cores_busy"], ".2f"), _f(d["source_mb_per_s"]), "-", "-",
                         _f(d["peak_rss_mb"], ",.0f")])
        size = "set for this size" if part["goals"][0]["applies"] else "set for 4 stacks of 3x64x1024x1024 only"
        tables.append((f"goals ({fmt}; {size})", ["goal", "value", "target", "met"],
                       [[g["goal"], _f(g["value"], ".2f"), _f(g["target"], ".2f"), "yes" if g["met"] else "NO"]
                        for g in part["goals"]]))
    return tables


def model_tables(r: dict) -> list[Table]:
    rows = []
    for row in r["results"]:
        if "error" in row:
            rows.append([row["model"], _f(row["params"] / 1e6), _f(row["train_gflop_per_patch"]), row["error"], "", "",
                         ""])
            continue
        rows.append([row["model"] + (" (tiny)" if row["tiny"] else ""), _f(row["params"] / 1e6),
                     _f(row["train_gflop_per_patch"]), _f(row["patches_per_s"], ",.2f"),
                     _f(row["achieved_tflops"], ",.3f"), _f(100 * row["fraction_of_peak"], ".1f"),
                     _f(row["peak_memory_gib"], ".2f")])
    c = r["config"]
    title = (f"bench model: fwd+bwd, {'x'.join(map(str, c['patch']))} batch {c['batch']} {c['precision']} on "
             f"{c['device']}; matmul peak {r['matmul_peak_tflops']:.3f} TFLOP/s ({r['peak_source']})")
    return [(title, ["model", "params M", "GFLOP/p", "patches/s", "TFLOP/s", "% peak", "peak GiB"], rows)]


def train_tables(r: dict) -> list[Table]:
    res, c = r["results"], r["config"]
    rows = [[name.replace("_", " "), _f(item["per_s"], ",.2f"), _f(item.get("cores_busy"), ".2f")]
            for name, item in res.items()]
    rows += [["data-wait % (real)", _f(r["data_wait_pct"], ".1f"), ""],
             ["loader headroom (loader / model)", _x(r["loader_headroom"]), ""],
             ["real / model alone", _x(r["real_vs_model_alone"]), ""]]
    title = (f"bench train: {c['model']}{' (tiny)' if c['tiny'] else ''} {'x'.join(map(str, c['patch']))} batch "
             f"{c['batch']} {c['precision']}, loader {c['loader']} ({c['workers']} workers) on {c['device']}")
    return [(title, ["measure", "patches/s", "cores busy"], rows)]


TABLES = {"loader": loader_tables, "store": store_tables, "convert": convert_tables, "model": model_tables,
          "train": train_tables}


def print_tables(result: dict, *, stderr: bool = False) -> None:
    from rich.table import Table as RichTable
    console = ui.console(stderr=stderr)
    for title, headers, rows in TABLES[result["bench"]](result):
        table = RichTable(title=title, title_justify="left")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(results: dict) -> str:
    """The Markdown of a results file: machine, then every bench's tables."""
    m = results["machine"]
    lines = [f"# Benchmarks on {m['name']} ({results['date']})", "",
             f"{m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}; "
             f"torch {m['torch']}, DALI {m['dali'] or '-'}. "
             "Produced by `stacktrain bench ... --record`; JSON with every segment next to this file.", ""]
    for name in TABLES:
        if name not in results["benches"]:
            continue
        for title, headers, rows in TABLES[name](results["benches"][name]):
            lines += [f"## {title}", "", "| " + " | ".join(headers) + " |",
                      "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def record(result: dict, results_dir: Path | None = None) -> Path:
    """Merge `result` into today's results file for this machine; rewrite its Markdown. Returns the JSON path."""
    import json
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    date = _dt.date.today().isoformat()
    path = results_dir / f"{info['name']}-{date}.json"
    current = json.loads(path.read_text()) if path.exists() else {"machine": info, "date": date, "benches": {}}
    current["machine"] = info
    current["benches"][result["bench"]] = result
    write_json(path, current)
    atomic_write_text(path.with_suffix(".md"), markdown(current))
    return path


@contextlib.contextmanager
def progress(enabled: bool, steps_per_label: int):
    """Yields a Tick: a rich bar per measured thing, advancing per segment, with its latest rate."""
    if not enabled:
        yield no_tick
        return
    with ui.count_bar("rate") as bar:
        tasks: dict[str, int] = {}

        def tick(label: str, rate: float | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=steps_per_label, rate="")
            bar.update(tasks[label], advance=1, rate="warm-up" if rate is None else f"{rate:,.1f}/s")
        yield tick


__all__ = ["RESULTS_DIR", "Tick", "markdown", "print_tables", "progress", "record", "write_json"]
