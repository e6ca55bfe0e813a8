"""The on-disk layout of a stacktrain store, shared by the writer and the reader.

```
STORE.zarr/
  zarr.json                  root group; attributes.stacktrain = {format_version, stacks: [...]} and
                             attributes.ome = {version 0.5, bioformats2raw.layout 3}: an OME collection
  OME/                       zarr.json (attributes.ome.series: every "<stack_id>/image") and METADATA.ome.xml
  <stack_id>/
    zarr.json                group; attributes.stacktrain = StackMeta as a dict
    image/                   an OME-Zarr 0.5 image (attributes.ome.multiscales)
      0/                     uint8|uint16 array, axes c,z,y,x, sharded, LZ4 (or zstd) chunks
      1/ .. k/               the pyramid (stores/pyramid.py): block means, zstd; training reads only 0/
    stats/
      foreground             float32 (Zc, Yc, Xc): fraction of voxels above the threshold per stats cell
      mean                   float32 (C, Zc, Yc, Xc): mean intensity per channel and stats cell
```

Beside the store, not in it: `.STORE.zarr.staging/` (`staging_dir`) holds the stacks being written,
renamed into place when complete, and the convert locks. Kept out of the Zarr hierarchy, so zarr-python
and OME-Zarr readers see only groups and arrays (a foreign folder inside makes zarr-python warn on
every listing); a rename from it stays on one filesystem, since both live in the store's parent.

A stack's metadata ends with its completeness record (`StackMeta.record`, written before the one rename
that makes the stack visible): the shard grid and, for every shard file written, its path under the
array, its byte size, the crc32c of its bytes and the crc32c of its content (each stored chunk's
index position (u32 LE) and decoded bytes, in file order). `stores/verify.py` checks a stack against it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from stacktrain.choices import Codec, Label, options

FORMAT_VERSION = 1
AXES = ("c", "z", "y", "x")
IMAGE = "image"
LEVEL0 = "0"
STATS = "stats"
OME_GROUP = "OME"  # the collection's series list (bioformats2raw layout), beside the stacks
OME_XML = "METADATA.ome.xml"
LEGACY_STAGING = ".staging"  # the staging folder inside the store, before it moved beside it


def staging_dir(store) -> Path:
    """The folder beside `store` where its stacks are written before they are renamed into it."""
    store = Path(store).absolute()
    return store.parent / f".{store.name}.staging"

# A chunk is one channel of a (z, y, x) block, so every chunk of a stack inflates to the same shape
# (DALI's inflate requires that). The shard holds all channels of one 32x256x256 patch cell, so a
# patch-aligned read is one shard file. See README "Choosing chunks" for the measurements.
DEFAULT_CHUNK_ZYX = (16, 64, 64)
DEFAULT_SHARD_ZYX = (32, 256, 256)
# Statistics are kept on a fine grid so that any patch size can aggregate them without reading voxels.
STATS_CELL_ZYX = (8, 32, 32)
DEFAULT_FOREGROUND_THRESHOLD = 0  # a voxel is foreground when any channel is above this value
PERCENTILES = (0.5, 1.0, 99.0, 99.5)
# The pyramid (stores/pyramid.py): z is halved only while the halved depth stays one default patch deep;
# by default levels are added until the smaller of y and x is under PYRAMID_MIN_YX.
PYRAMID_MIN_Z = 32
PYRAMID_MIN_YX = 256
CODECS = options(Codec)
GPU_CODECS = ("lz4",)
LABELS = {"SAIN": 0, "MALADE": 1}
UNLABELED = ""  # the label of a stack converted to be predicted on (convert --allow-unlabeled)
CLASS_NAMES = options(Label)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


# Names the store itself uses at the level of the stack folders, or inside one: a stack named so
# would overwrite the store's own metadata.
RESERVED_IDS = frozenset({"zarr.json", ".zattrs", ".zgroup", "image", "stats", OME_GROUP.lower()})


def check_stack_id(stack_id: str) -> str | None:
    """Return why `stack_id` is unsafe as a directory name, or None when it is fine. Used when a
    manifest is read and again when a store is opened, so a crafted store cannot steer a write."""
    if not isinstance(stack_id, str) or not _SAFE_ID.match(stack_id) or ".." in stack_id:
        return (f"stack_id {stack_id!r} is not safe as a path name: use letters, digits, '_', '-' "
                "and '.', starting with a letter or digit, without '..' or '/'")
    if stack_id.lower() in RESERVED_IDS:
        return f"stack_id {stack_id!r} is a name the store uses itself ({', '.join(sorted(RESERVED_IDS))}); rename it"
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackMeta:
    """What the store knows about one stack; saved in `<stack_id>/zarr.json` and the root list."""

    stack_id: str
    label: str  # SAIN, MALADE or UNLABELED ("": a stack to predict on, converted with --allow-unlabeled)
    group: str  # patient id; splits never separate a group
    shape: tuple[int, int, int, int]  # c, z, y, x
    dtype: str  # uint8 or uint16
    codec: str  # lz4 or zstd
    chunk_zyx: tuple[int, int, int]
    shard_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float] | None  # physical voxel size, when the source had one
    source: str
    source_sha256: str
    percentiles: dict[str, list[float]]  # "p1" -> one value per channel
    channel_sum: list[float]  # per channel, over the valid voxels: for mean/std from training stacks
    channel_sumsq: list[float]
    foreground_threshold: int = DEFAULT_FOREGROUND_THRESHOLD
    # DICOM series converted with --allow-gaps: {"unit": "mm" (slice positions) or "InstanceNumber",
    # "median_step", "between": [[before, after], ...]} for every missing run of slices (stacked without
    # them); None: no gap
    gaps: dict[str, Any] | None = None
    stats_cell_zyx: tuple[int, int, int] = STATS_CELL_ZYX
    format_version: int = FORMAT_VERSION
    # {"grid": [gz, gy, gx], "shards": {"c/0/z/y/x": [size, file crc32c, content crc32c]}}; None: written
    # by a stacktrain older than the record
    record: dict[str, Any] | None = None
    # (z, y, x) of the source before --pad added zeros at the end of each axis; statistics, patches,
    # heatmaps and `info` cover only this region. None: the whole shape (stores older than the field)
    valid_zyx: tuple[int, int, int] | None = None
    source_bytes: int | None = None  # the source's size on disk at conversion (None: not recorded)
    # what was applied to the source's values (stores/intensity.py): {"kind": identity|offset|window|minmax,
    # "source_dtype", and "offset" or "low"/"high"}; None: converted before stores recorded it
    intensity: dict[str, Any] | None = None
    levels: int = 0  # pyramid levels beside level 0 (image/1 .. image/<levels>); 0 in stores older than them

    @property
    def label_index(self) -> int:
        """0 SAIN, 1 MALADE; -1 for an unlabeled stack (one to predict on, never to train on)."""
        return LABELS.get(self.label, -1)

    @property
    def valid(self) -> tuple[int, int, int]:
        """(z, y, x) of the voxels that came from the source (the rest is padding)."""
        return tuple(self.valid_zyx) if self.valid_zyx is not None else tuple(self.shape[1:])

    @property
    def n_voxels(self) -> int:
        """Voxels per channel that came from the source: what channel_sum / channel_sumsq add up."""
        z, y, x = self.valid
        return z * y * x

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackMeta:
        tuples = {"shape", "chunk_zyx", "shard_zyx", "stats_cell_zyx", "spacing_zyx", "valid_zyx"}
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in d.items() if k in fields}
        return cls(**kw)


def shard_grid(shape, shard_zyx) -> tuple[int, int, int]:
    """Shards along z, y, x of a (C, Z, Y, X) array (each shard holds all channels)."""
    return tuple(-(-n // s) for n, s in zip(tuple(shape)[1:], shard_zyx))


def shard_relpath(gz: int, gy: int, gx: int) -> str:
    """Where shard (gz, gy, gx) lies under the array folder (zarr's default chunk key encoding)."""
    return f"c/0/{gz}/{gy}/{gx}"


def root_group_json(stacks: list[dict[str, Any]], intensity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The root zarr.json: a Zarr v3 group whose attributes list the stacks, with the store's dtype and
    intensity mapping ({"dtype", "mapping"}, stores/intensity.py) once it has one, and mark it as an OME
    collection (bioformats2raw layout: the images are listed in OME/, see `ome_collection`)."""
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {"ome": {"version": "0.5", "bioformats2raw.layout": 3},
                       "stacktrain": {"format_version": FORMAT_VERSION, **(intensity or {}), "stacks": stacks}},
    }


def image_path(stack_id: str) -> str:
    """Where a stack's OME image lies under the store's root."""
    return f"{stack_id}/{IMAGE}"


def ome_collection(metas) -> dict[str, str]:
    """The files of the root's OME group, {path under the store: text}, for the stacks `metas` (StackMeta,
    in the root list's order): OME/zarr.json whose `series` lists every image path, and OME/METADATA.ome.xml
    with one Image per stack whose ID is "Image:<path>" (what napari-ome-zarr follows). A pure function of
    the stack list, rewritten with the root whenever that changes. The paths are not numbered (0, 1, ...):
    the bioformats2raw layout allows any paths when `series` lists them."""
    series = [image_path(m.stack_id) for m in metas]
    group = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "series": series}}}
    ns = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    root = ElementTree.Element("OME", {"xmlns": ns, "Creator": "stacktrain"})
    for m, path in zip(metas, series):
        image = ElementTree.SubElement(root, "Image", {"ID": f"Image:{path}", "Name": m.stack_id})
        c, z, y, x = m.shape
        pixels = {"ID": f"Pixels:{path}", "DimensionOrder": "XYZCT", "Type": m.dtype, "SizeX": str(x),
                  "SizeY": str(y), "SizeZ": str(z), "SizeC": str(c), "SizeT": "1"}
        if m.spacing_zyx:
            for ax, size in zip("ZYX", m.spacing_zyx):
                pixels |= {f"PhysicalSize{ax}": repr(float(size)), f"PhysicalSize{ax}Unit": "µm"}
        ElementTree.SubElement(ElementTree.SubElement(image, "Pixels", pixels), "MetadataOnly")
    xml = '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"
    return {f"{OME_GROUP}/zarr.json": json.dumps(group, indent=2), f"{OME_GROUP}/{OME_XML}": xml}


CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF")  # what viewers show the 3 channels as: red, green, blue


def omero_channels(dtype_max: float, percentiles: dict[str, list[float]]) -> dict[str, Any]:
    """OME-Zarr's `omero` block: a name, a colour and a display window per channel. The window spans the
    stored 1st to 99th percentile, so a viewer shows 16-bit data around 1000-3000 as more than black."""
    channels = []
    for i, (low, high) in enumerate(zip(percentiles["p1"], percentiles["p99"])):
        end = high if high > low else min(low + 1.0, dtype_max)
        channels.append({"label": f"ch{i}", "color": CHANNEL_COLORS[i % 3], "active": True, "coefficient": 1.0,
                         "family": "linear", "inverted": False,
                         "window": {"min": 0.0, "max": float(dtype_max), "start": float(low), "end": float(end)}})
    return {"channels": channels, "rdefs": {"model": "color"}}


def ome_multiscales(name: str, spacing_zyx: tuple[float, float, float] | None,
                    omero: dict[str, Any] | None = None,
                    level_factors: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """OME-Zarr 0.5 `ome` attributes of a c,z,y,x image (with its `omero` block when given). `level_factors`:
    the level-0 voxels one voxel of each level spans along z, y, x (level 0 first; None: level 0 alone).
    Level k's scale is the spacing times its factor, and its translation half a level-0 voxel per halving
    ((factor - 1) / 2 voxels): a block mean's centre is its block's centre, so the levels overlay exactly."""
    spacing = tuple(spacing_zyx or (1.0, 1.0, 1.0))
    unit = "micrometer" if spacing_zyx else None
    axes = [{"name": "c", "type": "channel"}]
    for ax in ("z", "y", "x"):
        axes.append({"name": ax, "type": "space", **({"unit": unit} if unit else {})})
    datasets = []
    for k, f in enumerate(level_factors or [(1, 1, 1)]):
        transforms = [{"type": "scale", "scale": [1.0, *(float(s * n) for s, n in zip(spacing, f))]}]
        if k:
            transforms.append({"type": "translation",
                               "translation": [0.0, *(float(s * (n - 1) / 2) for s, n in zip(spacing, f))]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return {
        "version": "0.5",
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
        **({"omero": omero} if omero else {}),
    }
