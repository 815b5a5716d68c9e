"""A state's decoupled models theta_hat_t = theta0 + r_t * m_t * tau_star (plus task t's private parameters):
as a state dict, exported as a transformers folder, or switched live inside a loaded model.

Shared tensors that are not floating point (integer buffers) are never merged: they are theta0's, copied
exactly. Every float tensor goes through kernels.decouple_into, merging.decouple's bits.
"""

import shutil
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmer_cl import fold, integrity, kernels, store
from mmer_cl.checkpoints import Checkpoint, PlannedWriter
from mmer_cl.sources import map_name
from mmer_cl.store import StateError


def open_base(state: store.State) -> Checkpoint:
    """The state's theta0, checked against the layout the manifest recorded (its content is checked by
    integrity.ContentCheck while it is read)."""
    return fold.recorded_base(state.manifest, state.dir)


def decouple_tensor(out: Tensor, theta0: Tensor, tau_star: Tensor, packed: Tensor | None, scale: float) -> Tensor:
    """out <- theta0 + scale * m * tau_star for a float tensor, theta0 itself otherwise."""
    if not out.is_floating_point():
        return out.copy_(theta0.reshape(out.shape))
    kernels.decouple_into(out, theta0, tau_star, packed, scale)
    return out


def decoupled_tensors(state: store.State, task: dict, base: Checkpoint):
    """(task-model name, tensor) for every shared tensor of task `task`, then its private ones; one at a time."""
    tau_star, masks = state.tau_star(), state.masks(task)
    for name in base.names:
        weights = torch.empty(base.info[name].shape, dtype=base.info[name].dtype)
        packed = masks.read(name) if masks is not None else None
        decouple_tensor(weights, base.read(name), tau_star.read(name), packed, task["scale"])
        yield map_name(name, task["name_map"]), weights
    private = state.private(task)
    for name in private.names if private is not None else []:
        yield name, private.read(name)


def decoupled_state_dict(state_dir, task: str) -> dict[str, Tensor]:
    """Task `task`'s model as a state dict: theta0 + r * m * tau_star, plus its private parameters; the
    base's content checked against the recorded sha256 while it is read."""
    state = store.load(state_dir)
    base = open_base(state)
    check = integrity.ContentCheck(base, state.manifest["base"].get("sha256"))
    try:
        tensors = dict(decoupled_tensors(state, state.task(task), base))
    except BaseException:
        check.cancel()
        raise
    check.result()
    return tensors


def export(state_dir, task: str, out_dir, *, force: bool = False, progress: bool = True) -> Path:
    """Writes task `task`'s decoupled model as a transformers folder (its config files, sharded safetensors
    and index) that `from_pretrained` loads: built in `<out_dir>.partial`, then renamed into place. An
    existing non-empty `out_dir` is refused unless `force`, which replaces it. The state is checked whole
    (store.load), the base's content while it is read (before anything is renamed into place); a stale
    `<out_dir>.partial` of an export that died is removed first, and a failed export removes its own."""
    state = store.load(state_dir)
    entry, base = state.task(task), open_base(state)
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise StateError(f"export target {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise StateError(f"export target {out_dir} exists and is not empty (force=True, --force, replaces it)")
    staging = out_dir.with_name(out_dir.name + ".partial")
    _remove(staging)  # a stale one from an export that died: none of its files may end up in out_dir
    try:
        staging.mkdir(parents=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise StateError(f"export target {out_dir}: cannot create {staging} ({error.strerror})") from None
    check = integrity.ContentCheck(base, state.manifest["base"].get("sha256"))
    try:
        _write_model(state, entry, base, staging, progress)
        check.result()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        check.cancel()
        _remove(staging)
        raise
    return out_dir


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_model(state: store.State, entry: dict, base: Checkpoint, folder: Path, progress: bool) -> None:
    plan = [(map_name(n, entry["name_map"]), base.info[n].dtype, base.info[n].shape) for n in base.names]
    private = state.private(entry)
    if private is not None:
        plan += [(n, private.info[n].dtype, private.info[n].shape) for n in private.names]
    writer = PlannedWriter(folder, "model", state.manifest["shard_bytes"], plan)
    for name, tensor in tqdm(decoupled_tensors(state, entry, base), total=len(plan), desc=f"export {entry['name']}",
                             unit="tensor", disable=not progress):
        if tensor.numel():  # the writer records a tensor with no elements itself, as it comes up in the plan
            writer.write(name, tensor.reshape(-1))
    writer.close()
    if len(writer.files) > 1:
        writer.write_index()
    else:
        (folder / next(iter(writer.files))).rename(folder / "model.safetensors")
    for relpath in entry["config_files"]:
        (folder / Path(relpath).name).write_bytes(state.read_bytes(relpath))


class TaskSwitcher:
    """Moves a loaded model between tasks in place, without a reload or a second copy of the weights: every
    shared tensor becomes theta0 + r * m_task * tau_star, computed straight into the parameter, reading
    theta0 and tau_star memory-mapped from the base and the state; the task's private parameters are copied
    in, and the model must have them. `to_base()` puts theta0 back (for a task not folded yet)."""

    def __init__(self, model: torch.nn.Module, state_dir):
        self.state = store.load(state_dir)  # every file opened: later folds take nothing away from this switcher
        self.base = open_base(self.state)
        integrity.check_base(self.state.manifest, self.base)
        self.tau_star = self.state.tau_star()
        self.tensors = model.state_dict(keep_vars=True)
        self.current: str | None = None

    def _targets(self, name_map: list, label: str) -> list[tuple[str, Tensor]]:
        targets = []
        for name in self.base.names:
            mine = map_name(name, name_map)
            if mine not in self.tensors:
                raise StateError(f"the model has no tensor '{mine}' (base '{name}') for {label}")
            targets.append((name, self.tensors[mine]))
        return targets

    @torch.no_grad()
    def switch(self, task: str) -> None:
        entry = self.state.task(task)
        masks, private = self.state.masks(entry), self.state.private(entry)
        targets = self._targets(entry["name_map"], f"task '{task}'")
        for name in private.names if private is not None else []:
            if name not in self.tensors or self.tensors[name].shape != private.info[name].shape:
                raise StateError(f"the model has no tensor '{name}' of shape {private.info[name].shape}, private to "
                                 f"task '{task}'")
        for name, target in targets:
            packed = masks.view(name) if masks is not None else None
            decouple_tensor(target.data, self.base.view(name), self.tau_star.view(name), packed, entry["scale"])
        for name in private.names if private is not None else []:
            self.tensors[name].copy_(private.read(name))
        self.current = task

    @torch.no_grad()
    def to_base(self, name_map=()) -> None:
        for name, target in self._targets(list(name_map), "theta0"):
            target.data.copy_(self.base.view(name))
        self.current = None


COMBINATIONS = ("union", "merged")


def combined_state_dict(state_dir, tasks, kind: str) -> dict[str, Tensor]:
    """The shared weights for an input that carries the modalities of several `tasks` (SPEC): `union` =
    theta0 + (m_1 | ... | m_K) * tau_star, the tasks' packed masks OR-ed byte by byte; `merged` = theta0 +
    tau_star. Named as the first task's model names them; no private parameters (each part of the input keeps
    its own task's)."""
    if kind not in COMBINATIONS:
        raise ValueError(f"kind must be one of {COMBINATIONS}, got {kind!r}")
    state = store.load(state_dir)
    entries = [state.task(task) for task in tasks]
    if kind == "union" and len({entry["scale"] for entry in entries}) > 1:
        raise StateError(f"a union of masks needs one scale; tasks {list(tasks)} have {[e['scale'] for e in entries]}")
    masks = [state.masks(entry) for entry in entries] if kind == "union" else []
    if any(m is None for m in masks):
        raise StateError(f"the state keeps no masks (mask rule {state.manifest['settings']['mask_rule']!r}): no union")
    base, tau_star = open_base(state), state.tau_star()
    scale = entries[0]["scale"] if kind == "union" else 1.0
    out = {}
    for name in base.names:
        weights = torch.empty(base.info[name].shape, dtype=base.info[name].dtype)
        packed = None
        if masks:
            packed = masks[0].read(name).clone()
            for other in masks[1:]:
                packed |= other.read(name)
        out[map_name(name, entries[0]["name_map"])] = decouple_tensor(weights, base.read(name), tau_star.read(name),
                                                                      packed, scale)
    return out
