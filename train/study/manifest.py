"""DIR/study.json: what a study directory was asked to run (name, kind, axes, baseline, split hash, the
chain of phases). Written by the runner; read by the report, the selection of a next phase, and tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stacktrain.errors import StudyError

FORMAT_VERSION = 1
MANIFEST = "study.json"


def read_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: not a study directory (no {MANIFEST}); run `stacktrain study STUDY.toml "
                         f"--out {out}` first") from None
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StudyError(f"{path}: study format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest
