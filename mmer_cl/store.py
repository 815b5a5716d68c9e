"""The MMER state folder, crash-safe.

Layout (paths relative to the state folder):
    manifest.json                     format version, base reference, settings, tasks in order, sha256 per file
    g000003/tau_star*.safetensors     tau_star (float32) of generation 3, sharded like the input
    g000003/mask.001*.safetensors     task 1's mask, bit-packed (merging.pack_mask), flat uint8 per tensor
    tasks/001-audio/vector*.safetensors    exact mode: tau_i (float32); sparse mode: `<name>::index` (int64 flat
                                           indices, ascending) and `<name>::value` (float32) of trim_k(tau_i)
    tasks/001-audio/private*.safetensors   parameters only task 1's model has (encoder, projector, head)
    tasks/001-audio/files/            its config and tokenizer files, for export

A fold writes a new generation folder and a new task folder under `*.partial` names, fsyncs them,
renames them into place, and only then replaces manifest.json (write a temporary file, fsync, rename,
fsync the folder). Until that last rename the old manifest names only old files, which nothing touches:
a crash at any moment leaves the previous state intact. Files the manifest does not name are leftovers
of an interrupted fold and are removed when the next fold starts.
"""

import json
import os
import re
import shutil
import signal
from pathlib import Path

from mmer_cl.checkpoints import Checkpoint, fsync_dir, sha256_file

FORMAT = "mmer-cl-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StateError(f"{path}: corrupt manifest ({error})") from None
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


def load(state_dir: str | Path, full: bool = True) -> "State":
    state_dir = Path(state_dir)
    manifest = read_manifest(state_dir)
    if manifest is None:
        raise StateError(f"{state_dir} holds no mmer-cl state ({MANIFEST} not found)")
    verify(state_dir, manifest, full)
    return State(state_dir, manifest)


class State:
    """Read access to one committed state: its manifest and lazy views of its tensors."""

    def __init__(self, state_dir: Path, manifest: dict):
        self.dir, self.manifest = Path(state_dir), manifest

    @property
    def tasks(self) -> list[dict]:
        return self.manifest["tasks"]

    def task(self, name: str) -> dict:
        for task in self.tasks:
            if task["name"] == name:
                return task
        raise StateError(f"no task '{name}' in {self.dir}; it holds {[t['name'] for t in self.tasks]}")

    def _open(self, files: list[str]) -> Checkpoint | None:
        return Checkpoint([self.dir / f for f in files]) if files else None

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
    """A fresh `<relpath>.partial` folder to write into before `publish`."""
    staging = Path(state_dir) / f"{relpath}.partial"
    shutil.rmtree(staging, ignore_errors=True)
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


def commit(state_dir: Path, manifest: dict) -> None:
    """Replaces manifest.json atomically: temporary file, fsync, rename, fsync of the folder."""
    state_dir = Path(state_dir)
    tmp = state_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    crash_point("manifest-written")
    os.replace(tmp, state_dir / MANIFEST)
    fsync_dir(state_dir)


def collect_garbage(state_dir: Path, manifest: dict | None) -> None:
    """Removes what an interrupted or superseded fold left: anything the manifest does not name."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return
    keep = set(manifest["files"]) if manifest else set()
    keep_dirs = {parent.as_posix() for rel in keep for parent in Path(rel).parents}
    for path in list(state_dir.iterdir()):
        if path.name == MANIFEST:
            continue
        if path.name == "tasks" and path.is_dir():
            for sub in path.iterdir():
                if f"tasks/{sub.name}" not in keep_dirs:
                    _remove(sub)
        elif path.name not in keep_dirs and (path.name.endswith(".partial") or path.name.endswith(".tmp")
                                             or re.fullmatch(r"g\d{6}", path.name)):
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_new_task(manifest: dict | None, name: str) -> None:
    if manifest and any(task["name"] == name for task in manifest["tasks"]):
        raise StateError(f"duplicate task name: '{name}' is already folded into this state")
    if not name or "/" in name:
        raise StateError(f"task name must be a non-empty string without '/', got {name!r}")

