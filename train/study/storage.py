"""Where an Optuna search lives, and how several processes (on several machines) share it safely.

- The URL: `--storage URL`, else `$STACKTRAIN_STORAGE`, else the study file's `hpo.storage`, else
  sqlite:///DIR/optuna.db. `postgresql://` means the psycopg (v3) driver, the one the lock file pins
  (SQLAlchemy's bare `postgresql://` would ask for psycopg2).
- A password is never written by the project: files and messages get `redact(url)` (`***`), and
  `stacktrain report` asks for the URL again (flag or variable) when the recorded one was redacted.
- Starting N processes on a fresh database at once: Optuna creates its tables (and PostgreSQL types)
  without a lock, so all but one can fail with a unique violation; the loser retries once the winner
  has created them (`open_storage`).
- Distinct trials: every process samples trial n with its own random state seeded by
  (hpo.seed, n). Trial numbers come from the database, so two processes never draw the same
  random start, and one process rerun on the same history draws the same parameters
  (`trial_seeded_sampler`; the seed is recorded on the trial as user attribute `sampler_seed`).
- Any database error is one line (`StudyError`), never a driver traceback.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stacktrain.errors import StudyError
from stacktrain.train.study.claims import pid_alive

ENV = "STACKTRAIN_STORAGE"
DB_NAME = "optuna.db"
CREATE_ATTEMPTS = 8


def _optuna():
    import optuna
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def resolve_url(configured: str, out: Path, given: str | None = None) -> str:
    """The storage URL, by precedence: `given` (--storage), $STACKTRAIN_STORAGE, the file's, the default."""
    url = given or os.environ.get(ENV) or configured or f"sqlite:///{(Path(out) / DB_NAME).resolve()}"
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if not sep:
        raise StudyError(f"storage {url!r}: not a database URL; give e.g. sqlite:///path/optuna.db or "
                         "postgresql://user@host/db")
    return url


def redact(url: str) -> str:
    """The URL with its password replaced by *** (what the project writes and prints)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: show only the scheme
        return url.partition("://")[0] + "://***"


def is_redacted(url: str) -> bool:
    return ":***@" in url


_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s\"']+):[^\s\"']*@")


def redact_text(text: str) -> str:
    """Every user:password@ of a URL in `text` as user:***@ (the copy of a study file)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Driver and SQLAlchemy errors -> one StudyError line that names the (redacted) storage."""
    from sqlalchemy.exc import SQLAlchemyError

    optuna = _optuna()
    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        cause = str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__]
        raise StudyError(f"Optuna storage {redact(url)}: {cause[0]}; check that the database server is up "
                         "and the URL (--storage or $STACKTRAIN_STORAGE) is right") from None
    except ModuleNotFoundError as e:
        raise StudyError(f"Optuna storage {redact(url)}: its driver is not installed ({e.name}); "
                         "postgresql:// uses psycopg, installed by `make install`") from None


def _schema_race(e: Exception) -> bool:
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(e).lower()
    return isinstance(e, IntegrityError) or (isinstance(e, (ProgrammingError, OperationalError))
                                             and ("already exists" in text or "duplicate" in text))


def open_storage(url: str, heartbeat_s: int = 0):
    """An RDBStorage on `url`, safe when several processes create it on a fresh database at once."""
    optuna = _optuna()
    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if url.startswith("sqlite") else {}
    if heartbeat_s > 0:  # trials of a silent machine are failed after 2 beats and retried with their params
        kwargs.update(heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                      heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    return _racing(url, lambda: optuna.storages.RDBStorage(url, **kwargs))


def create_or_load(name: str, storage: Any, url: str, sampler: Any, pruner: Any):
    """optuna.create_study(load_if_exists=True), retried when another process created it at the same moment."""
    optuna = _optuna()
    return _racing(url, lambda: optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                                    pruner=pruner, direction="maximize", load_if_exists=True))


def _racing(url: str, make: Callable[[], Any]) -> Any:
    """`make()`, retried while it loses the schema race to another process (which is creating it)."""
    with database_errors(url):
        for attempt in range(CREATE_ATTEMPTS):
            try:
                return make()
            except Exception as e:
                if not _schema_race(e) or attempt == CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # back off: the winner is creating it


def load(name: str, url: str):
    """The existing study `name` on `url` (for the report), or one StudyError line."""
    optuna = _optuna()
    with database_errors(url):
        try:
            return optuna.load_study(study_name=name, storage=open_storage(url))
        except KeyError:
            raise StudyError(f"Optuna storage {redact(url)} has no study {name!r}; give the storage this "
                             "study ran on (--storage or $STACKTRAIN_STORAGE)") from None


def trial_seed(seed: int, number: int) -> int:
    return (seed * 1_000_003 + number) % 2**32


def trial_seeded_sampler(seed: int):
    """A TPE sampler whose random state is (hpo.seed, trial number) for every trial: a fresh
    TPESampler per trial. TPE reads the history from the storage, so nothing else is lost."""
    optuna = _optuna()

    class TrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self):
            self._inner = optuna.samplers.TPESampler(seed=seed)

        def before_trial(self, study, trial):
            self._inner = optuna.samplers.TPESampler(seed=trial_seed(seed, trial.number))
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self._inner.reseed_rng()

    return TrialSeeded()


# -- the trials on it --------------------------------------------------------------------------------
def recover_dead_trials(ostudy: Any) -> list[int]:
    """Fail this host's RUNNING trials whose process is gone and enqueue them again (they resume)."""
    optuna = _optuna()
    host, revived = socket.gethostname(), []
    for t in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not pid_alive(t.user_attrs.get("pid")):
            ostudy.tell(t.number, state=optuna.trial.TrialState.FAIL)
            ostudy.enqueue_trial(t.params, user_attrs={"run_number": t.user_attrs.get("run_number", t.number),
                                                      "base": bool(t.user_attrs.get("base"))})
            revived.append(t.number)
    return revived


def finished_count(ostudy: Any) -> int:
    states = _optuna().trial.TrialState
    return len(ostudy.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))


def listed_trials(manifest: dict[str, Any], study_dir: Path, given: str | None) -> tuple[str, dict[str, Any], str]:
    """For the report, from the storage (every machine's trials, not only this directory's folders):
    (storage URL, {label: finished trial}, the base trial's label)."""
    url = manifest["hpo"]["storage"]
    if given or os.environ.get(ENV):
        url = resolve_url("", study_dir, given)
    elif is_redacted(url):
        raise StudyError(f"{study_dir}: the search's storage {url} was recorded without its password; give it "
                         f"with --storage URL or ${ENV}")
    ostudy = load(manifest["hpo"]["study_name"], url)
    states = _optuna().trial.TrialState
    with database_errors(url):
        trials = ostudy.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
    listed = {f"trial-{t.user_attrs.get('run_number', t.number)}": t for t in trials}
    base = next((label for label, t in listed.items() if t.user_attrs.get("base")), "trial-0")
    return url, listed, base
