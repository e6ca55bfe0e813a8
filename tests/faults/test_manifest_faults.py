"""Bad manifests and paths that are not stacks: the whole run is refused up front with one line naming
the manifest (and the row), the store is not touched (its stack list and folders stay as they were).
Spreadsheet habits that are not errors (';' or tab, a BOM, UTF-16, CRLF, blank rows, empty trailing
columns, case, unicode file names) convert."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from stacktrain.errors import ConversionFailed, InputError
from stacktrain.stores.convert import convert
from stacktrain.stores.options import ConvertOptions
from tests.faults.input_makers import GOOD, TINY, registered

HEAD = "path,stack_id,label,group\n"




def rows(*lines: str) -> bytes:
    return (HEAD + "".join(line + "\n" for line in lines)).encode()


# (id, manifest bytes, words the error must hold); a.npy and b.npy exist beside the manifest
CASES = [
    ("bad-label", rows("a.npy,a,SICK,p1"), ["line 2", "unknown label 'SICK'", "SAIN, MALADE"]),
    ("empty-label", rows("a.npy,a,,p1"), ["empty label", "--allow-unlabeled"]),
    ("duplicate-id", rows("a.npy,a,SAIN,p1", "b.npy,a,SAIN,p2"), ["line 3", "duplicate stack_id 'a'", "line 2"]),
    ("reserved-zarr-json", rows("a.npy,zarr.json,SAIN,p1"), ["'zarr.json' is a name the store uses"]),
    ("reserved-image", rows("a.npy,image,SAIN,p1"), ["'image' is a name the store uses"]),
    ("reserved-stats-any-case", rows("a.npy,STATS,SAIN,p1"), ["'STATS' is a name the store uses"]),
    ("reserved-zattrs", rows("a.npy,.zattrs,SAIN,p1"), ["'.zattrs' is not safe"]),
    ("reserved-staging", rows("a.npy,.staging,SAIN,p1"), ["'.staging' is not safe"]),
    ("traversal-dotdot", rows("a.npy,..,SAIN,p1"), ["'..' is not safe"]),
    ("traversal-up", rows("a.npy,../evil,SAIN,p1"), ["'../evil' is not safe"]),
    ("traversal-slash", rows("a.npy,a/b,SAIN,p1"), ["'a/b' is not safe"]),
    ("traversal-absolute", rows("a.npy,/etc,SAIN,p1"), ["'/etc' is not safe"]),
    ("traversal-backslash", rows("a.npy,a\\b,SAIN,p1"), ["is not safe"]),
    ("nul-in-id", rows("a.npy,a\0b,SAIN,p1"), ["'a\\x00b' is not safe"]),
    ("nul-in-path", rows("a\0.npy,a,SAIN,p1"), ["path 'a\\x00.npy' contains a NUL character"]),
    ("newline-in-id", rows('a.npy,"a\nb",SAIN,p1'), ["'a\\nb' is not safe"]),
    ("unicode-id", rows("a.npy,pâte,SAIN,p1"), ["'pâte' is not safe"]),
    ("blank-id", rows("a.npy,  ,SAIN,p1"), ["stack_id '' is not safe"]),
    ("empty-path", rows(",a,SAIN,p1"), ["line 2: empty path"]),
    ("empty-group", rows("a.npy,a,SAIN,"), ["empty group"]),
    ("bad-axes", (b"path,stack_id,label,group,axes\na.npy,a,SAIN,p1,zyxq\n"), ["'zyxq' is not an axis order"]),
    ("repeated-axis", (b"path,stack_id,label,group,axes\na.npy,a,SAIN,p1,zzyx\n"), ["'zzyx'"]),
    ("missing-file", rows("a.npy,a,SAIN,p1", "gone.npy,g,SAIN,p2"), ["line 3", "'gone.npy' not found"]),
    ("extra-cells", rows("a.npy,a,SAIN,p1,surplus"), ["more cells than the header", "'surplus'", "quote"]),
    ("missing-column", b"path,stack_id,label\na.npy,a,SAIN\n", ["missing column(s) group"]),
    ("unknown-column", b"path,stack_id,label,group,age\na.npy,a,SAIN,p1,40\n", ["unknown column(s) 'age'"]),
    ("column-twice", b"path,stack_id,label,group,Label\na.npy,a,SAIN,p1,SAIN\n", ["'label' appear more than once"]),
    ("value-in-unnamed-column", b"path,stack_id,label,group,\na.npy,a,SAIN,p1,x\n", ["column without a header name"]),
    ("header-only", HEAD.encode(), ["has no rows"]),
    ("empty-file", b"", ["missing column(s) path, stack_id, label, group"]),
    ("latin-1", rows("a.npy,a,SAIN,Zoé").decode().encode("latin-1"), ["not a readable CSV", "save it as UTF-8"]),
    ("binary-garbage", bytes(range(256)) * 4, ["not a readable CSV"]),
    ("semicolon-bad-label", b"path;stack_id;label;group\na.npy;a;sick;p1\n", ["unknown label 'sick'"]),
    ("every-problem-at-once", rows("a.npy,a,sick,p1", "nope.npy,a/b,SAIN,"),
     ["4 problem(s)", "unknown label 'sick'", "'a/b' is not safe", "empty group", "'nope.npy' not found"]),
]


def check_refused(folder, store, manifest_bytes: bytes, name: str = "m.csv") -> str:
    """The run is refused before any write: one line naming the manifest; the store is byte-identical."""
    for stem in ("a", "b"):
        np.save(folder / f"{stem}.npy", GOOD)
    (folder / name).write_bytes(manifest_bytes)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as info:
        convert(folder / name, store, ConvertOptions(**TINY))
    assert not isinstance(info.value, ConversionFailed)
    message = str(info.value)
    assert "\n" not in message and str(folder / name) in message
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert registered(store) == ["prior"]
    return message


@pytest.mark.parametrize("data, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_manifest_refused_before_any_write(tmp_path, store, data, words):
    message = check_refused(tmp_path, store, data)
    for word in words:
        assert word in message


def _fifo(d):
    os.mkfifo(d / "pipe.npy")
    return "pipe.npy", "is not a regular file or folder"


def _loop(d):
    os.symlink(d / "l2.npy", d / "l1.npy")
    os.symlink(d / "l1.npy", d / "l2.npy")
    return "l1.npy", "'l1.npy' is a symlink loop"


def _dangling(d):
    os.symlink(d / "moved.npy", d / "link.npy")
    return "link.npy", "'link.npy' is a symlink to"


def _socket(d):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.npy"))
    sock.close()  # the socket file stays
    return "sock.npy", "'sock.npy' is not a regular file"


PATH_CASES = [("fifo", _fifo), ("symlink-loop", _loop), ("dangling-symlink", _dangling), ("socket", _socket),
              ("char-device", lambda d: ("/dev/null", "'/dev/null' is not a regular file or folder"))]


@pytest.mark.parametrize("make", [c[1] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_paths_that_are_not_stacks_are_refused_up_front(tmp_path, store, make):
    path, words = make(tmp_path)
    message = check_refused(tmp_path, store, rows("a.npy,a,SAIN,p1", f"{path},x,MALADE,p2"))
    assert "line 3" in message and words in message and "nothing was converted" in message


def test_a_missing_manifest_and_a_folder_as_manifest(tmp_path, store):
    (tmp_path / "dir.csv").mkdir()
    for name in ("nope.csv", "dir.csv"):
        with pytest.raises(InputError, match=rf"{name}: manifest not found"):
            convert(tmp_path / name, store, ConvertOptions(**TINY))
    assert registered(store) == ["prior"]


# (id, manifest bytes): all convert both stacks
SPREADSHEETS = [
    ("semicolons", b"Path;Stack_ID;Label;Group\na.npy;a;sain;p1\nb.npy;b;Malade;p2\n"),
    ("tabs", b"path\tstack_id\tlabel\tgroup\na.npy\ta\tSAIN\tp1\nb.npy\tb\tMALADE\tp2\n"),
    ("utf8-bom", b"\xef\xbb\xbf" + rows("a.npy,a,SAIN,p1", "b.npy,b,MALADE,p2")),
    ("utf16-excel", "path\tstack_id\tlabel\tgroup\r\na.npy\ta\tSAIN\tp1\r\nb.npy\tb\tMALADE\tp2\r\n".encode("utf-16")),
    ("crlf", rows("a.npy,a,SAIN,p1", "b.npy,b,MALADE,p2").replace(b"\n", b"\r\n")),
    ("blank-rows-and-trailing-columns",
     b"path,stack_id,label,group,,\na.npy,a,SAIN,p1,,\n,,,,,\nb.npy,b,MALADE,p2,,\n"),
    ("quoted-comma-and-unicode-name", rows('"dé,jà.npy",a,SAIN,p1', "b.npy,b,MALADE,p2")),
]


@pytest.mark.parametrize("data", [c[1] for c in SPREADSHEETS], ids=[c[0] for c in SPREADSHEETS])
def test_spreadsheet_habits_convert(tmp_path, store, data):
    for name in ("a.npy", "b.npy", "dé,jà.npy"):
        np.save(tmp_path / name, GOOD)
    (tmp_path / "m.csv").write_bytes(data)
    report = convert(tmp_path / "m.csv", store, ConvertOptions(**TINY))
    assert [(o.stack_id, o.status) for o in report.outcomes] == [("a", "converted"), ("b", "converted")]
    assert [o.meta.label for o in report.outcomes] == ["SAIN", "MALADE"]
    assert registered(store) == ["prior", "a", "b"]
