"""The run folder: where one (profile, seed) run keeps what it has finished, so that a rerun resumes.

    <cache>/<profile>-<profile key>/seed<N>/<stream>/<method>.json     a method's result
    <cache>/<profile>-<profile key>/seed<N>/<stream>/experts/          the experts, their exact state
    <cache>/<profile>-<profile key>/seed<N>/<stream>/logs/<name>.log   a Ray task's own log (mmer-cl run --ray)

Every result is stored with a key: a digest of everything that decides it (the profile's values, the seed,
the stream's name and the source of its function, the method's name and settings, RESULTS_VERSION). A result
is reused only when its key matches, so a changed profile or stream is never served from the cache. Files are
written atomically: an interrupted method leaves nothing behind. Processes may share a run folder (Ray tasks):
a result or folder is built under a lock, so a second process asking for it waits and reuses it.
"""

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmer_cl.bench.profiles import Profile

RESULTS_VERSION = 4  # bump when a code change alters what a stored result means


@dataclass
class Result:
    """A method's result on one stream: R[t, j] = accuracy on task j after t + 1 experiences (NaN where not
    measured), storage in bytes by component (metrics.storage), and anything else worth keeping."""

    matrix: list
    storage: dict
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"matrix": np.asarray(self.matrix, dtype=float).tolist(), "storage": self.storage, **self.extra}


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(fn: Callable) -> str:
    try:
        return digest(inspect.getsource(fn))
    except (OSError, TypeError):
        return digest(getattr(fn, "__qualname__", repr(fn)))


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a result file")


class PeakRSS:
    """Peak resident memory (MB) while the block runs, sampled from /proc/self/statm every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Run:
    """One (profile, seed) run folder (module docstring)."""

    def __init__(self, profile: Profile, seed: int, cache: Path, progress: bool = True, device: str = "cpu"):
        self.profile, self.seed, self.progress, self.cache = profile, seed, progress, Path(cache)
        self.device = device  # where methods train and evaluate; CPU results keep the keys they always had
        self.dir = Path(cache) / f"{profile.name}-{profile.key()}" / f"seed{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memo: dict = {}  # things computed once per process (experts loaded in memory)

    def key(self, data, name: str, settings=None) -> str:
        parts = (self.profile.key(), self.seed, data.name, getattr(data, "fingerprint", ""), name, settings, RESULTS_VERSION)
        return digest(*parts) if self.device == "cpu" else digest(*parts, self.device)

    def stored(self, data, name: str, settings=None) -> dict | None:
        """The stored result of `name` on `data` if its key matches, else None."""
        path = self.dir / data.name / f"{name}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("key") == self.key(data, name, settings):
                return stored
        return None

    def cached(self, data, name: str, compute: Callable[[], Result | dict], settings=None) -> dict:
        """The stored result of `name` on `data` if its key matches, else compute, store and return it (as
        stored, so that a fresh run and a resumed one report the same values)."""
        with self._exclusive(data, name):
            stored = self.stored(data, name, settings)
            if stored is not None:
                return stored
            start = time.perf_counter()
            with PeakRSS() as rss:
                value = compute()
            value = value.to_json() if isinstance(value, Result) else dict(value)
            value.setdefault("seconds", time.perf_counter() - start)
            value.setdefault("peak_rss_mb", rss.peak)
            value["key"] = self.key(data, name, settings)
            write_json_atomic(self.dir / data.name / f"{name}.json", value)
            return self.stored(data, name, settings)

    def log_path(self, data, name: str) -> Path:
        return self.dir / data.name / "logs" / f"{name}.log"

    @contextlib.contextmanager
    def _exclusive(self, data, name: str):
        """Holds `<stream>/<name>`'s lock (an flock, released by the kernel if the process dies)."""
        path = self.dir / ".locks" / f"{data.name}.{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def artifact(self, data, name: str, build: Callable[[Path], None], settings=None) -> Path:
        """A folder `<stream>/<name>` built once: rebuilt when its key changes or it is incomplete."""
        import shutil

        folder, key = self.dir / data.name / name, self.key(data, name, settings)
        done = folder / "DONE"
        with self._exclusive(data, name):
            if done.exists() and done.read_text() == key:
                return folder
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.write_text(key)
            return folder
