"""Content checks: the sha256 of what a fold or an export reads (state files, the base's weight files),
computed on a thread of its own beside the work, through the very descriptors the work reads."""

import threading
from concurrent.futures import ThreadPoolExecutor

from mmer_cl import store
from mmer_cl.checkpoints import Checkpoint
from mmer_cl.store import StateError


class ContentError(StateError):
    """A state file or a base file whose sha256 is not the recorded one."""


class ContentCheck:
    """sha256 of what a fold or an export reads, computed on a thread of its own while the work goes on,
    through the very descriptors the work reads (Checkpoint opens them up front, so what is hashed is what
    is read): the state files in `relpaths` against the manifest's sha256, then the base's weight files
    against `base_sha256` (the sha256 the state recorded at its first fold; None records them: `result()`
    returns {file name: sha256}). hashlib releases the GIL, so the hashing runs beside the fold's kernels.
    `result()` waits and raises a ContentError naming the first file that differs; `cancel()` stops early."""

    def __init__(self, base: Checkpoint | None, base_sha256: dict | None = None, state: store.State | None = None,
                 relpaths=()):
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._future = pool.submit(self._run, base, base_sha256, state, list(relpaths))
        pool.shutdown(wait=False)

    def _run(self, base, expected, state, relpaths):
        for relpath in relpaths:
            digest = state.sha256(relpath, self._stop)
            if self._stop.is_set():
                return None
            if digest != state.manifest["files"][relpath]["sha256"]:
                return ContentError(f"state file {state.dir / relpath} is corrupt: its sha256 differs from the "
                                    f"manifest's; refused, the state is left as it was (restore the file from a "
                                    f"backup, or rebuild the state)")
        digests = {}
        for path in base.files if base is not None else []:
            digest = base.sha256(path, self._stop)
            if self._stop.is_set():
                return None
            if expected is not None and expected.get(path.name) != digest:
                return ContentError(f"the base file {path} is not the one this state was built on: its sha256 "
                                    f"differs from the one recorded at the first fold (same tensor names and "
                                    f"shapes, other values); refused: restore the original base")
            digests[path.name] = digest
        return digests

    def result(self) -> dict:
        outcome = self._future.result()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def failure(self) -> ContentError | None:
        """Waits for the check; the ContentError it found, or None (also if the check itself failed)."""
        try:
            outcome = self._future.result()
        except Exception:  # noqa: BLE001 - an unreadable file: the caller's own error says more
            return None
        return outcome if isinstance(outcome, ContentError) else None

    def cancel(self) -> None:
        self._stop.set()


def check_base(manifest: dict, base: Checkpoint) -> None:
    """The base's content against the sha256 the state recorded (nothing to check in a state written before
    they were recorded); a ContentError naming the file that differs. Hashes every weight file once."""
    if manifest["base"].get("sha256") is not None:
        ContentCheck(base, manifest["base"]["sha256"]).result()
