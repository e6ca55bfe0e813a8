"""stacktrain: patch-wise classification of 3-D image stacks.

The data flow is the package layout: `stacktrain.stores` (raw stacks -> Zarr), `stacktrain.pipelines`
(patches and loaders), `stacktrain.train` (one run; `stacktrain.train.study` for studies) and
`stacktrain.bench`. The short public API below is imported lazily, so that `import stacktrain` and
`stacktrain --help` stay fast:

    from stacktrain import Store, build_loader, train, load_config, load_results
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stacktrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_PUBLIC = {
    "Store": "stacktrain.stores.reader",
    "convert": "stacktrain.stores.convert",
    "ConvertOptions": "stacktrain.stores.options",
    "build_loader": "stacktrain.pipelines.loaders",
    "load_config": "stacktrain.train.config",
    "TrainConfig": "stacktrain.train.config",
    "train": "stacktrain.train.loop",
    "load_results": "stacktrain.train.results",
    "predict": "stacktrain.train.predict",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stacktrain' has no attribute {name!r}")
