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
import time
from pathlib import Path

from mmer_cl import merging, store
from mmer_cl.checkpoints import Checkpoint, CheckpointError
from mmer_cl.integrity import ContentCheck
from mmer_cl.rebuild import Rebuild
from mmer_cl.settings import FIXED, Settings, check_lam
from mmer_cl.sources import open_source
from mmer_cl.store import StateError

__all__ = ["Settings", "check_lam", "fold", "refit", "remove", "rebase", "recorded_base", "base_path"]


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


