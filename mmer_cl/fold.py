"""The fold: one streaming engine for every merging method, any merge of merging.MERGES with any mask rule
of merging.MASK_RULES, in any state mode (modes.py).

A fold walks the base's tensors one at a time, in flat chunks of a bounded number of elements, and for each
chunk stacks every task's vector as the state keeps it with the new task's (sources.py):
    taus      [T, n]   old tasks decoded by the state's mode; the new one tau_T = theta_T - theta0
    tau_star  = merge(taus)                       a running merge: merge([tau_star_old, tau_T])
    masks     = mask_rule(taus, tau_star, lam)    "none": every task uses tau_star whole
It writes a new generation (tau_star, every task's bit-packed mask) and the new task's folder (its kept
vector, private parameters and config files), and only then commits the manifest (store.py): a fold killed
at any point leaves the previous state whole. A tensor larger than one chunk is trimmed at its exact k-th
largest magnitude (kernels.kth_largest_magnitude), so chunking changes no result; a pair with a fused
kernel (TIES + MMER masks) runs on it, bit-identical to the registry's functions. `refit` recomputes every
task's merge and mask from the kept vectors with other settings; `remove` drops a task.
"""

import dataclasses
import math
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmer_cl import kernels, merging, modes, store
from mmer_cl.checkpoints import Checkpoint, CheckpointError, PlannedWriter, copy_small_files, fsync_dir, sha256_file
from mmer_cl.sources import open_source
from mmer_cl.store import StateError

CHUNK_ELEMENTS = 1 << 23  # elements of the [T, chunk] stack processed at once, whatever T
WHOLE_THRESHOLD_ELEMENTS = 1 << 25  # larger tensors find their trim threshold by a streamed histogram
TRIMS = ("tensor", "global")
FIXED = ("mode", "trim")  # settings a state keeps for life


@dataclass(frozen=True)
class Settings:
    """How a state merges. mode and trim are fixed by the first fold; a refit may change the others.

    mode: exact | sparse | compact; merge, mask_rule: names in merging.MERGES and merging.MASK_RULES;
    k: TIES's trim fraction, per "tensor" or "global" (trim); alpha: the scale of tau_star; p: DARE's drop
    probability; energy: OPCM's singular-value fraction; seed: the draws of DARE and of random masks.
    """

    mode: str = "exact"
    merge: str = "ties"
    mask_rule: str = "mmer"
    k: float = 0.2
    alpha: float = 1.0
    trim: str = "tensor"
    p: float = 0.5
    energy: float = 0.5
    seed: int = 0

    def check(self) -> "Settings":
        """Every value known, finite and in range, and a mode that can keep what the merge needs."""
        self.check_values()
        merge, rule = merging.MERGES[self.merge], merging.MASK_RULES[self.mask_rule]
        if self.mode == "sparse" and not merge.running and merge.needs != "trimmed":
            raise StateError(f"merge '{self.merge}' needs each task's whole vector; a sparse state keeps only "
                             f"trimmed ones: use mode='exact'")
        if self.mode == "compact" and not merge.running and rule.fn is None:
            raise StateError(f"a compact state keeps only tau_star and masks: merge '{self.merge}' without masks "
                             f"cannot recover old tasks from it; use mode='exact' or 'sparse', or a mask rule")
        return self

    def check_values(self) -> "Settings":
        """Each value on its own: names known, numbers real, finite and in range (NaN fails every range)."""
        for field in ("k", "alpha", "p", "energy"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise StateError(f"{field} must be a number, got {value!r}")
        for field, known in (("mode", modes.NAMES), ("merge", merging.MERGES), ("mask_rule", merging.MASK_RULES),
                             ("trim", TRIMS)):
            if getattr(self, field) not in known:
                raise StateError(f"{field} must be one of {sorted(known)}, got {getattr(self, field)!r}")
        for field, low, high, closed in (("k", 0.0, 1.0, "(]"), ("p", 0.0, 1.0, "[)"), ("energy", 0.0, 1.0, "[]")):
            value = getattr(self, field)
            if not (low < value if closed[0] == "(" else low <= value) or not (value <= high if closed[1] == "]" else value < high):
                raise StateError(f"{field} must lie in {closed[0]}{low}, {high}{closed[1]}, got {value}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise StateError(f"alpha must be a finite positive number, got {self.alpha}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StateError(f"seed must be an integer, got {self.seed!r}")
        return self

    @property
    def scale(self) -> float:
        """What tau_star carries of alpha (1 for merges without it), divided out of a compact state's tasks."""
        return self.alpha if "alpha" in merging.MERGES[self.merge].params else 1.0

    def params(self) -> dict:
        return {name: getattr(self, name) for name in merging.MERGES[self.merge].params}

    @classmethod
    def of(cls, manifest: dict) -> "Settings":
        return cls(**manifest["settings"])


def check_lam(lam, rule: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise StateError(f"lam must be a number, got {lam!r}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0) or (rule == "random" and lam > 1):
        limit = "a density in [0, 1]" if rule == "random" else "a finite number >= 0"
        raise StateError(f"lam must be {limit}, got {lam}")
    return lam


# ---- fold, refit, remove ---------------------------------------------------------------------------


def fold(state_dir, finetuned, task: str, *, base=None, lam: float = 1.0, meta: dict | None = None, workers: int = 0,
         progress: bool = True, prefix_map=None, allow_extra: bool = False, shard_bytes: int | None = None,
         **settings) -> dict:
    """Folds one fine-tuned model into the state at `state_dir` as task `task`, refreshing every task's mask;
    returns the new manifest.

    finetuned: a transformers folder, a PEFT LoRA adapter folder, or a state dict {name: tensor}.
    base: theta0 as a transformers folder; required by the first fold, the recorded one after.
    settings: Settings fields (mode=, merge=, mask_rule=, alpha= ...); a new state starts from Settings().
    prefix_map [(base prefix, task prefix), ...] overrides the detected name map; allow_extra keeps the
    language-model tensors the base lacks as private; meta: anything to record with the task.
    """
    state_dir = Path(state_dir)
    _check_options(settings, lam)  # every number, before anything is written (a new state's folder included)
    early = None  # a new state's base and source, checked before its folder is made
    if _holds_no_state(state_dir):
        if base is None:
            raise StateError(f"{state_dir} holds no state yet: the first fold needs a base (--base)")
        store.check_new_task(None, task)
        early_base = _open_base(Path(base))
        early = early_base, open_source(finetuned, early_base, prefix_map, allow_extra)
    with store.lock(state_dir, create=True):
        manifest = store.read_manifest(state_dir)
        chosen = _settings(manifest, settings)
        lam = check_lam(lam, chosen.mask_rule)
        store.check_new_task(manifest, task)
        source = None
        if manifest is None:
            if base is None:
                raise StateError(f"{state_dir} holds no state yet: the first fold needs a base (--base)")
            base_ckpt, source = early if early is not None else (_open_base(Path(base)), None)
            manifest = _new_manifest(_base_reference(base_ckpt, state_dir), chosen, shard_bytes
                                     or max(p.stat().st_size for p in base_ckpt.files))
        else:
            store.verify(state_dir, manifest, full=False)
            base_ckpt = recorded_base(manifest, state_dir, given=base)
        if source is None:
            source = open_source(finetuned, base_ckpt, prefix_map, allow_extra)
        new_task = {"name": task, "source": _describe(finetuned), "kind": source.kind, "fingerprint": source.fingerprint(),
                    "name_map": source.name_map, "lam": lam, "meta": meta or {},
                    "dir": store.task_dir(len(manifest["tasks"]), task)}
        store.collect_garbage(state_dir, manifest)
        return Rebuild(state_dir, manifest, base_ckpt, chosen, manifest["tasks"] + [new_task], source,
                       workers=workers, progress=progress).run()


def refit(state_dir, *, lams=None, workers: int = 0, progress: bool = False, **settings) -> dict:
    """Recomputes tau_star and every mask from the kept task vectors with new settings (alpha, k, merge,
    mask_rule ...) or lam (a scalar, one per task, or {task: lam}); how hyperparameters are chosen on
    validation data. Exact states take any merge; sparse ones those that need only trimmed vectors."""
    state_dir = Path(state_dir)
    _check_options(settings, lams)
    with store.lock(state_dir):
        state = store.load(state_dir, full=False)
        manifest = state.manifest
        chosen = _settings(manifest, settings)
        if manifest["settings"]["mode"] == "compact":
            raise StateError("refit needs the task vectors: a compact state keeps only tau_star and the masks")
        tasks = [dict(t, lam=check_lam(lam, chosen.mask_rule)) for t, lam in zip(manifest["tasks"], _lams(manifest["tasks"], lams))]
        base = recorded_base(manifest, state_dir)
        store.collect_garbage(state_dir, manifest)
        return Rebuild(state_dir, manifest, base, chosen, tasks, None, workers=workers, progress=progress).run()


def remove(state_dir, task: str, *, workers: int = 0, progress: bool = False) -> dict:
    """Drops task `task` and refreshes every other task's mask (a compact state from their approximations;
    a running merge only in an exact state, by replaying the others in order)."""
    state_dir = Path(state_dir)
    with store.lock(state_dir):
        state = store.load(state_dir, full=False)
        manifest = state.manifest
        state.task(task)
        chosen = Settings.of(manifest)
        if merging.MERGES[chosen.merge].running and chosen.mode != "exact":
            raise StateError(f"merge '{chosen.merge}' folds each task into the running tau_star: only an exact state "
                             f"can replay the others without '{task}'")
        tasks = [t for t in manifest["tasks"] if t["name"] != task]
        if not tasks:
            raise StateError(f"'{task}' is the state's only task; delete the folder {state_dir} instead")
        base = recorded_base(manifest, state_dir)
        return Rebuild(state_dir, manifest, base, chosen, tasks, None, workers=workers, progress=progress).run()


def _check_options(changes: dict, lams) -> None:
    """The options of a fold or refit on their own (names known, numbers finite and in range), before any
    lock is taken or folder made; what depends on the state (its mode, its mask rule) is checked under the lock."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Settings)]}")
    dataclasses.replace(Settings(), **{n: v for n, v in changes.items() if v is not None}).check_values()
    values = [] if lams is None else list(lams.values()) if isinstance(lams, dict) else \
        [lams] if isinstance(lams, (int, float)) else list(lams)
    for lam in values:
        check_lam(lam, "mmer")


def _holds_no_state(state_dir: Path) -> bool:
    """A folder a fold would create a state in: missing, or a folder without a manifest."""
    try:
        return not state_dir.exists() or (state_dir.is_dir() and store.read_manifest(state_dir) is None)
    except StateError:
        return False  # a damaged manifest: the lock's checks name it


def _settings(manifest: dict | None, changes: dict) -> Settings:
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Settings)]}")
    changes = {name: value for name, value in changes.items() if value is not None}
    current = Settings() if manifest is None else Settings.of(manifest)
    chosen = dataclasses.replace(current, **changes).check()
    if manifest is not None:
        for field in FIXED:
            if getattr(chosen, field) != getattr(current, field):
                raise StateError(f"this state's {field} is {getattr(current, field)!r}; it cannot change to "
                                 f"{getattr(chosen, field)!r}")
        if chosen.mode == "sparse" and chosen.k > min((t["k_kept"] for t in manifest["tasks"]), default=1.0):
            raise StateError(f"a sparse state kept only each task's top {manifest['settings']['k']}; cannot trim at k={chosen.k}")
    return chosen


def _new_manifest(base: dict, settings: Settings, shard_bytes: int) -> dict:
    return {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "generation": 0, "base": base,
            "settings": dataclasses.asdict(settings), "shard_bytes": shard_bytes, "tasks": [], "tau_star_files": [],
            "files": {}}


def _lams(tasks: list[dict], lams) -> list[float]:
    if lams is None:
        return [task["lam"] for task in tasks]
    if isinstance(lams, (int, float)):
        return [float(lams)] * len(tasks)
    if isinstance(lams, dict):
        unknown = set(lams) - {task["name"] for task in tasks}
        if unknown:
            raise StateError(f"lam given for unknown tasks {sorted(unknown)}")
        return [float(lams.get(task["name"], task["lam"])) for task in tasks]
    lams = list(lams)
    if len(lams) != len(tasks):
        raise StateError(f"got {len(lams)} lam values for {len(tasks)} tasks")
    return lams


def _describe(finetuned) -> str:
    return "<state dict in memory>" if isinstance(finetuned, dict) or not isinstance(finetuned, (str, Path)) \
        else str(Path(finetuned).resolve())


# ---- the base ------------------------------------------------------------------------------------------


def _open_base(path: Path) -> Checkpoint:
    base = Checkpoint(path)
    if not base.names:
        raise CheckpointError(f"the base {path} has no tensors")
    return base


def _base_reference(base: Checkpoint, state_dir: Path) -> dict:
    """The base as the manifest records it: its path (relative when it lies inside the state, so that the
    state can move), layout digest, size. Its content (sha256 per weight file, "sha256") is added when the
    first fold commits, hashed while the fold runs (ContentCheck)."""
    folder = base.folder.resolve()
    try:
        path = str(folder.relative_to(state_dir.resolve()))
    except ValueError:
        path = str(folder)
    return {"path": path, "architectures": base.config.get("architectures"), "files": base.fingerprint(),
            "num_tensors": len(base.names), "num_params": sum(info.numel for info in base.info.values()),
            "bytes": sum(p.stat().st_size for p in base.files)}


def base_path(manifest: dict, state_dir: Path) -> Path:
    return (Path(state_dir) / manifest["base"]["path"]).resolve()


def _rebase_hint(state_dir: Path, new: str = "NEW_BASE") -> str:
    return f"mmer-cl rebase {state_dir} {new} (fold.rebase) re-points the state to a copy with the same content"


def _layout_differences(recorded: dict, found: dict, folder: Path) -> list[str]:
    """How a base's {file name: header digest} differs from the recorded one, file by file."""
    out = [f"{folder / name} is missing" for name in recorded if name not in found]
    out += [f"{folder / name} is not in the recorded base" for name in found if name not in recorded]
    out += [f"{folder / name} has other tensor names, shapes, dtypes or size" for name in recorded
            if name in found and found[name] != recorded[name]]
    return out


def recorded_base(manifest: dict, state_dir: Path, given=None) -> Checkpoint:
    """The state's base, opened, with the recorded layout (names, shapes, sizes per file). Its content is
    checked by ContentCheck, while it is read (fold, refit, export)."""
    state_dir = Path(state_dir)
    recorded = base_path(manifest, state_dir)
    if given is not None and Path(given).resolve() != recorded:
        raise StateError(f"this state's base is {recorded}, not {Path(given).resolve()}; if that is a copy of it "
                         f"(the base moved), {_rebase_hint(state_dir, str(given))}")
    if not recorded.is_dir():
        raise StateError(f"the base {recorded} this state was built on is missing (moved or deleted?); "
                         f"{_rebase_hint(state_dir)}")
    base = _open_base(recorded)
    differ = _layout_differences(manifest["base"]["files"], base.fingerprint(), recorded)
    if differ:
        raise StateError(f"the base {recorded} differs from the one this state was built on: {differ[0]}"
                         + (f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""))
    return base


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


def rebase(state_dir, new_base) -> dict:
    """Re-points the state at `state_dir` to `new_base`, a copy of its base elsewhere (the base or the state
    moved): the copy must have the recorded files, layout and content (sha256 per file); otherwise a
    StateError naming the file that differs, and the state unchanged. Under the writer lock; the new
    manifest is committed atomically. Returns it."""
    state_dir = Path(state_dir)
    with store.lock(state_dir):
        manifest = store.read_manifest(state_dir)
        if manifest is None:
            raise StateError(f"{state_dir} holds no mmer-cl state ({store.MANIFEST} not found)")
        new = _open_base(Path(new_base))
        differ = _layout_differences(manifest["base"]["files"], new.fingerprint(), new.folder)
        if differ:
            raise StateError(f"cannot rebase {state_dir} onto {new.folder}: it is not the base this state was "
                             f"built on: {differ[0]}" + (f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""))
        expected = manifest["base"].get("sha256")
        if expected is None:  # a state from before content hashes: the old base, if still there, tells
            old = base_path(manifest, state_dir)
            if not old.is_dir():
                raise StateError(f"cannot rebase {state_dir}: it records no sha256 of its base (written by an "
                                 f"older version) and the old base {old} is gone, so {new.folder} cannot be checked")
            expected = ContentCheck(recorded_base(manifest, state_dir)).result()
        digests = ContentCheck(new).result()
        differ = [name for name in expected if digests.get(name) != expected[name]]
        if differ:
            raise StateError(f"cannot rebase {state_dir} onto {new.folder}: {new.folder / differ[0]} differs from "
                             f"the base this state was built on (its sha256; same tensor names and shapes, other "
                             f"values)" + (f"; {len(differ) - 1} more files differ" if len(differ) > 1 else ""))
        reference = dict(_base_reference(new, state_dir), sha256=digests)
        manifest = dict(manifest, base=reference, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.commit(state_dir, manifest)
        return manifest


# ---- one rebuild: a new generation of tau_star and masks ----------------------------------------------


class Rebuild:
    """tau_star and every task's mask for `tasks` (the state's, with at most one new one from `source`),
    written as the state's next generation and committed. With no source it refits (or removes the
    state's tasks that `tasks` leaves out)."""

    def __init__(self, state_dir: Path, manifest: dict, base: Checkpoint, settings: Settings, tasks: list[dict],
                 source=None, *, workers: int = 0, progress: bool = True):
        self.dir, self.manifest, self.base, self.settings = state_dir, manifest, base, settings
        self.tasks, self.source, self.workers, self.progress = [dict(t) for t in tasks], source, workers, progress
        self.merge, self.rule = merging.MERGES[settings.merge], merging.MASK_RULES[settings.mask_rule]
        self.mode = modes.of(settings.mode)
        state = self.state = store.State(state_dir, manifest)
        old = Settings.of(manifest) if manifest["tasks"] else settings
        by_name = {t["name"]: t for t in manifest["tasks"]}
        stored = [t for t in self.tasks if t["name"] in by_name]
        self.readers = [modes.of(old.mode).reader(state, by_name[t["name"]], old.scale) for t in stored]
        if source is not None:
            self.readers.append(source.tau)
        self.replay = self.merge.running and source is None  # a refit or remove replays the tasks in order
        self.tau_star_old = state.tau_star() if self.merge.running and not self.replay and stored else None
        # What this rebuild reads of the state, checked against the manifest's sha256 while it runs.
        read = [f for t in stored for f in (by_name[t["name"]]["mask_files"] + manifest["tau_star_files"]
                                            if old.mode == "compact" else by_name[t["name"]]["vector_files"])]
        read += manifest["tau_star_files"] if self.tau_star_old is not None else []
        self.read_files = list(dict.fromkeys(read))
        self.whole = not self.merge.elementwise or (self.merge.running and self.merge.trim)
        self.lams = torch.tensor([t["lam"] for t in self.tasks], dtype=torch.float32).reshape(-1, 1)
        self.params = settings.params()
        self.fused = kernels.FUSED.get((self.merge.fn, self.rule.fn)) if not self.merge.drop else None
        self.known = [t.get("thresholds", {}).get("values", {}) if t.get("thresholds", {}).get("k") == settings.k
                      and settings.mode != "compact" else {} for t in self.tasks]
        self.found: dict[str, list] = {}
        T = len(self.tasks)
        self.abs_means, self.masked_means = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
        self.tau_star_sq, self.new_sq, self.new_nonzero = 0.0, 0.0, False
        self.global_thresholds = None

    # -- the chunk loop --

    def run(self) -> dict:
        generation = self.manifest["generation"] + 1
        gen_rel = store.generation_dir(generation)
        staged = self.staged = []
        # The state files this rebuild reads and the base, hashed beside the work; checked before anything
        # is published, so a corrupt state or a base changed in place is refused and the state left as it was.
        check = ContentCheck(self.base, self.manifest["base"].get("sha256"), self.state, self.read_files)
        try:
            gen_dir = store.stage(self.dir, gen_rel)
            staged.append(gen_dir)
            self._open_writers(gen_dir)
            if self.settings.trim == "global" and self.merge.trim and not self.merge.running:
                self.global_thresholds = [self._global_threshold(t) for t in range(len(self.tasks))]
            self._stream()
            files = self._close_writers(gen_dir, gen_rel)
            if self.source is not None:
                files.update(self._write_task_files())
            base_sha256 = check.result()
        except BaseException as error:
            for folder in staged:  # a failed fold leaves the state as it was: drop what it staged
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(error, Exception) and not isinstance(error, ContentError):
                found = check.failure()  # a corrupt file may be what made the work fail: say so
                if found is not None:
                    raise found from error
            check.cancel()
            raise
        return self._commit(staged, generation, files, base_sha256)

    def _stream(self) -> None:
        pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
        pending: deque = deque()
        label = f"fold {self.tasks[-1]['name']}" if self.source is not None else "refit"
        bar = tqdm(total=sum(i.numel for i in self.base.info.values()), desc=label, unit="param", unit_scale=True,
                   disable=not self.progress)
        try:
            for name, start, stop, thresholds in self._units():
                if pool:
                    pending.append(((name, start, stop), pool.submit(self._compute, name, start, stop, thresholds)))
                    while len(pending) > 2 * self.workers:
                        key, future = pending.popleft()
                        self._write(*key, future.result(), bar)
                else:
                    self._write(name, start, stop, self._compute(name, start, stop, thresholds), bar)
            while pending:
                key, future = pending.popleft()
                self._write(*key, future.result(), bar)
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
        finally:
            if pool:
                pool.shutdown(wait=True)
            bar.close()
        if self.source is not None and not self.new_nonzero:
            raise CheckpointError(f"the task vector of '{self.tasks[-1]['name']}' ({self.tasks[-1]['source']}) is zero "
                                  f"in every shared tensor: is it the base itself?")

    def _units(self):
        """(name, start, stop, thresholds) per chunk; a tensor in several chunks has its rows' trim thresholds
        found first, in this thread (None: found within the chunk)."""
        for name in self.base.names:
            numel = self.base.info[name].numel
            step = numel if self.whole else max(8, CHUNK_ELEMENTS // len(self.tasks) // 8 * 8)
            ranges = [(start, min(start + step, numel)) for start in range(0, numel, max(step, 1))] or [(0, 0)]
            thresholds = self._thresholds(name, ranges)
            for start, stop in ranges:
                yield name, start, stop, thresholds

    def _thresholds(self, name: str, ranges) -> list:
        """Each task row's top-k magnitude threshold over tensor `name`, where a trim needs it: the merge's
        (batch merges with trim; of the dropped rows for DARE) and a sparse state's for the new row."""
        T = len(self.tasks)
        wanted = set(range(T)) if self.merge.trim and not self.merge.running else set()
        if self.source is not None and self.settings.mode == "sparse":
            wanted.add(T - 1)
        if self.global_thresholds is not None:
            return list(self.global_thresholds)
        out = [None] * T
        for t in sorted(wanted):
            cached = None if self.merge.drop else self.known[t].get(name)
            if cached is not None:
                out[t] = cached
            elif len(ranges) > 1:
                numel = self.base.info[name].numel
                if numel <= WHOLE_THRESHOLD_ELEMENTS:  # one task's whole tensor fits: read it once
                    whole = self._row(t, name, 0, numel, drop=self.merge.drop)
                    chunks = lambda: [whole]  # noqa: E731
                else:
                    chunks = lambda t=t: (self._row(t, name, a, b, drop=self.merge.drop) for a, b in ranges)  # noqa: E731
                out[t] = kernels.kth_largest_magnitude(chunks, merging.kept_count(self.settings.k, numel))
        return out

    def _global_threshold(self, t: int) -> float:
        """Task t's magnitude threshold over all its shared entries (trim='global'), streamed."""
        total = sum(info.numel for info in self.base.info.values())

        def chunks():
            for name in self.base.names:
                numel = self.base.info[name].numel
                for start in range(0, numel, CHUNK_ELEMENTS):
                    yield self._row(t, name, start, min(start + CHUNK_ELEMENTS, numel), drop=self.merge.drop)

        return kernels.kth_largest_magnitude(chunks, merging.kept_count(self.settings.k, total))

    def _row(self, t: int, name: str, start: int, stop: int, drop: bool = False, out: Tensor | None = None) -> Tensor:
        """Task t's vector over flat elements [start, stop) of tensor `name`, DARE-dropped if `drop`."""
        tau = self.readers[t](name, start, stop, out)
        return merging.dare(tau, self.settings.p, self._draws("dare", t, name, start, stop)) if drop else tau

    # -- one chunk --

    def _compute(self, name: str, start: int, stop: int, thresholds: list):
        """One chunk: (tau_star, packed masks, masks, taus, thresholds); taus holds the rows the merge and mask
        rule need (every task, or the new one alone for a running merge without masks)."""
        T = len(self.tasks)
        need_all = not self.merge.running or self.replay or self.rule.fn is not None
        taus = torch.empty(T, stop - start)
        for t in (range(T) if need_all else [T - 1]):
            self._row(t, name, start, stop, out=taus[t])
        rows = taus
        if self.merge.drop:
            rows = torch.stack([merging.dare(taus[t], self.settings.p, self._draws("dare", t, name, start, stop))
                                for t in range(T)])
        kept = merging.kept_count(self.settings.k, self.base.info[name].numel)
        thresholds = [kernels.kth_largest_magnitude(lambda r=rows[t]: [r], kept) if thr is None and t in self._trimmed_rows()
                      else thr for t, thr in enumerate(thresholds)]
        if self.fused is not None and not self.whole:
            tau_star, packed = self.fused(taus, thresholds, self.params, self.lams.flatten().tolist())
            return tau_star, packed, None, taus, thresholds
        tau_star = self._merge(name, start, stop, rows, thresholds)
        masks = self._masks(name, start, stop, taus, tau_star)
        packed = None if masks is None else torch.stack([merging.pack_mask(m) for m in masks])
        return tau_star, packed, masks, taus, thresholds

    def _trimmed_rows(self) -> set:
        """Rows whose per-tensor trim threshold a chunk needs: every task's for a batch merge with trim, the
        new task's in a sparse state (what it keeps)."""
        T = len(self.tasks)
        rows = set(range(T)) if self.merge.trim and not self.merge.running else set()
        return rows | ({T - 1} if self.source is not None and self.settings.mode == "sparse" else set())

    def _draws(self, kind: str, t: int, name: str, start: int, stop: int) -> Tensor:
        return merging.uniform(self.settings.seed, f"{kind}/{self.tasks[t]['name']}/{name}", start, stop)

    def _merge(self, name: str, start: int, stop: int, rows: Tensor, thresholds: list) -> Tensor:
        """tau_star of one chunk by the registry's function; a running merge folds into tau_star_old (or,
        refitting, folds every stored task in again, in order)."""
        shape = self.base.info[name].shape if self.whole else (stop - start,)
        if not self.merge.running:
            return self._call(rows, thresholds, name, shape)
        if self.replay:
            merged = None
            for t in range(len(rows)):
                step = rows[t:t + 1] if merged is None else torch.stack([merged, rows[t]])
                merged = self._call(step, self._step_thresholds(step), name, shape)
            return merged
        step = rows[-1:] if self.tau_star_old is None else torch.stack([self.tau_star_old.read(name, start, stop), rows[-1]])
        return self._call(step, self._step_thresholds(step), name, shape)

    def _step_thresholds(self, rows: Tensor):
        """A running merge's trim thresholds, of its rows (whole tensors: `whole` holds for running trims)."""
        if not self.merge.trim:
            return None
        return [kernels.kth_largest_magnitude(lambda r=r: [r], merging.kept_count(self.settings.k, r.numel())) for r in rows]

    def _call(self, rows: Tensor, thresholds, name: str, shape) -> Tensor:
        kwargs = dict(self.params)
        if self.merge.trim:
            kwargs["thresholds"] = thresholds
        if not self.merge.elementwise:
            kwargs["name"] = name
            rows = rows.reshape(len(rows), *shape)
        return self.merge.fn(rows, **kwargs).reshape(-1).float()

    def _masks(self, name: str, start: int, stop: int, taus: Tensor, tau_star: Tensor) -> Tensor | None:
        if self.rule.fn is None:
            return None
        if self.rule.random:
            draws = torch.stack([self._draws("mask", t, name, start, stop) for t in range(len(self.tasks))])
            return self.rule.fn(taus, tau_star, self.lams, draws)
        return self.rule.fn(taus, tau_star, self.lams)

    # -- writing --

    def _open_writers(self, gen_dir: Path) -> None:
        shard_bytes = self.manifest["shard_bytes"]
        self.plan_f32 = [(n, torch.float32, self.base.info[n].shape) for n in self.base.names]
        self.tau_star_writer = PlannedWriter(gen_dir, "tau_star", shard_bytes, self.plan_f32)
        mask_plan = [(n, torch.uint8, (math.ceil(self.base.info[n].numel / 8),)) for n in self.base.names]
        self.mask_writers = [PlannedWriter(gen_dir, f"mask.{i:03d}", shard_bytes, mask_plan)
                             for i in range(len(self.tasks))] if self.rule.fn is not None else []
        self.vector_writer = None
        if self.source is not None:
            self.task_stage = store.stage(self.dir, self.tasks[-1]["dir"])
            self.staged.append(self.task_stage)
            self.vector_writer = self.mode.writer(self.task_stage, self.plan_f32, shard_bytes)

    def _write(self, name: str, start: int, stop: int, result, bar) -> None:
        tau_star, packed, masks, taus, thresholds = result
        self.found[name] = thresholds
        if not bool(torch.isfinite(tau_star).all()):
            raise StateError(f"tensor '{name}': the merged vector tau_star has NaN or Inf entries "
                             f"(settings {self.settings}); nothing was written")
        numel = self.base.info[name].numel
        if stop > start:  # a tensor with no elements has no chunk to write
            self.tau_star_writer.write(name, tau_star)
            for writer, p in zip(self.mask_writers, packed if packed is not None else []):
                writer.write(name, p)
        self.tau_star_sq += float(torch.dot(tau_star, tau_star))
        if self.rule.rescale:
            self.abs_means += taus.abs().double().sum(dim=1) / max(numel, 1)
            self.masked_means += (masks * tau_star).abs().double().sum(dim=1) / max(numel, 1)
        if self.source is not None:
            new = taus[-1]
            self.new_nonzero = self.new_nonzero or bool(new.any())
            self.new_sq += float(torch.dot(new, new))
            self.mode.encode(self.vector_writer, name, start, stop, numel, new, thresholds[-1])
        bar.update(stop - start)
        if stop == numel:
            store.crash_point(f"tensor-{self.base.names.index(name) + 1}")

    def _close_writers(self, gen_dir: Path, gen_rel: str) -> dict:
        kept = [f for t in self.tasks if t["name"] in {o["name"] for o in self.manifest["tasks"]}
                for key in ("vector_files", "private_files", "config_files") for f in t[key]]
        files = {f: self.manifest["files"][f] for f in kept}
        files.update(store.file_entries(gen_dir, gen_rel, self.tau_star_writer.close()))
        self.tau_star_files = [f"{gen_rel}/{f}" for f in self.tau_star_writer.files]
        for task, writer in zip(self.tasks, self.mask_writers or [None] * len(self.tasks)):
            task["mask_files"] = [] if writer is None else [f"{gen_rel}/{f}" for f in writer.close()]
            if writer is not None:
                files.update(store.file_entries(gen_dir, gen_rel, writer.files))
        return files

    def _write_task_files(self) -> dict:
        """The new task's kept vector (already streamed), private parameters and config files."""
        task, folder, source = self.tasks[-1], self.task_stage, self.source
        digests = {"vector_files": self.vector_writer.close() if self.vector_writer is not None else {}}
        digests["private_files"] = {}
        if source.private_names:
            plan = [(name, *source.private_info(name)) for name in source.private_names]
            writer = PlannedWriter(folder, "private", self.manifest["shard_bytes"], plan)
            for name, _, shape in tqdm(plan, desc="private parameters", unit="tensor", disable=not self.progress):
                numel = math.prod(shape)
                for start in range(0, numel, CHUNK_ELEMENTS):
                    chunk = source.private(name, start, min(start + CHUNK_ELEMENTS, numel))
                    merging.check_finite(chunk, name, f"(private, in {source.folder or 'the model given'})")
                    writer.write(name, chunk)
            digests["private_files"] = writer.close()
        (folder / "files").mkdir()
        config_source = source.folder if source.kind == "model" and source.folder is not None else None
        copied = copy_small_files(config_source, folder / "files") if config_source else []
        digests["config_files"] = {f"files/{name}": sha256_file(folder / "files" / name) for name in copied}
        files = {}
        for key, entries in digests.items():
            task[key] = [f"{task['dir']}/{f}" for f in entries]
            files.update(store.file_entries(folder, task["dir"], entries))
        return files

    def _commit(self, staged: list, generation: int, files: dict, base_sha256: dict) -> dict:
        T = len(self.tasks)
        if self.source is not None:
            self.tasks[-1]["norm"] = math.sqrt(self.new_sq)
        rescale = merging.emr_rescalers(self.abs_means, self.masked_means) if self.rule.rescale else torch.ones(T)
        factor = 1.0
        if self.merge.normalize and self.tau_star_sq > 0:
            factor = sum(t["norm"] for t in self.tasks) / T / math.sqrt(self.tau_star_sq)
        for t, task in enumerate(self.tasks):
            task["scale"] = float(rescale[t]) * factor
            if self.settings.mode != "compact":
                values = {n: thr[t] for n, thr in self.found.items() if thr[t] is not None} if not self.merge.drop else {}
                if values and len(values) == len(self.base.names):  # an empty tensor's (inf) is not JSON: found again
                    task["thresholds"] = {"k": self.settings.k,
                                          "values": {n: v for n, v in values.items() if math.isfinite(v)}}
            task.setdefault("k_kept", self.settings.k)
        base = dict(self.manifest["base"])
        base.setdefault("sha256", base_sha256)  # recorded by the first fold (or the first since hashes exist)
        manifest = dict(self.manifest, generation=generation, base=base, settings=dataclasses.asdict(self.settings),
                        tasks=self.tasks, tau_star_files=self.tau_star_files, tau_star_norm=math.sqrt(self.tau_star_sq),
                        files=files, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            store.encode_manifest(self.dir, manifest)  # standard JSON, or refused before anything is published
        except BaseException:
            for folder in staged:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        store.crash_point("staged")
        for folder in staged:  # the partial folders become final; the old manifest still names only old files
            store.publish(folder)
        if self.source is not None:
            fsync_dir(self.dir / "tasks")
        store.crash_point("published")
        store.commit(self.dir, manifest)
        store.crash_point("committed")
        store.collect_garbage(self.dir, manifest)
        return manifest
