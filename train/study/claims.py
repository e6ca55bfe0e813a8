"""Claims on a grid study's runs, so that N processes on N machines share one study directory and
each run is trained exactly once.

Why claim files with heartbeats, and not flock or Optuna: a study directory shared by several
machines lives on NFS, Lustre or GPFS. There `flock` is often local to one client (Lustre's
`localflock`, NFS mounts with `nolock`), so two machines would both "hold" a run without noticing;
an exclusive create (`O_CREAT | O_EXCL`) and a `rename` are atomic on all of them. A grid needs no
database either: the run folders are the shared state.

- `RUN_DIR/claim.json` is created exclusively by the process that trains the run, with its host,
  pid and a random token. A thread touches it every `beat_s` seconds while the run trains.
- It is stale when its holder is on this host and its pid is gone (taken over at once), or when it
  was not touched for `STALE_BEATS` beats (a machine that died, or was cut off: its clock must
  agree with the others', as NTP keeps it). A stale claim is renamed away (only one process's rename
  succeeds) and claimed afresh; the run then resumes from its `last.pt`.
- The holder removes its claim when the run ends, whether it finished or raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

CLAIM = "claim.json"
STALE_BEATS = 3


def pid_alive(pid) -> bool:
    """Whether process `pid` of this host exists (a malformed pid counts as alive: never steal on doubt)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def holder(run_dir: Path) -> dict | None:
    """The claim's content, with its age in seconds; None when the run is not claimed."""
    path = Path(run_dir) / CLAIM
    try:
        info = json.loads(path.read_text())
        info["age_s"] = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):  # being written at this moment: a live claim
        return {"host": "?", "pid": -1, "token": "", "age_s": 0.0}
    return info


def is_stale(info: dict, beat_s: float) -> bool:
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and info["pid"] > 0:
        return not pid_alive(info["pid"])
    return info["age_s"] > STALE_BEATS * beat_s


def describe(info: dict) -> str:
    return f"{info.get('host')}:{info.get('pid')}"


class Claim:
    """`with Claim(run_dir, beat_s) as claim:` -- `claim.held` says whether this process trains the run."""

    def __init__(self, run_dir: Path, beat_s: float):
        self.path = Path(run_dir) / CLAIM
        self.beat_s = beat_s
        self.token = secrets.token_hex(8)
        self.held = False
        self.other: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o664)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "since": time.time()}, f)
        return True

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            info = holder(self.path.parent)
            if info is not None and not is_stale(info, self.beat_s):
                self.other = info
                return False
            if info is not None and not self._remove_stale(info):
                self.other = holder(self.path.parent)
                return False
            if not self._create():
                self.other = holder(self.path.parent)
                return False
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _remove_stale(self, stale: dict) -> bool:
        """Rename the stale claim away; False when another process took it over first (what we renamed was
        its fresh claim: put back)."""
        aside = self.path.with_name(f"{CLAIM}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # removed by another process: whoever creates next holds it
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, json.JSONDecodeError):
            moved = None
        if moved is not None and moved != stale.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = holder(self.path.parent)
        if info is not None and info.get("token") == self.token:  # still ours: not taken over meanwhile
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
