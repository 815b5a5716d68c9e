"""The MMER state folder, crash-safe.

Layout (paths relative to the state folder):
    manifest.json                     format version, base reference, settings, tasks in order, sha256 per file
    g000003/tau_star*.safetensors     tau_star of generation 3 (float32, or the weights' dtype: Settings.tau_dtype),
                                      sharded like the input
    g000003/mask.001*.safetensors     task 1's mask, bit-packed (merging.pack_mask), flat uint8 per tensor
    tasks/001-audio/vector*.safetensors    exact mode: tau_i (float32); sparse mode: `<name>::index` (int64 flat
                                           indices, ascending) and `<name>::value` (float32) of trim_k(tau_i)
    tasks/001-audio/private*.safetensors   parameters only task 1's model has (encoder, projector, head)
    tasks/001-audio/files/            its config and tokenizer files, for export

A fold writes a new generation folder and a new task folder under `*.partial` names, fsyncs them,
renames them into place, and only then replaces manifest.json (write a temporary file, fsync, rename,
fsync the folder). Until that last rename the old manifest names only old files, which nothing touches:
a crash at any moment leaves the previous state intact. Store-shaped files the manifest does not name
are leftovers of an interrupted fold and are removed when the next fold starts.

One writer at a time, readers never blocked. Everything that writes a state (fold, refit) runs inside
`with store.lock(state_dir, create=...)`: an exclusive `fcntl.flock` on `<state>/.lock`, taken without
waiting (or polling for `wait` seconds); a second writer gets a StateError "<state> is being folded by pid
N". The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so it is never
left stuck; `.lock` itself stays (removing a lock file races with the next writer) and records the
holder's pid. The lock is re-entrant within one thread; other threads and forked children must not write
the state meanwhile (a child forked while the lock is held keeps it until the child exits). Readers
(load, State, inspect, export, switch) take no lock: they read only files the committed manifest names,
which a fold never modifies (it writes new ones, then swaps the manifest). A fold's garbage collection
does remove the superseded generation (tau_star, masks) once it has committed; a reader keeps it all the
same: `load` opens the generation's files at once (store.State, checkpoints.Checkpoint hold a descriptor
per file, through which an unlinked file stays readable, memory maps included), and reads the manifest again
when a fold committed between its reading the manifest and opening the files.

Integrity by content, not only size. The manifest records the sha256 of every state file, and (from the
first fold, integrity.ContentCheck) of every weight file of the base. A fold, refit or remove hashes what it reads
of the state and the base on a thread of its own while it works, through the descriptors it reads, and
refuses to publish anything if a hash differs, naming the file; export and the task switcher check the base
likewise, and the state whole (load). manifest.json is always standard JSON: `commit` refuses NaN and
Infinity (encode_manifest), and `read_manifest` refuses a manifest that holds them.

The store deletes only what it owns. A state folder carries the marker `.mmer-cl-state` (its content: the
format name), written atomically when the state is created: `lock(state_dir, create=True)` makes the folder
(with parents) if absent and marks it, but refuses a non-empty folder with neither marker nor manifest
("not an mmer-cl state") before writing anything into it. A folder holding a valid manifest but no marker
(a state written before markers existed) is adopted: the marker is added. `is_state(path)` tests for the
marker. `collect_garbage` does nothing in a folder without the marker, and in a marked one removes only
store-shaped leftovers the manifest does not name: folders `gNNNNNN` / `gNNNNNN.partial`, `tasks/NNN-name`
/ `tasks/NNN-name.partial`, and the files `manifest.json.tmp` / `.mmer-cl-state.tmp`. Anything else (a
user's `tasks/notes.txt`, `report.partial`, `x.tmp`, or a file inside a folder the manifest names) is left
alone; `.lock` and the marker are never collected and never named by a manifest. collect_garbage takes the
lock itself when its caller does not hold it, so it never touches a live writer's files. `stage` removes
a leftover `*.partial` folder only while this thread holds the lock (it can then only be a dead writer's
leftover); without the lock it refuses to touch one.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mmer_cl.checkpoints import Checkpoint, CheckpointError, fsync_dir, sha256_fd, sha256_file

FORMAT = "mmer-cl-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".mmer-cl-state"  # marks a folder as an mmer-cl state: the store deletes only inside such folders
LOCK_FILE = ".lock"  # flock'ed by the one writer; holds its pid; never removed
MODES = ("exact", "sparse", "compact")
KILL_ENV = "MMER_CL_KILL_AT"


class StateError(ValueError):
    """A state folder that is missing, damaged or used inconsistently; the message names the file."""


def crash_point(point: str) -> None:
    """Test hook for the crash-safety test: SIGKILL this process when $MMER_CL_KILL_AT names `point`."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def generation_dir(generation: int) -> str:
    return f"g{generation:06d}"


def task_dir(index: int, name: str) -> str:
    return f"tasks/{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:64]}"


def read_manifest(state_dir: Path) -> dict | None:
    """The committed manifest, or None for a folder that holds no state yet."""
    path = Path(state_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(), parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateError(f"{path}: corrupt manifest ({error})") from None
    except ValueError as error:
        raise StateError(f"{path}: corrupt manifest, not standard JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise StateError(f"{path}: corrupt manifest (not a JSON object)")
    if manifest.get("format") != FORMAT:
        raise StateError(f"{path}: not an mmer-cl state manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path}: format version {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    return manifest


def verify(state_dir: Path, manifest: dict, full: bool = True) -> None:
    """Checks every file the manifest names: its size, and with `full` its sha256. Names the bad file."""
    for relpath, entry in manifest["files"].items():
        path = Path(state_dir) / relpath
        if not path.is_file():
            raise StateError(f"state file {path} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise StateError(f"state file {path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if full and sha256_file(path) != entry["sha256"]:
            raise StateError(f"state file {path} is corrupt: its sha256 differs from the manifest's")


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


LOAD_ATTEMPTS = 5


def load(state_dir: str | Path, full: bool = True) -> "State":
    """The committed state, its generation's files opened (so a fold that commits and collects meanwhile
    takes nothing away from this reader; see State), every file checked: sizes, and with `full` sha256.
    A file missing because a fold committed between reading the manifest and opening it: read again."""
    state_dir = Path(state_dir)
    for attempt in range(LOAD_ATTEMPTS):
        manifest = read_manifest(state_dir)
        if manifest is None:
            raise StateError(f"{state_dir} holds no mmer-cl state ({MANIFEST} not found)")
        try:
            state = State(state_dir, manifest)
            state.verify(full)
        except MissingFile:
            if attempt + 1 < LOAD_ATTEMPTS and read_manifest(state_dir) != manifest:
                continue  # a newer manifest was committed meanwhile: load that one
            raise
        return state
    raise AssertionError("unreachable")


class MissingFile(StateError):
    """A file the manifest names is not there."""


class State:
    """Read access to one committed state: its manifest and lazy views of its tensors.

    The generation's files (tau_star and every task's mask: what a later fold's garbage collection removes)
    are opened when the State is made, so it keeps reading the generation it was made on while later folds
    commit and collect it. A task's own files (kept vector, private parameters, config files), which folds
    keep, are opened on first use, then held (only `remove` of that task deletes them). The Checkpoints it
    hands out are cached, one per file group; `close()` closes them all."""

    def __init__(self, state_dir: Path, manifest: dict):
        self.dir, self.manifest = Path(state_dir), manifest
        self._checkpoints: dict[tuple, Checkpoint] = {}
        self._group: dict[str, tuple] = {}  # relpath of a weight file -> its group's files
        for files in [manifest.get("tau_star_files", [])] + [task.get(key, []) for task in manifest.get("tasks", [])
                                                             for key in ("mask_files", "vector_files", "private_files")]:
            self._group.update({f: tuple(files) for f in files})
        try:
            for files in [manifest.get("tau_star_files", [])] + [t.get("mask_files", []) for t in manifest.get("tasks", [])]:
                self._open(files)
        except BaseException:
            self.close()
            raise

    def _open(self, files: list[str]) -> Checkpoint | None:
        if not files:
            return None
        ckpt = self._checkpoints.get(tuple(files))
        if ckpt is None:
            try:
                ckpt = self._checkpoints[tuple(files)] = Checkpoint([self.dir / f for f in files])
            except CheckpointError:
                missing = [self.dir / f for f in files if not (self.dir / f).is_file()]
                if missing:
                    raise MissingFile(f"state file {missing[0]} is missing") from None
                raise
        return ckpt

    def close(self) -> None:
        """Closes every file, the Checkpoints this State handed out included."""
        for ckpt in self._checkpoints.values():
            ckpt.close()
        self._checkpoints.clear()

    def _through(self, relpath: str, fn):
        """fn(fd) on a state file: through its Checkpoint's descriptor if open, else opened for the call."""
        ckpt = self._checkpoints.get(self._group.get(relpath))
        path = self.dir / relpath
        if ckpt is not None:
            return fn(ckpt._fd(path))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise MissingFile(f"state file {path} is missing") from None
        try:
            return fn(fd)
        finally:
            os.close(fd)

    def size(self, relpath: str) -> int:
        return self._through(relpath, lambda fd: os.fstat(fd).st_size)

    def sha256(self, relpath: str, stop=None) -> str:
        """sha256 of a state file, through the descriptor its reader reads if the State holds one."""
        return self._through(relpath, lambda fd: sha256_fd(fd, stop))

    def read_bytes(self, relpath: str) -> bytes:
        """A small state file's bytes (a config file)."""
        if relpath not in self.manifest["files"]:
            raise StateError(f"{self.dir}: the manifest names no file {relpath}")
        return self._through(relpath, lambda fd: os.pread(fd, os.fstat(fd).st_size, 0))

    def verify(self, full: bool = True, only=None) -> None:
        """Every file the manifest names (or the relpaths in `only`): its size, and with `full` its sha256,
        through the descriptors the State reads where it holds them. Names the bad file."""
        for relpath in self.manifest["files"] if only is None else only:
            entry, path = self.manifest["files"][relpath], self.dir / relpath
            size = self.size(relpath)
            if size != entry["bytes"]:
                raise StateError(f"state file {path} has {size} bytes, the manifest says {entry['bytes']}")
            if full and self.sha256(relpath) != entry["sha256"]:
                raise StateError(f"state file {path} is corrupt: its sha256 differs from the manifest's")

    @property
    def tasks(self) -> list[dict]:
        return self.manifest["tasks"]

    def task(self, name: str) -> dict:
        for task in self.tasks:
            if task["name"] == name:
                return task
        raise StateError(f"no task '{name}' in {self.dir}; it holds {[t['name'] for t in self.tasks]}")

    def tau_star(self) -> Checkpoint | None:
        return self._open(self.manifest["tau_star_files"])

    def masks(self, task: dict) -> Checkpoint | None:
        return self._open(task["mask_files"])

    def vectors(self, task: dict) -> Checkpoint | None:
        return self._open(task["vector_files"])

    def private(self, task: dict) -> Checkpoint | None:
        return self._open(task["private_files"])


def file_entries(folder: Path, prefix: str, digests: dict[str, str]) -> dict[str, dict]:
    """Manifest entries {prefix/name: {sha256, bytes}} for files written into `folder` with known digests."""
    return {f"{prefix}/{name}": {"sha256": digest, "bytes": (folder / name).stat().st_size} for name, digest in digests.items()}


def stage(state_dir: Path, relpath: str) -> Path:
    """A fresh `<relpath>.partial` folder to write into before `publish`. A leftover one is removed first
    when this thread holds the state's lock (then no other writer is alive: it is a dead fold's leftover);
    without the lock an existing one may be another fold's work in progress and is a StateError."""
    staging = Path(state_dir) / f"{relpath}.partial"
    if staging.exists() or staging.is_symlink():
        if not holds_lock(state_dir):
            raise StateError(f"{staging} already exists and this process does not hold {Path(state_dir) / LOCK_FILE}: "
                             f"it may be another fold's work in progress; write a state only inside store.lock()")
        _remove(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path) -> Path:
    """Renames a fully written `<x>.partial` folder to `<x>`, durably."""
    for path in staging.rglob("*"):
        if path.is_dir():
            fsync_dir(path)
    fsync_dir(staging)
    final = staging.with_name(staging.name.removesuffix(".partial"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def encode_manifest(state_dir: Path, manifest: dict) -> str:
    """The manifest as standard JSON (never NaN or Infinity, which json.dump writes by default); a StateError
    for a value JSON cannot represent."""
    try:
        return json.dumps(manifest, indent=1, allow_nan=False)
    except ValueError as error:
        raise StateError(f"{Path(state_dir) / MANIFEST}: not committed, the new manifest holds a value JSON cannot "
                         f"represent ({error}); the state is left as it was") from None


def commit(state_dir: Path, manifest: dict) -> None:
    """Replaces manifest.json atomically: temporary file, fsync, rename, fsync of the folder."""
    state_dir = Path(state_dir)
    own = [rel for rel in manifest["files"] if Path(rel).as_posix() in (MARKER, LOCK_FILE, MANIFEST)]
    if own:
        raise StateError(f"{state_dir}: a manifest may not name the store's own files {own}")
    text = encode_manifest(state_dir, manifest)
    tmp = state_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    crash_point("manifest-written")
    os.replace(tmp, state_dir / MANIFEST)
    fsync_dir(state_dir)


_GENERATION = re.compile(r"g\d{6,}(\.partial)?")
_TASK = re.compile(r"\d{3,}-[A-Za-z0-9_.-]+")  # task_dir's names, and their .partial


def collect_garbage(state_dir: Path, manifest: dict | None) -> None:
    """Removes what an interrupted or superseded fold left: the store-shaped folders and temporary files
    that neither `manifest` nor the committed manifest names. Does nothing in a folder that is not a state
    (no marker; a legacy state with a valid manifest is adopted first). Takes the lock unless this thread
    holds it: while another process folds this state, a StateError and nothing removed."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir() or not _owned(state_dir):
        return
    if not holds_lock(state_dir):
        with lock(state_dir):
            return collect_garbage(state_dir, manifest)
    keep: set[str] = set()
    for named in (manifest, read_manifest(state_dir)):
        if named:
            keep.update(parent.as_posix() for rel in named.get("files", {}) for parent in Path(rel).parents)
            keep.update(task["dir"] for task in named.get("tasks", []) if "dir" in task)
    for path in list(state_dir.iterdir()):
        if path.name in (f"{MANIFEST}.tmp", f"{MARKER}.tmp") and path.is_file() and not path.is_symlink():
            _remove(path)
        elif _GENERATION.fullmatch(path.name) and path.name not in keep and _is_real_dir(path):
            _remove(path)
        elif path.name == "tasks" and _is_real_dir(path):
            for sub in list(path.iterdir()):
                relpath = f"tasks/{sub.name}"
                if (_TASK.fullmatch(sub.name.removesuffix(".partial")) and relpath not in keep
                        and _is_real_dir(sub)):
                    _remove(sub)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---- ownership and the writer lock ----------------------------------------------------------------


def is_state(path: str | Path) -> bool:
    """Whether `path` is a folder marked as an mmer-cl state (one small read; no manifest parsed)."""
    try:
        return (Path(path) / MARKER).read_text().strip() == FORMAT
    except (OSError, UnicodeDecodeError):
        return False


def _write_marker(state_dir: Path) -> None:
    """The marker, atomically: temporary file, fsync, rename, fsync of the folder."""
    tmp = state_dir / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{FORMAT}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / MARKER)
    fsync_dir(state_dir)


def _owned(state_dir: Path) -> bool:
    """Marked, or a legacy state (a valid manifest, no marker yet), which gets its marker now."""
    if is_state(state_dir):
        return True
    if (state_dir / MARKER).exists():
        return False  # a marker of something else
    try:
        if read_manifest(state_dir) is None:
            return False
    except StateError:
        return False
    _write_marker(state_dir)
    return True


def _check_creatable(state_dir: Path) -> None:
    """A state may be created in a missing or empty folder (a lock file left by an earlier attempt is fine)."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StateError(f"{state_dir} is a file, not a state folder")
    if state_dir.is_dir() and not _owned(state_dir):
        if (state_dir / MARKER).exists():
            raise StateError(f"{state_dir} is not an mmer-cl state: its {MARKER} file does not say {FORMAT}")
        read_manifest(state_dir)  # a manifest.json that is not a valid state's: the error names it
        others = sorted(p.name for p in state_dir.iterdir() if p.name not in (LOCK_FILE, f"{MARKER}.tmp"))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise StateError(f"{state_dir} is not an mmer-cl state: it is not empty ({shown}) and has neither a "
                             f"{MARKER} marker nor a {MANIFEST}; fold into a new or empty folder")


_held = threading.local()  # .locks: {real path of a state folder: [fd, depth]} held by this thread


def _held_locks() -> dict:
    if not hasattr(_held, "locks"):
        _held.locks = {}
    return _held.locks


def holds_lock(state_dir: str | Path) -> bool:
    """Whether this thread holds the writer lock of `state_dir`."""
    return os.path.realpath(state_dir) in _held_locks()


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes it right after taking the lock: retry briefly)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f"pid {text}" + (" (this process, another thread)" if int(text) == os.getpid() else "")
        time.sleep(0.01)
    return "another process (pid not recorded)"


@contextlib.contextmanager
def lock(state_dir: str | Path, *, create: bool = False, wait: float = 0) -> Iterator[Path]:
    """Holds the exclusive writer lock of a state for the `with` block; yields the state folder.

    create=True: a first fold may create the state: the folder (with parents) is made if missing and
    marked; a non-empty folder that is not a state is refused before anything is written into it.
    create=False: the folder must already be a state (marked, or a legacy manifest, then marked).
    A second writer gets a StateError naming the holder's pid, at once, or after polling `wait` seconds.
    Re-entrant within one thread. The lock is released on exit, and by the kernel if the process dies."""
    state_dir = Path(state_dir)
    if create:
        _check_creatable(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StateError(f"{state_dir}: cannot create the state folder (a file is in the way)") from None
    elif not (state_dir.is_dir() and _owned(state_dir)):
        if state_dir.is_dir() and not (state_dir / MARKER).exists():
            read_manifest(state_dir)  # a manifest.json that is not a valid state's: the error names it
        raise StateError(f"{state_dir} holds no mmer-cl state (no {MARKER} marker and no {MANIFEST})")
    key = os.path.realpath(state_dir)
    held = _held_locks()
    if key in held:
        held[key][1] += 1
        try:
            yield state_dir
        finally:
            held[key][1] -= 1
        return
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"{state_dir} is being folded by {_holder(fd)}; one writer at a time: wait for it to "
                        f"finish and retry (readers are not blocked)"
                    ) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if create:
            _check_creatable(state_dir)  # again, now that no other writer can change the folder
        if not is_state(state_dir):
            _write_marker(state_dir)
        held[key] = [fd, 1]
        try:
            yield state_dir
        finally:
            del held[key]
            os.ftruncate(fd, 0)  # still ours: no other process can have written its pid meanwhile
    finally:
        os.close(fd)  # releases the flock


def check_new_task(manifest: dict | None, name: str) -> None:
    if manifest and any(task["name"] == name for task in manifest["tasks"]):
        raise StateError(f"duplicate task name: '{name}' is already folded into this state")
    if not name or "/" in name:
        raise StateError(f"task name must be a non-empty string without '/', got {name!r}")

