"""One rebuild of a state: a new generation of tau_star and every task's mask, streamed chunk by chunk
through the registries' functions (or a fused kernel), written crash-safely and committed (fold.py says
what it computes; modes.py what each mode keeps; store.py how it is written)."""

import dataclasses
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmer_cl import kernels, merging, modes, store
from mmer_cl.checkpoints import Checkpoint, CheckpointError, PlannedWriter, copy_small_files, fsync_dir, sha256_file
from mmer_cl.integrity import ContentCheck, ContentError
from mmer_cl.settings import Settings
from mmer_cl.store import StateError

CHUNK_ELEMENTS = 1 << 23  # elements of the [T, chunk] stack processed at once, whatever T
WHOLE_THRESHOLD_ELEMENTS = 1 << 25  # larger tensors find their trim threshold by a streamed histogram


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
        step = rows[-1:] if self.tau_star_old is None else torch.stack([self.tau_star_old.read(name, start, stop).float(), rows[-1]])
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
        self.tau_dtypes = {n: self._tau_dtype(n) for n in self.base.names}
        tau_plan = [(n, self.tau_dtypes[n], self.base.info[n].shape) for n in self.base.names]
        self.tau_star_writer = PlannedWriter(gen_dir, "tau_star", shard_bytes, tau_plan)
        mask_plan = [(n, torch.uint8, (math.ceil(self.base.info[n].numel / 8),)) for n in self.base.names]
        self.mask_writers = [PlannedWriter(gen_dir, f"mask.{i:03d}", shard_bytes, mask_plan)
                             for i in range(len(self.tasks))] if self.rule.fn is not None else []
        self.vector_writer = None
        if self.source is not None:
            self.task_stage = store.stage(self.dir, self.tasks[-1]["dir"])
            self.staged.append(self.task_stage)
            self.vector_writer = self.mode.writer(self.task_stage, self.plan_f32, shard_bytes)

    def _tau_dtype(self, name: str) -> torch.dtype:
        dtype = self.base.info[name].dtype
        return dtype if self.settings.tau_dtype == "weights" and dtype.is_floating_point else torch.float32

    def _write(self, name: str, start: int, stop: int, result, bar) -> None:
        tau_star, packed, masks, taus, thresholds = result
        self.found[name] = thresholds
        stored = tau_star.to(self.tau_dtypes[name])
        tau_star = stored.float()  # what a reader will get: the statistics below are of it
        if not bool(torch.isfinite(tau_star).all()):
            raise StateError(f"tensor '{name}': the merged vector tau_star has NaN or Inf entries "
                             f"(settings {self.settings}); nothing was written")
        numel = self.base.info[name].numel
        if stop > start:  # a tensor with no elements has no chunk to write
            self.tau_star_writer.write(name, stored)
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
