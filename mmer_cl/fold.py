"""Streaming folds of fine-tuned checkpoints into an MMER state, export, live task switching, `mmer-cl fold`.

A fold walks the base's tensors one at a time, in flat chunks of a bounded number of elements, and for
each reads the same slice of every source lazily (SPEC, "Continual"):
    old tau_i  = exact: the stored tau_i; sparse: the stored trim_k(tau_i); compact: m_i * tau_star_old / alpha_old
    new tau_T  = theta_T - theta0          (or scaling * B @ A for a LoRA adapter)
    tau_star   = alpha * TIES_k(tau_1..tau_T),   m_i = 1[|tau_i| >= lam_i * |tau_i - tau_star|] for every i
(merging.mmer). In compact mode m_i * tau_star_old carries alpha_old, so it is divided out before the new
TIES scales by alpha once. A tensor larger than one chunk is trimmed at its exact k-th largest magnitude,
found by a two-pass histogram over the float bits, so chunking changes no result. Exact and sparse states
keep each task's thresholds in the manifest, so a fold finds them for the new task only. The per-entry
work runs in mmer_cl.kernels' fused loops, bit-identical to merging.py.

Shared parameters are the base's names; a task's model may name them differently (LLaVA and Qwen2-Audio
folders store the language model as `language_model.model.*` and `language_model.lm_head.*`, the plain
Llama/Qwen2 base as `model.*` and `lm_head.*`): the name map is a list of (base prefix, task prefix) rules,
detected among the known layouts or given with `--prefix-map`. Everything else in the task's model (vision
or audio tower, projector, heads) is that task's private parameters.
"""

import argparse
import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmer_cl import kernels, merging, metrics, store
from mmer_cl.checkpoints import (
    Checkpoint, CheckpointError, LoraAdapter, ShardWriter, copy_small_files, fsync_dir, header_digest,
    is_lora_adapter, sha256_file,
)
from mmer_cl.store import StateError

CHUNK_ELEMENTS = 1 << 23  # elements of the [T, chunk] stack processed at once, whatever T
WHOLE_THRESHOLD_ELEMENTS = 1 << 25  # larger tensors find their trim threshold by a streamed histogram
KNOWN_NAME_MAPS = ([], [["", "language_model."]], [["model.", "model.language_model."]])
TRIMS = ("tensor", "global")


# ---- names ------------------------------------------------------------------------------------------


def map_name(name: str, rules: list[list[str]]) -> str:
    """The task-model name of base tensor `name`: the first rule whose base prefix matches rewrites it."""
    for base_prefix, task_prefix in rules:
        if name.startswith(base_prefix):
            return task_prefix + name[len(base_prefix):]
    return name


def detect_name_map(base: Checkpoint, finetuned: Checkpoint, given: list[list[str]] | None = None) -> list[list[str]]:
    candidates = [given] if given is not None else KNOWN_NAME_MAPS
    for rules in candidates:
        if all(map_name(name, rules) in finetuned for name in base.names):
            return rules
    rules = candidates[0]
    missing = [name for name in base.names if map_name(name, rules) not in finetuned]
    arch = base.config.get("architectures"), finetuned.config.get("architectures")
    raise CheckpointError(
        f"{finetuned.folder} lacks {len(missing)} of the base's {len(base.names)} tensors "
        f"(e.g. '{map_name(missing[0], rules)}'): a different architecture (base {arch[0]}, fine-tuned {arch[1]})? "
        f"Tried name maps {list(candidates)}; give --prefix-map BASE_PREFIX=TASK_PREFIX if the names differ."
    )


def _check_architecture(base: Checkpoint, finetuned: Checkpoint) -> None:
    """The fine-tuned model's language model must be the base's kind (a multimodal config names it in
    text_config); same-shaped tensors of another architecture would otherwise merge silently."""
    base_type = base.config.get("model_type")
    config = finetuned.config
    their_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
    if base_type and their_type and base_type != their_type:
        raise CheckpointError(
            f"different architecture: {finetuned.folder} is a {their_type} model "
            f"({config.get('architectures')}), the base {base.folder} a {base_type} one"
        )


# ---- sources of task vectors ----------------------------------------------------------------------


class _ModelSource:
    """tau = theta_T - theta0 from a transformers folder; its other tensors are private."""

    def __init__(self, folder: Path, base: Checkpoint, prefix_map):
        self.folder = Path(folder)
        self.model = Checkpoint(folder)
        self.kind = "model"
        _check_architecture(base, self.model)
        self.name_map = detect_name_map(base, self.model, prefix_map)
        for name in base.names:
            mine = self.model.info[map_name(name, self.name_map)]
            theirs = base.info[name]
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise CheckpointError(
                    f"tensor '{name}': {mine.dtype} {mine.shape} in {mine.file}, {theirs.dtype} {theirs.shape} in the base {theirs.file}"
                )
        shared = {map_name(name, self.name_map) for name in base.names}
        self.private_names = [name for name in self.model.names if name not in shared]

    def tau(self, base: Checkpoint, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        mine = map_name(name, self.name_map)
        try:
            return kernels.task_vector(base.read(name, start, stop), self.model.read(mine, start, stop), name, out)
        except ValueError as error:
            raise CheckpointError(f"{error} (fine-tuned file {self.model.info[mine].file})") from None

    def private(self, name: str, start: int, stop: int) -> Tensor:
        return self.model.read(name, start, stop)

    def private_info(self, name: str):
        return self.model.info[name].dtype, self.model.info[name].shape

    def fingerprint(self) -> dict:
        return {p.name: header_digest(p) for p in self.model.files}


class _LoraSource:
    def __init__(self, folder: Path, base: Checkpoint):
        self.folder = Path(folder)
        self.adapter = LoraAdapter(folder, base)
        self.kind = "lora"
        self.name_map = []
        self.private_names = list(self.adapter.private)

    def tau(self, base: Checkpoint, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return _into(out, self.adapter.tau(name, base, start, stop))

    def private(self, name: str, start: int, stop: int) -> Tensor:
        return self.adapter.private[name].reshape(-1)[start:stop]

    def private_info(self, name: str):
        return self.adapter.private[name].dtype, tuple(self.adapter.private[name].shape)

    def fingerprint(self) -> dict:
        return {p.name: sha256_file(p) for p in sorted(self.folder.iterdir()) if p.is_file()}


class _StoredTask:
    """An old task's vector as this state's mode keeps it."""

    def __init__(self, state: store.State, task: dict, tau_star_old: Checkpoint | None):
        self.entry = task
        self.mode = state.manifest["mode"]
        self.vectors = state.vectors(task) if self.mode != "compact" else None
        self.masks = state.masks(task) if self.mode == "compact" else None
        self.tau_star_old = tau_star_old
        self.alpha_old = state.manifest["alpha"]
        self._sparse: tuple[str, Tensor, Tensor] | None = None

    def tau(self, base: Checkpoint, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        if self.mode == "exact":
            return self.vectors.read(name, start, stop, out)
        if self.mode == "sparse":
            cached = self._sparse  # one local reference: worker threads may replace the cache meanwhile
            if cached is None or cached[0] != name:
                cached = self._sparse = (name, self.vectors.read(f"{name}::index"), self.vectors.read(f"{name}::value"))
            _, index, value = cached
            lo, hi = torch.searchsorted(index, torch.tensor([start, stop])).tolist()
            dense = torch.zeros(stop - start) if out is None else out.zero_()
            dense[index[lo:hi] - start] = value[lo:hi]
            return dense
        mask = _read_mask(self.masks, name, start, stop)
        return _into(out, mask * self.tau_star_old.read(name, start, stop) / self.alpha_old)


def _into(out: Tensor | None, tensor: Tensor) -> Tensor:
    return tensor if out is None else out.copy_(tensor)


def _read_mask(masks: Checkpoint, name: str, start: int, stop: int) -> Tensor:
    """Flat mask elements [start, stop) of a bit-packed mask; start is a multiple of 8."""
    packed = masks.read(name, start // 8, math.ceil(stop / 8))
    return merging.unpack_mask(packed, (stop - start,))


# ---- exact k-th largest magnitude, streamed ---------------------------------------------------------


def kth_largest_magnitude(chunks, n_keep: int) -> float:
    """The n_keep-th largest |x| over all chunks (an iterable factory, called twice): the value
    merging.magnitude_threshold gives, in O(chunk) memory and much faster than its top-k: |x| as
    float32 bits orders like its value, so a histogram of the high 16 bits finds the bucket, a second
    of the low 16 bits the value."""
    if n_keep <= 0:
        return math.inf
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for chunk in chunks():
        high += kernels.magnitude_histogram(chunk)
    above = high.flip(0).cumsum(0).flip(0)  # above[b] = entries in buckets >= b
    bucket = int((above >= n_keep).nonzero().max())
    rest = n_keep - (int(above[bucket + 1]) if bucket + 1 < len(above) else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks():
        low += kernels.magnitude_histogram(chunk, bucket)
    value = int((low.flip(0).cumsum(0).flip(0) >= rest).nonzero().max())
    return float(torch.tensor([(bucket << 16) | value], dtype=torch.int32).view(torch.float32))


def _ranges(numel: int, step: int):
    return [(start, min(start + step, numel)) for start in range(0, numel, step)] or [(0, 0)]


# ---- the fold ------------------------------------------------------------------------------------


def _open_base(path) -> Checkpoint:
    base = Checkpoint(path)
    if not base.names:
        raise CheckpointError(f"the base {path} has no tensors")
    return base


def _base_reference(base: Checkpoint) -> dict:
    return {
        "path": str(base.folder.resolve()),
        "architectures": base.config.get("architectures"),
        "files": {p.name: header_digest(p) for p in base.files},
        "num_tensors": len(base.names),
        "num_params": sum(info.numel for info in base.info.values()),
        "bytes": sum(p.stat().st_size for p in base.files),
    }


def _check_base(manifest: dict, base: Checkpoint) -> None:
    recorded = manifest["base"]["files"]
    current = {p.name: header_digest(p) for p in base.files}
    if recorded != current:
        raise StateError(
            f"the base {base.folder} differs from the one this state was built on ({manifest['base']['path']}): "
            f"its weight files' names, shapes or sizes changed"
        )


def _lams(manifest_tasks: list[dict], lams) -> list[float]:
    if lams is None:
        return [task["lam"] for task in manifest_tasks]
    if isinstance(lams, (int, float)):
        return [float(lams)] * len(manifest_tasks)
    if isinstance(lams, dict):
        unknown = set(lams) - {task["name"] for task in manifest_tasks}
        if unknown:
            raise StateError(f"lam given for unknown tasks {sorted(unknown)}")
        return [float(lams.get(task["name"], task["lam"])) for task in manifest_tasks]
    lams = [float(x) for x in lams]
    if len(lams) != len(manifest_tasks):
        raise StateError(f"got {len(lams)} lam values for {len(manifest_tasks)} tasks")
    return lams


def fold(state_dir, finetuned, task, *, base=None, mode=None, k=None, alpha=None, lam=1.0, trim=None,
         workers=0, progress=True, prefix_map=None, shard_bytes=None) -> dict:
    """Folds one fine-tuned model (transformers folder or PEFT LoRA adapter folder) into the state at
    `state_dir` as task `task`, refreshing every task's mask; returns the new manifest.

    `base` (a transformers folder) is required on the first fold and must match the recorded one after.
    mode, k, alpha and trim left at None take the state's values (for a new state: exact, 0.2, 1.0, tensor).
    `prefix_map` [(base prefix, task prefix), ...] overrides the detected name map.
    """
    state_dir = Path(state_dir)
    manifest = store.read_manifest(state_dir)
    settings = manifest or {"mode": "exact", "k": 0.2, "alpha": 1.0, "trim": "tensor"}
    mode = settings["mode"] if mode is None else mode
    k = settings["k"] if k is None else k
    alpha = settings["alpha"] if alpha is None else alpha
    trim = settings["trim"] if trim is None else trim
    if manifest is not None:
        store.verify(state_dir, manifest, full=False)
        if base is not None and Path(base).resolve() != Path(manifest["base"]["path"]):
            raise StateError(f"this state's base is {manifest['base']['path']}, not {Path(base).resolve()}")
        if mode != manifest["mode"]:
            raise StateError(f"this state is in {manifest['mode']} mode; it cannot take a {mode} fold")
        base = manifest["base"]["path"]
    elif base is None:
        raise StateError(f"{state_dir} holds no state yet: the first fold needs --base")
    store.check_new_task(manifest, task)
    _check_settings(manifest, mode, k, alpha, trim)
    base_ckpt = _open_base(base)
    if manifest is not None:
        _check_base(manifest, base_ckpt)
    finetuned = Path(finetuned)
    if is_lora_adapter(finetuned):
        source = _LoraSource(finetuned, base_ckpt)
    else:
        source = _ModelSource(finetuned, base_ckpt, prefix_map)
    store.collect_garbage(state_dir, manifest)
    state_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {
            "format": store.FORMAT, "format_version": store.FORMAT_VERSION, "generation": 0,
            "base": _base_reference(base_ckpt), "mode": mode, "trim": trim,
            "shard_bytes": shard_bytes or max(p.stat().st_size for p in base_ckpt.files),
            "alpha": alpha, "k": k, "tasks": [], "tau_star_files": [], "files": {},
        }
    new_task = {
        "name": task, "source": str(finetuned.resolve()), "kind": source.kind, "fingerprint": source.fingerprint(),
        "name_map": source.name_map, "lam": float(lam), "k": k,
        "dir": store.task_dir(len(manifest["tasks"]), task),
    }
    return _rebuild(state_dir, manifest, base_ckpt, k=k, alpha=alpha, lams=None, new=(new_task, source),
                    workers=workers, progress=progress)


def refit(state_dir, *, alpha=None, lams=None, k=None, workers=0, progress=False) -> dict:
    """Recomputes tau_star and every mask with new alpha, lam (scalar, list or {task: lam}) or k, from the
    kept task vectors (exact and sparse modes); used to choose alpha and lam on validation data."""
    state_dir = Path(state_dir)
    state = store.load(state_dir, full=False)
    manifest = state.manifest
    if manifest["mode"] == "compact":
        raise StateError("refit needs the task vectors: a compact state keeps only tau_star and the masks")
    k = manifest["k"] if k is None else k
    alpha = manifest["alpha"] if alpha is None else alpha
    _check_settings(manifest, manifest["mode"], k, alpha, manifest["trim"])
    base_ckpt = _open_base(manifest["base"]["path"])
    _check_base(manifest, base_ckpt)
    store.collect_garbage(state_dir, manifest)
    return _rebuild(state_dir, manifest, base_ckpt, k=k, alpha=alpha, lams=_lams(manifest["tasks"], lams),
                    new=None, workers=workers, progress=progress)


def _check_settings(manifest, mode, k, alpha, trim):
    if mode not in store.MODES:
        raise StateError(f"mode must be one of {store.MODES}, got {mode!r}")
    if trim not in TRIMS:
        raise StateError(f"trim must be one of {TRIMS}, got {trim!r}")
    if not 0.0 < k <= 1.0:
        raise StateError(f"trim fraction k must lie in (0, 1], got {k}")
    if not alpha > 0:
        raise StateError(f"alpha must be positive, got {alpha}")
    if manifest is None:
        return
    if trim != manifest["trim"]:
        raise StateError(f"this state trims per {manifest['trim']}; cannot fold with trim={trim}")
    if mode == "sparse":
        for task in manifest["tasks"]:
            if k > task["k"]:
                raise StateError(f"sparse state: task '{task['name']}' kept only its top {task['k']}; cannot trim at k={k}")


def _rebuild(state_dir: Path, manifest: dict, base: Checkpoint, *, k, alpha, lams, new, workers, progress) -> dict:
    state = store.State(state_dir, manifest)
    mode, trim = manifest["mode"], manifest["trim"]
    old_tasks = manifest["tasks"]
    tau_star_old = state.tau_star() if old_tasks else None
    sources = [_StoredTask(state, task, tau_star_old) for task in old_tasks]
    lams = [t["lam"] for t in old_tasks] if lams is None else lams
    tasks = [dict(t, lam=lam) for t, lam in zip(old_tasks, lams, strict=True)]
    if new is not None:
        new_task, new_source = new
        sources.append(new_source)
        tasks.append(new_task)
    lams = [task["lam"] for task in tasks]
    n_tasks = len(tasks)
    generation = manifest["generation"] + 1
    gen_rel = store.generation_dir(generation)
    gen_dir = state_dir / f"{gen_rel}.partial"
    task_stage = None
    try:
        gen_dir = store.stage(state_dir, gen_rel)
        shard_bytes = manifest["shard_bytes"]
        plan_f32 = [(n, torch.float32, base.info[n].shape) for n in base.names]
        tau_star_writer = ShardWriter(gen_dir, "tau_star", shard_bytes, plan_f32)
        mask_plans = [(n, torch.uint8, (math.ceil(base.info[n].numel / 8),)) for n in base.names]
        mask_writers = [ShardWriter(gen_dir, f"mask.{i:03d}", shard_bytes, mask_plans) for i in range(n_tasks)]
        task_writer = None
        if new is not None:
            task_stage = store.stage(state_dir, new_task["dir"])
            if mode == "exact":
                task_writer = ShardWriter(task_stage, "vector", shard_bytes, plan_f32)
            elif mode == "sparse":
                task_writer = ShardWriter(task_stage, "vector", shard_bytes)

        thresholds_global = None
        if trim == "global":
            thresholds_global = [_global_threshold(base, source, k) for source in tqdm(
                sources, desc="global trim thresholds", unit="task", disable=not progress)]
        # A task's per-tensor trim thresholds depend only on its kept vector and k, which exact and sparse
        # states never change: the manifest keeps them, so a fold computes them for the new task alone.
        reuse = mode != "compact" and trim == "tensor"
        known = [t.get("thresholds", {}).get("values", {}) if reuse and t.get("thresholds", {}).get("k") == k else {}
                 for t in tasks]
        found: dict[str, list[float]] = {}
        new_nonzero = False
        sparse_parts: list[tuple[Tensor, Tensor]] = []

        def compute(name: str, start: int, stop: int, thresholds: list[float | None]):
            taus = torch.empty(len(sources), stop - start)
            for source, row in zip(sources, taus):
                source.tau(base, name, start, stop, row)
            # None: not known, and the whole tensor is in this chunk
            thresholds = [kth_largest_magnitude(lambda t=tau: [t], merging.kept_count(k, tau.numel())) if thr is None
                          else thr for tau, thr in zip(taus, thresholds)]
            tau_star, packed = kernels.mmer_packed(taus, alpha, lams, thresholds)
            kept = None
            if new is not None and mode == "sparse":
                trimmed = merging.trim(taus[-1], k, thresholds[-1])
                index = trimmed.nonzero().flatten()
                kept = (index + start, trimmed[index])
            return tau_star, packed, (taus[-1] if new is not None else None), kept, thresholds

        def units():
            """(name, start, stop, thresholds) per chunk; a tensor in several chunks has its thresholds found
            first, in this thread."""
            for name in base.names:
                numel = base.info[name].numel
                step = max(8, CHUNK_ELEMENTS // n_tasks // 8 * 8)
                ranges = _ranges(numel, step)
                if thresholds_global is not None:
                    thresholds = thresholds_global
                else:
                    thresholds = [values.get(name) for values in known]
                for i, source in enumerate(sources):
                    if thresholds[i] is not None or len(ranges) == 1:
                        continue
                    if numel <= WHOLE_THRESHOLD_ELEMENTS:  # one task's whole tensor fits: read it once
                        chunks = lambda t=source.tau(base, name, 0, numel): [t]  # noqa: E731
                    else:
                        chunks = lambda s=source: (s.tau(base, name, a, b) for a, b in ranges)  # noqa: E731
                    thresholds[i] = kth_largest_magnitude(chunks, merging.kept_count(k, numel))
                for start, stop in ranges:
                    yield name, start, stop, thresholds

        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        pending: deque = deque()
        bar = tqdm(total=sum(info.numel for info in base.info.values()), desc=f"fold {tasks[-1]['name'] if new else 'refit'}",
                   unit="param", unit_scale=True, disable=not progress)
        done_tensors = 0

        def drain(item):
            nonlocal new_nonzero, done_tensors
            (name, start, stop), result = item
            tau_star, packed, tau_new, kept, found[name] = result.result() if pool else result
            if stop > start:  # a tensor with no elements has no chunk to write
                tau_star_writer.write(name, tau_star)
                for writer, p in zip(mask_writers, packed):
                    writer.write(name, p)
            if tau_new is not None:
                if not new_nonzero:  # one non-zero entry is enough
                    new_nonzero = bool(tau_new.any())
                if mode == "exact" and stop > start:
                    task_writer.write(name, tau_new)
            if kept is not None:
                sparse_parts.append(kept)
                if stop == base.info[name].numel:
                    task_writer.write(f"{name}::index", torch.cat([p[0] for p in sparse_parts]))
                    task_writer.write(f"{name}::value", torch.cat([p[1] for p in sparse_parts]))
                    sparse_parts.clear()
            bar.update(stop - start)
            if stop == base.info[name].numel:
                done_tensors += 1
                store.crash_point(f"tensor-{done_tensors}")

        try:
            for name, start, stop, thresholds in units():
                if pool:
                    pending.append(((name, start, stop), pool.submit(compute, name, start, stop, thresholds)))
                    while len(pending) > 2 * workers:
                        drain(pending.popleft())
                else:
                    drain(((name, start, stop), compute(name, start, stop, thresholds)))
            while pending:
                drain(pending.popleft())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
        finally:
            if pool:
                pool.shutdown(wait=True)
            bar.close()
        if new is not None and not new_nonzero:
            raise CheckpointError(
                f"the task vector of '{new_task['name']}' ({new_task['source']}) is zero in every shared tensor: "
                f"is it the base itself?"
            )

        if reuse:
            for i, task in enumerate(tasks):
                task["thresholds"] = {"k": k, "values": {name: found[name][i] for name in base.names}}
        files = {k_: v for k_, v in manifest["files"].items() if not k_.startswith(f"g{manifest['generation']:06d}/")}
        files.update(store.file_entries(gen_dir, gen_rel, tau_star_writer.close()))
        tau_star_files = [f"{gen_rel}/{f}" for f in tau_star_writer.files]
        for task, writer in zip(tasks, mask_writers):
            files.update(store.file_entries(gen_dir, gen_rel, writer.close()))
            task["mask_files"] = [f"{gen_rel}/{f}" for f in writer.files]
        if new is not None:
            for key, digests in _write_task_files(task_stage, new_source, base, shard_bytes, progress, task_writer).items():
                new_task[key] = [f"{new_task['dir']}/{f}" for f in digests]
                files.update(store.file_entries(task_stage, new_task["dir"], digests))
    except BaseException:
        # a failed fold leaves the state as it was: drop what it staged
        shutil.rmtree(gen_dir, ignore_errors=True)
        if task_stage is not None:
            shutil.rmtree(task_stage, ignore_errors=True)
        raise
    store.crash_point("staged")
    # the partial folders become final; the old manifest still names only the old files
    store.publish(gen_dir)
    if task_stage is not None:
        store.publish(task_stage)
        fsync_dir(state_dir / "tasks")
    store.crash_point("published")
    new_manifest = dict(manifest, generation=generation, k=k, alpha=alpha, tasks=tasks,
                        tau_star_files=tau_star_files, files=files, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    store.commit(state_dir, new_manifest)
    store.crash_point("committed")
    store.collect_garbage(state_dir, new_manifest)
    return new_manifest


def _global_threshold(base: Checkpoint, source, k: float) -> float:
    """One task's magnitude threshold over all its shared entries (trim='global'), streamed."""
    total = sum(info.numel for info in base.info.values())

    def chunks():
        for name in base.names:
            for start, stop in _ranges(base.info[name].numel, CHUNK_ELEMENTS):
                yield source.tau(base, name, start, stop)

    return kth_largest_magnitude(chunks, merging.kept_count(k, total))


def _write_task_files(folder: Path, source, base: Checkpoint, shard_bytes: int, progress: bool, vector_writer) -> dict:
    """The new task's kept vector (already streamed), private parameters and config files, as
    {component: {file name relative to the task folder: sha256}}."""
    out = {"vector_files": {}, "private_files": {}, "config_files": {}}
    if vector_writer is not None:
        out["vector_files"] = vector_writer.close()
    if source.private_names:
        plan = [(name, *source.private_info(name)) for name in source.private_names]
        writer = ShardWriter(folder, "private", shard_bytes, plan)
        for name, dtype, shape in tqdm(plan, desc="private parameters", unit="tensor", disable=not progress):
            for start, stop in _ranges(math.prod(shape), CHUNK_ELEMENTS):
                chunk = source.private(name, start, stop)
                merging.check_finite(chunk, f"{name}' (private, in {source.folder}) '")
                writer.write(name, chunk)
        out["private_files"] = writer.close()
    files_dir = folder / "files"
    files_dir.mkdir()
    config_source = source.folder if source.kind == "model" else Path(base.folder)
    out["config_files"] = {f"files/{name}": sha256_file(files_dir / name) for name in copy_small_files(config_source, files_dir)}
    return out


# ---- decoupled models: in memory, exported, switched live -------------------------------------------


def _decoupled_tensors(state: store.State, task: dict, base: Checkpoint):
    """(task-model name, tensor) for theta0 + m_task * tau_star over every shared tensor, then the private
    ones; one tensor at a time."""
    tau_star, masks = state.tau_star(), state.masks(task)
    for name in base.names:
        weights = torch.empty(base.info[name].shape, dtype=base.info[name].dtype)
        kernels.decouple_into(weights, base.read(name), tau_star.read(name), masks.read(name))
        yield map_name(name, task["name_map"]), weights
    private = state.private(task)
    if private is not None:
        for name in private.names:
            yield name, private.read(name)


def _base_of(state: store.State) -> Checkpoint:
    path = Path(state.manifest["base"]["path"])
    base = _open_base(path)
    _check_base(state.manifest, base)
    return base


def decoupled_state_dict(state_dir, task: str) -> dict[str, Tensor]:
    """Task `task`'s model as a state dict: theta0 + m_task * tau_star, plus its private parameters."""
    state = store.load(state_dir)
    return dict(_decoupled_tensors(state, state.task(task), _base_of(state)))


def export(state_dir, task: str, out_dir, progress: bool = True) -> Path:
    """Writes task `task`'s decoupled model as a transformers folder (its config files, sharded
    safetensors and index) that `from_pretrained` loads. Written beside `out_dir` and renamed into place."""
    state = store.load(state_dir)
    entry, base = state.task(task), _base_of(state)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StateError(f"export target {out_dir} exists and is not empty")
    staging = out_dir.with_name(out_dir.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    plan = [(map_name(n, entry["name_map"]), base.info[n].dtype, base.info[n].shape) for n in base.names]
    private = state.private(entry)
    if private is not None:
        plan += [(n, private.info[n].dtype, private.info[n].shape) for n in private.names]
    writer = ShardWriter(staging, "model", state.manifest["shard_bytes"], plan)
    for name, tensor in tqdm(_decoupled_tensors(state, entry, base), total=len(plan), desc=f"export {task}",
                             unit="tensor", disable=not progress):
        writer.write(name, tensor)
    writer.close()
    if len(writer.files) > 1:
        writer.write_index()
    else:
        (staging / next(iter(writer.files))).rename(staging / "model.safetensors")
    for relpath in entry["config_files"]:
        (staging / Path(relpath).name).write_bytes((state.dir / relpath).read_bytes())
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
    return out_dir


class TaskSwitcher:
    """Moves a loaded model between tasks in place, without a reload or a second copy of the weights:
    every shared tensor becomes theta0 + m_task * tau_star (merging.decouple's bits, computed straight
    into the parameter by kernels.decouple_into), reading theta0 and tau_star memory-mapped from the base
    and the state; the task's private parameters are copied in, and the model must have them."""

    def __init__(self, model: torch.nn.Module, state_dir):
        self.state = store.load(state_dir)
        self.base = _base_of(self.state)
        self.tau_star = self.state.tau_star()
        self.tensors = model.state_dict(keep_vars=True)
        self.current: str | None = None

    @torch.no_grad()
    def switch(self, task: str) -> None:
        entry = self.state.task(task)
        masks = self.state.masks(entry)
        private = self.state.private(entry)
        targets = []
        for name in self.base.names:
            mine = map_name(name, entry["name_map"])
            if mine not in self.tensors:
                raise StateError(f"the model has no tensor '{mine}' (base '{name}') for task '{task}'")
            targets.append((name, self.tensors[mine]))
        for name in private.names if private is not None else []:
            if name not in self.tensors:
                raise StateError(f"the model has no tensor '{name}', private to task '{task}'")
        for name, target in targets:
            kernels.decouple_into(target.data, self.base.view(name), self.tau_star.view(name), masks.read(name))
        for name in private.names if private is not None else []:
            self.tensors[name].copy_(private.read(name))
        self.current = task


# ---- inspect ------------------------------------------------------------------------------------------


def inspect(state_dir) -> dict:
    """Tasks, mode and settings, each task's mask density (raw, and effective = over entries where
    tau_star != 0) overall and per layer, and the state's bytes by component."""
    state = store.load(state_dir)
    manifest = state.manifest
    tau_star = state.tau_star()
    masks = [state.masks(task) for task in state.tasks]
    numel_by_layer: dict[str, int] = {}
    nonzero_by_layer: dict[str, int] = {}
    on_by_layer = [{} for _ in masks]  # per task: layer -> [mask ones, mask ones where tau_star != 0]
    for name, info in tau_star.info.items():
        layer = metrics.layer_of(name)
        nonzero = tau_star.read(name).reshape(-1) != 0
        numel_by_layer[layer] = numel_by_layer.get(layer, 0) + info.numel
        nonzero_by_layer[layer] = nonzero_by_layer.get(layer, 0) + int(nonzero.sum())
        for task_masks, counts in zip(masks, on_by_layer):
            mask = merging.unpack_mask(task_masks.read(name), (info.numel,))
            acc = counts.setdefault(layer, [0, 0])
            acc[0] += int(mask.sum())
            acc[1] += int((mask & nonzero).sum())
    total, total_nonzero = sum(numel_by_layer.values()), sum(nonzero_by_layer.values())
    tasks = []
    for task, counts in zip(state.tasks, on_by_layer):
        tasks.append({
            "name": task["name"], "kind": task["kind"], "source": task["source"], "lam": task["lam"],
            "mask_density": sum(a for a, _ in counts.values()) / max(total, 1),
            "mask_density_effective": sum(b for _, b in counts.values()) / max(total_nonzero, 1),
            "per_layer": {layer: {"density": a / numel_by_layer[layer],
                                  "effective": b / max(nonzero_by_layer[layer], 1)} for layer, (a, b) in counts.items()},
        })
    storage = {"base (referenced, not stored)": manifest["base"]["bytes"], "manifest": (state.dir / store.MANIFEST).stat().st_size}
    for task in state.tasks:
        for component, key in (("masks", "mask_files"), ("kept vectors", "vector_files"),
                               ("private", "private_files"), ("config files", "config_files")):
            storage[component] = storage.get(component, 0) + sum(manifest["files"][f]["bytes"] for f in task[key])
    storage["tau_star"] = sum(manifest["files"][f]["bytes"] for f in manifest["tau_star_files"])
    return {
        "state": str(state.dir), "mode": manifest["mode"], "alpha": manifest["alpha"], "k": manifest["k"],
        "trim": manifest["trim"], "generation": manifest["generation"], "base": manifest["base"]["path"],
        "num_params": total, "tau_star_density": total_nonzero / max(total, 1), "tasks": tasks, "storage_bytes": storage,
    }


# ---- CLI -------------------------------------------------------------------------------------------------


def _prefix_map(values):
    if not values:
        return None
    rules = []
    for value in values:
        if "=" not in value:
            raise argparse.ArgumentTypeError(f"--prefix-map takes BASE_PREFIX=TASK_PREFIX, got {value!r}")
        rules.append(value.split("=", 1))
    return rules


def _cmd_fold(args) -> int:
    manifest = fold(args.state, args.finetuned, args.task, base=args.base, mode=args.mode, k=args.k, alpha=args.alpha,
                    lam=args.lam, trim=args.trim, workers=args.workers, prefix_map=_prefix_map(args.prefix_map))
    print(f"folded '{args.task}' into {args.state}: {len(manifest['tasks'])} tasks, generation {manifest['generation']}")
    return 0


def _cmd_export(args) -> int:
    out = export(args.state, args.task, args.out)
    print(f"exported '{args.task}' to {out}")
    return 0


def _cmd_inspect(args) -> int:
    report = inspect(args.state)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['state']}: mode {report['mode']}, alpha {report['alpha']}, k {report['k']} (trim per {report['trim']}), "
          f"{report['num_params']:,} shared parameters, tau_star density {report['tau_star_density']:.3f}")
    print(f"base: {report['base']}")
    print(f"{'task':<20} {'kind':<6} {'lam':>5} {'density':>8} {'effective':>9}")
    for task in report["tasks"]:
        print(f"{task['name']:<20} {task['kind']:<6} {task['lam']:>5.2f} {task['mask_density']:>8.3f} "
              f"{task['mask_density_effective']:>9.3f}")
    print("storage:")
    for component, size in report["storage_bytes"].items():
        print(f"  {component:<32} {size:>16,} bytes")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("fold", help="fold a fine-tuned checkpoint folder or LoRA adapter into an MMER state")
    p.add_argument("state", help="state folder (created by the first fold)")
    p.add_argument("finetuned", help="transformers folder or PEFT LoRA adapter folder")
    p.add_argument("--task", required=True, help="name of the new task")
    p.add_argument("--base", help="base transformers folder (first fold only)")
    p.add_argument("--mode", choices=store.MODES, help="exact (default), sparse or compact; fixed by the first fold")
    p.add_argument("--k", type=float, help="TIES trim fraction (default: the state's, else 0.2)")
    p.add_argument("--alpha", type=float, help="scale of the merged vector (default: the state's, else 1.0)")
    p.add_argument("--lam", type=float, default=1.0, help="this task's mask parameter")
    p.add_argument("--trim", choices=TRIMS, help="trim per tensor (default) or by one global threshold")
    p.add_argument("--workers", type=int, default=0, help="threads over tensor chunks (0: none)")
    p.add_argument("--prefix-map", action="append", metavar="BASE_PREFIX=TASK_PREFIX",
                   help="how the task model names the base's tensors, e.g. 'model.=language_model.model.'")
    p.set_defaults(func=_cmd_fold)
    p = subparsers.add_parser("export", help="write one task's decoupled model as a transformers folder")
    p.add_argument("state")
    p.add_argument("task")
    p.add_argument("out")
    p.set_defaults(func=_cmd_export)
    p = subparsers.add_parser("inspect", help="tasks, mask densities and storage of an MMER state")
    p.add_argument("state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)
