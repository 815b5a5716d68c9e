"""The benchmark: streams, profiles, the resumable run loop and `mmer-cl run`.

A run lives in a run folder (`<cache>/<profile>-seed<N>/`): every finished expert (a transformers folder)
and every finished method result (a JSON file) is written there atomically and reused by a rerun, so an
interrupted run resumes where it stopped. Tables and plots go to `--out` (results/ by default).

Streams (each a list of tasks; task label t = position in the stream):
- modality: vision (Fashion-MNIST) -> audio (spoken words) -> text (WordNet glosses), one expert each;
- split_fmnist: Fashion-MNIST classes {0,1}, {2,3}, ... {8,9} as 5 tasks with task labels (labels 0/1 per task);
- forgetting: the vision expert fine-tuned further on the audio task; old/new task accuracy of the
  further-tuned model, the original expert and MMER over the two task vectors.

Every method sees the same per-task training subset (`train_per_task` examples) and the same number of
optimizer steps per task; hyperparameters are chosen on the validation subsets, never on test.
Adding a stream: a function returning `StreamData`, registered with `@stream("name")`. Adding a method: a
function (run, data) -> result dict, registered with `@method("name")` (see `method`).
"""

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmer_cl import baselines, data as data_module, experts, fold, merging, metrics, models, report
from mmer_cl.strategy import MMERStrategy, PackedInputs, TaskRouter, TaskSpec, packed_length


# ---- profiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Budgets of one benchmark size. Steps are optimizer steps per task, for experts and baselines alike."""

    name: str
    steps: int
    fmnist_steps: int
    batch_size: int
    train_per_task: int
    val_per_task: int
    test_per_task: int
    k: float = 0.2
    alphas: tuple = (0.5, 1.0, 1.5, 2.0)
    lams: tuple = (0.5, 1.0, 2.0)
    ta_alphas: tuple = (0.3, 0.5, 0.7, 1.0)
    tall_lams: tuple = (0.2, 0.4, 0.6)
    skip: tuple = ()  # "stream/method" pairs this profile leaves out unless --methods names them


PROFILES = {
    "quick": Profile("quick", steps=4, fmnist_steps=3, batch_size=8, train_per_task=32, val_per_task=32,
                     test_per_task=64, alphas=(1.0, 2.0), lams=(1.0,), ta_alphas=(0.5, 1.0), tall_lams=(0.4,)),
    # 150 steps: the audio expert is near chance (16% of 20 words) after 60 and at 62% after 150. EWC, LwF and
    # Replay cost 2-3x Naive's training (5-8 min each on the modality stream): within 30 minutes they run on
    # Split Fashion-MNIST only, where forgetting is measured.
    "default": Profile("default", steps=150, fmnist_steps=30, batch_size=32, train_per_task=2400, val_per_task=200,
                       test_per_task=500, skip=("modality/ewc", "modality/lwf", "modality/replay")),
    "full": Profile("full", steps=400, fmnist_steps=200, batch_size=32, train_per_task=12800, val_per_task=1000,
                    test_per_task=3000),
}


# ---- streams -------------------------------------------------------------------------------------------


@dataclass
class StreamData:
    """One stream: its tasks in order (task label t = specs[t]) and per-task train/val/test datasets of (x, y)."""

    name: str
    specs: list[TaskSpec]
    train: dict
    val: dict
    test: dict
    steps: int

    @property
    def tasks(self) -> list[str]:
        return [spec.name for spec in self.specs]


STREAMS: dict[str, Callable] = {}


def stream(name: str):
    def register(fn):
        STREAMS[name] = fn
        return fn
    return register


def _spec(name: str, modality: str, dataset, num_classes: int) -> TaskSpec:
    x = torch.as_tensor(dataset[0][0])
    return TaskSpec(name, modality, tuple(x.shape), x.dtype, num_classes)


def _subsets(splits, profile: Profile, seed: int):
    return tuple(data_module.subset(split, size, seed) for split, size in (
        (splits.train, profile.train_per_task), (splits.val, profile.val_per_task), (splits.test, profile.test_per_task)))


@stream("modality")
def modality_stream(profile: Profile, seed: int) -> StreamData:
    specs, train, val, test = [], {}, {}, {}
    for modality in ("vision", "audio", "text"):
        splits = data_module.load(modality, seed)
        train[modality], val[modality], test[modality] = _subsets(splits, profile, seed)
        specs.append(_spec(modality, modality, splits.train, len(splits.classes)))
    return StreamData("modality", specs, train, val, test, profile.steps)


class ClassPair(torch.utils.data.Dataset):
    """The examples of classes (a, b) relabelled 0 and 1: one task of Split Fashion-MNIST."""

    def __init__(self, dataset, classes: tuple[int, int]):
        targets = torch.as_tensor(list(dataset.targets))
        self.dataset = dataset
        self.indices = torch.nonzero((targets == classes[0]) | (targets == classes[1])).flatten().tolist()
        self.classes = classes
        self.targets = [int(targets[i] == classes[1]) for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]][0], self.targets[index]


@stream("split_fmnist")
def split_fmnist_stream(profile: Profile, seed: int) -> StreamData:
    splits = data_module.load("vision", seed)
    specs, train, val, test = [], {}, {}, {}
    # one epoch of fmnist_steps batches per task: two classes need fewer steps and examples than ten
    per_task = replace(profile, train_per_task=profile.fmnist_steps * profile.batch_size,
                       val_per_task=max(profile.val_per_task // 2, 16), test_per_task=max(profile.test_per_task // 2, 32))
    for pair in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]:
        name = f"fmnist_{pair[0]}{pair[1]}"
        train[name] = data_module.subset(ClassPair(splits.train, pair), per_task.train_per_task, seed)
        val[name] = data_module.subset(ClassPair(splits.val, pair), per_task.val_per_task, seed)
        test[name] = data_module.subset(ClassPair(splits.test, pair), per_task.test_per_task, seed)
        specs.append(_spec(name, "vision", splits.train, 2))
    return StreamData("split_fmnist", specs, train, val, test, profile.fmnist_steps)


# ---- the run folder: cached experts and results ---------------------------------------------------------


def _write_json_atomic(path: Path, value) -> None:
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
    """One run folder: `cached(key, compute)` returns a stored result or computes, stores and returns it."""

    def __init__(self, profile: Profile, seed: int, run_dir: Path, progress: bool = True):
        self.profile, self.seed, self.dir, self.progress = profile, seed, Path(run_dir), progress
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pools: dict[str, baselines.ExpertPool] = {}

    def cached(self, key: str, compute: Callable[[], dict]) -> dict:
        path = self.dir / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        with PeakRSS() as rss:
            value = compute()
        value.setdefault("seconds", time.perf_counter() - start)
        value.setdefault("peak_rss_mb", rss.peak)
        _write_json_atomic(path, value)
        return value

    # -- models, experts, evaluation --

    def base_dir(self) -> Path:
        folder = self.dir / "base"
        if not (folder / "DONE").exists():
            shutil.rmtree(folder, ignore_errors=True)
            _new_model([]).save_base(folder)
            (folder / "DONE").touch()
        return folder

    def expert_dir(self, data: StreamData, spec: TaskSpec, *, mode: str = "full", start: Path | None = None,
                   train=None, name: str | None = None) -> Path:
        """Task `spec`'s expert fine-tuned from theta0 (or from the model in `start`) on data.train[spec.name]
        for data.steps steps; cached as a transformers folder."""
        folder = self.dir / data.name / "experts" / (name or f"{spec.name}-{mode}")
        if (folder / "DONE").exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        model = _train_expert(spec, train if train is not None else data.train[spec.name], data.val[spec.name],
                              data.steps, self.profile, self.seed, mode=mode, start=start)
        experts.save_expert(model, folder)
        (folder / "DONE").touch()
        return folder

    def experts(self, data: StreamData, mode: str = "full") -> dict[str, Path]:
        """One expert folder per task: full fine-tunes, or LoRA adapter folders (mode="lora")."""
        return {spec.name: self.expert_dir(data, spec, mode=mode) for spec in data.specs}

    def pool(self, data: StreamData, mode: str = "full") -> baselines.ExpertPool:
        """theta0 and every expert's task vector in memory; a LoRA expert as its merged dense model."""
        key = f"{data.name}/{mode}"
        if key not in self._pools:
            theta0 = _load_weights(self.base_dir())
            if mode == "lora":
                weights = {task: models.load_model(folder, merge=True).state_dict()
                           for task, folder in self.experts(data, mode).items()}
            else:
                weights = {task: _load_weights(folder) for task, folder in self.experts(data, mode).items()}
            self._pools[key] = baselines.ExpertPool(theta0, weights)
        return self._pools[key]


def _new_model(specs):
    return models.build_model([(spec.name, spec.modality, spec.num_classes)
                               + (() if spec.modality == "text" else (spec.input_shape,)) for spec in specs])


def _train_expert(spec: TaskSpec, train, val, steps: int, profile: Profile, seed: int, mode: str, start=None):
    model, _ = experts.train_expert(spec.name, spec.modality, (train, val), mode=mode, steps=steps, seed=seed,
                                    batch_size=profile.batch_size, num_classes=spec.num_classes, init=start,
                                    progress=True)
    return model


def _load_weights(folder: Path) -> dict:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _evaluate(model, dataset, task: str) -> float:
    return float(experts.evaluate(model, dataset, task, batch_size=128))


def _full_model(data: StreamData):
    return _new_model(data.specs)


def _nan_matrix(T: int) -> np.ndarray:
    return np.full((T, T), np.nan)


def _result(R, storage: dict, **extra) -> dict:
    return {"matrix": np.asarray(R, dtype=float).tolist(), "storage": storage, **extra}


# ---- methods --------------------------------------------------------------------------------------------


@dataclass
class Method:
    fn: Callable
    streams: tuple = ("modality", "split_fmnist")


METHODS: dict[str, Method] = {}


def method(name: str, streams=("modality", "split_fmnist")):
    """Registers fn(run, data) -> {"matrix": R (T x T, NaN where unmeasured), "storage": bytes by component,
    ...anything else to keep}; its result is cached in the run folder under <stream>/<name>.json."""
    def register(fn):
        METHODS[name] = Method(fn, tuple(streams))
        return fn
    return register


def _shared_bytes(pool: baselines.ExpertPool) -> int:
    return metrics.tensor_bytes(pool.theta0)


def _private_bytes(pool: baselines.ExpertPool, tasks) -> int:
    return sum(metrics.tensor_bytes(pool.private[t]) for t in tasks)


@method("individual")
def run_individual(run: Run, data: StreamData) -> dict:
    """Upper bound: task j's own expert, one full copy per task."""
    pool, model = run.pool(data), _full_model(data)
    weights = {t: baselines.add_vector(pool.theta0, pool.taus[t]) for t in data.tasks}
    accs = baselines.score(model, pool, weights, data.test, _evaluate)
    R = _nan_matrix(len(data.tasks))
    for t in range(len(data.tasks)):
        for j in range(t + 1):
            R[t, j] = accs[data.tasks[j]]
    storage = metrics.storage(base=_shared_bytes(pool), shared_vectors=len(data.tasks) * _shared_bytes(pool),
                              private=_private_bytes(pool, data.tasks))
    return _result(R, storage, expert_accuracy=[accs[t] for t in data.tasks])


def _merging_matrix(run: Run, data: StreamData, build: Callable[[list[str]], dict]) -> np.ndarray:
    """R[t, j]: the merge of experts 0..t (chosen hyperparameters fixed), scored on test task j <= t."""
    pool, model = run.pool(data), _full_model(data)
    R = _nan_matrix(len(data.tasks))
    for t in range(len(data.tasks)):
        seen = data.tasks[: t + 1]
        accs = baselines.score(model, pool, build(seen), {j: data.test[j] for j in seen}, _evaluate)
        R[t, : t + 1] = [accs[j] for j in seen]
    return R


def _choose(run: Run, data: StreamData, key: str, grid: list[dict], build, pool=None) -> dict:
    """The grid point with the best mean validation accuracy over the stream's tasks (all experts merged)."""
    def compute():
        model = _full_model(data)
        best, table = baselines.choose_on_validation(grid, build, model, pool or run.pool(data), data.val, _evaluate)
        return {"choice": best, "grid": table}
    return run.cached(f"{data.name}/grid_{key}", compute)


def _one_vector_storage(pool, tasks, masks: int = 0) -> dict:
    return metrics.storage(base=_shared_bytes(pool), shared_vectors=_shared_bytes(pool),
                           masks=metrics.mask_bytes(pool.num_params(), masks), private=_private_bytes(pool, tasks))


@method("task_arithmetic")
def run_task_arithmetic(run: Run, data: StreamData) -> dict:
    pool = run.pool(data)
    tau_sum = baselines.sum_vector(pool, data.tasks)
    chosen = _choose(run, data, "task_arithmetic", baselines.grid_points(alpha=run.profile.ta_alphas),
                     lambda alpha: baselines.shared_for_all(data.tasks, baselines.add_vector(pool.theta0, tau_sum, alpha)))
    alpha = chosen["choice"]["alpha"]
    R = _merging_matrix(run, data, lambda seen: baselines.shared_for_all(
        seen, baselines.add_vector(pool.theta0, baselines.sum_vector(pool, seen), alpha)))
    return _result(R, _one_vector_storage(pool, data.tasks), hyper=chosen)


@method("ties")
def run_ties(run: Run, data: StreamData) -> dict:
    pool, k = run.pool(data), run.profile.k
    tau_m = baselines.ties_vector(pool, data.tasks, k)
    chosen = _choose(run, data, "ties", baselines.grid_points(alpha=run.profile.alphas),
                     lambda alpha: baselines.shared_for_all(data.tasks, baselines.add_vector(pool.theta0, tau_m, alpha)))
    alpha = chosen["choice"]["alpha"]
    R = _merging_matrix(run, data, lambda seen: baselines.shared_for_all(
        seen, baselines.add_vector(pool.theta0, baselines.ties_vector(pool, seen, k), alpha)))
    return _result(R, _one_vector_storage(pool, data.tasks), hyper=chosen)


@method("dare_ties")
def run_dare_ties(run: Run, data: StreamData) -> dict:
    pool, k, seed = run.pool(data), run.profile.k, run.seed
    tau_m = baselines.ties_vector(pool, data.tasks, k, dare_p=baselines.DARE_P, seed=seed)
    chosen = _choose(run, data, "dare_ties", baselines.grid_points(alpha=run.profile.alphas),
                     lambda alpha: baselines.shared_for_all(data.tasks, baselines.add_vector(pool.theta0, tau_m, alpha)))
    alpha = chosen["choice"]["alpha"]
    R = _merging_matrix(run, data, lambda seen: baselines.shared_for_all(
        seen, baselines.add_vector(pool.theta0, baselines.ties_vector(pool, seen, k, baselines.DARE_P, seed), alpha)))
    return _result(R, _one_vector_storage(pool, data.tasks), hyper=chosen, dare_p=baselines.DARE_P)


@method("tall")
def run_tall(run: Run, data: StreamData) -> dict:
    """TALL masks on the task-arithmetic vector at TA's chosen alpha; lam chosen on validation."""
    pool = run.pool(data)
    alpha = run.cached(f"{data.name}/task_arithmetic", lambda: run_task_arithmetic(run, data))["hyper"]["choice"]["alpha"]
    tau_sum = baselines.sum_vector(pool, data.tasks)
    chosen = _choose(run, data, "tall", baselines.grid_points(lam=run.profile.tall_lams),
                     lambda lam: baselines.tall_weights(pool, data.tasks, tau_sum, alpha, lam))
    lam = chosen["choice"]["lam"]
    R = _merging_matrix(run, data, lambda seen: baselines.tall_weights(pool, seen, baselines.sum_vector(pool, seen), alpha, lam))
    return _result(R, _one_vector_storage(pool, data.tasks, masks=len(data.tasks)), hyper={**chosen, "alpha": alpha})


@method("emr")
def run_emr(run: Run, data: StreamData) -> dict:
    pool = run.pool(data)
    R = _merging_matrix(run, data, lambda seen: baselines.emr_weights(pool, seen))
    storage = _one_vector_storage(pool, data.tasks, masks=len(data.tasks))
    return _result(R, storage)


def _mmer_choice(run: Run, data: StreamData, experts: str = "full") -> dict:
    pool, k = run.pool(data, experts), run.profile.k
    tau_m = baselines.ties_vector(pool, data.tasks, k)
    key = "mmer" if experts == "full" else f"mmer_{experts}"
    return _choose(run, data, key, baselines.grid_points(alpha=run.profile.alphas, lam=run.profile.lams),
                   lambda alpha, lam: baselines.mmer_weights(pool, data.tasks, tau_m, alpha, lam), pool)


def _avalanche_stream(data: StreamData):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    length = packed_length(data.specs)
    sets = {"train": data.train, "test": data.test}
    streams = {name: [data_module.as_avalanche(PackedInputs(sets[name][t], length), label)
                      for label, t in enumerate(data.tasks)] for name in ("train", "test")}
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))


def _run_mmer(run: Run, data: StreamData, mode: str, experts: str = "full") -> dict:
    """MMERStrategy over the Avalanche stream, the experts (full fine-tunes, or LoRA adapters folded as
    their dense deltas) handed in as folders; R[t, j] from Avalanche's own accuracy metric after each
    training experience."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    choice = _mmer_choice(run, data, experts)
    alpha, lam = choice["choice"]["alpha"], choice["choice"]["lam"]
    folders, pool = run.experts(data, experts), run.pool(data, experts)
    state_dir = run.dir / data.name / f"state-{mode}-{experts}"
    shutil.rmtree(state_dir, ignore_errors=True)
    bm = _avalanche_stream(data)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = MMERStrategy(model=_full_model(data), specs=data.specs, base_dir=run.base_dir(), state_dir=state_dir,
                            expert_source=folders, mode=mode,
                            k=run.profile.k, alpha=alpha, lam=lam, eval_mb_size=64, evaluator=evaluator)
    T = len(data.tasks)
    R = _nan_matrix(T)
    for t, experience in enumerate(bm.train_stream):
        strategy.train(experience)
        res = strategy.eval(bm.test_stream[: t + 1])
        for j in range(t + 1):
            R[t, j] = res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"]
    info = fold.inspect(state_dir)
    sizes = info["storage_bytes"]
    storage = metrics.storage(base=sizes["base (referenced, not stored)"], shared_vectors=sizes["tau_star"] + sizes["kept vectors"],
                              masks=sizes["masks"], private=sizes["private"])
    recon = {}
    for task in data.tasks:
        decoupled = fold.decoupled_state_dict(state_dir, task)
        recon[task] = metrics.reconstruction_error(
            pool.taus[task], {n: torch.ones_like(v, dtype=torch.bool) for n, v in pool.taus[task].items()},
            {n: decoupled[n].float() - pool.theta0[n] for n in pool.theta0})
    extra = {}
    if data.name == "split_fmnist" and mode == "exact" and experts == "full":
        strategy.infer_task = True
        res = strategy.eval(bm.test_stream)
        extra["inferred"] = {
            "accuracy": [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(T)],
            "task_inference": strategy.inference_log[-T:],
        }
    return _result(R, storage, hyper=choice, fold_seconds=strategy.fold_seconds, reconstruction_error=recon,
                   masks=info["tasks"], **extra)


for _mode in ("exact", "sparse", "compact"):
    method(f"mmer_{_mode}")(lambda run, data, _mode=_mode: _run_mmer(run, data, _mode))
method("mmer_lora")(lambda run, data: _run_mmer(run, data, "compact", experts="lora"))


@method("mmer_controls")
def run_mmer_controls(run: Run, data: StreamData) -> dict:
    """Mask analyses and controls on the final merge (in memory, exact masks at the chosen alpha, lam):
    MMER's masks vs a random mask of the same effective density vs the plain sign-agreement mask."""
    pool, k = run.pool(data), run.profile.k
    choice = _mmer_choice(run, data)
    alpha, lam = choice["choice"]["alpha"], choice["choice"]["lam"]
    tau_m = baselines.ties_vector(pool, data.tasks, k)
    tau_star = {n: alpha * v for n, v in tau_m.items()}
    masks = {t: metrics.mmer_masks(pool.taus[t], tau_star, lam) for t in data.tasks}
    analyses = {"density": {}, "overlap": {}, "reconstruction_error": {}, "control_density": {}}
    for t in data.tasks:
        d = metrics.mask_density(masks[t], tau_star)
        analyses["density"][t] = d
        analyses["reconstruction_error"][t] = {
            "mmer": metrics.reconstruction_error(pool.taus[t], masks[t], tau_star),
            "sign": metrics.reconstruction_error(pool.taus[t], metrics.sign_agreement_mask(pool.taus[t], tau_star), tau_star),
            "ties (all ones)": metrics.reconstruction_error(pool.taus[t], {n: torch.ones_like(m) for n, m in masks[t].items()}, tau_star),
        }
    for a in data.tasks:
        for b in data.tasks:
            if a < b:
                analyses["overlap"][f"{a}|{b}"] = metrics.mask_overlap(masks[a], masks[b], tau_star)
    test = data.test
    model = _full_model(data)
    accuracy = {
        "mmer": baselines.score(model, pool, baselines.mmer_weights(pool, data.tasks, tau_m, alpha, lam), test, _evaluate),
        "random_mask": baselines.score(model, pool, baselines.control_weights(pool, data.tasks, tau_m, alpha, lam, "random", run.seed), test, _evaluate),
        "sign_mask": baselines.score(model, pool, baselines.control_weights(pool, data.tasks, tau_m, alpha, lam, "sign"), test, _evaluate),
        "ties_no_mask": baselines.score(model, pool, baselines.shared_for_all(data.tasks, baselines.add_vector(pool.theta0, tau_star)), test, _evaluate),
    }
    return {"analyses": analyses, "accuracy": accuracy, "alpha": alpha, "lam": lam}


def _run_avalanche(run: Run, data: StreamData, name: str) -> dict:
    """A real Avalanche strategy on one multi-head model, as many epochs over each experience as give about
    the experts' steps per task (data.steps * batch_size / examples); naive also saves its sequential
    fine-tunes for MagMax."""
    bm = _avalanche_stream(data)
    model = _full_model(data)
    router = TaskRouter(model, data.specs)
    strategy = baselines.avalanche_strategy(name, router, batch_size=run.profile.batch_size)
    pool = run.pool(data)
    T = len(data.tasks)
    R = _nan_matrix(T)
    for t, experience in enumerate(tqdm(bm.train_stream, desc=f"{data.name}/{name}", disable=not run.progress)):
        strategy.train_epochs = max(1, round(data.steps * run.profile.batch_size / len(experience.dataset)))
        strategy.train(experience)
        model.eval()
        for j in range(t + 1):
            R[t, j] = _evaluate(model, data.test[data.tasks[j]], data.tasks[j])
        if name == "naive":
            folder = run.dir / data.name / "naive_sequential"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, folder / f"{t}.safetensors")
    base, private = _shared_bytes(pool), _private_bytes(pool, data.tasks)
    kept = {"naive": 0, "ewc": 2 * T * base, "lwf": base, "replay": 0}[name]
    buffer = 0
    if name == "replay":
        buffer = baselines.REPLAY_MEM_PER_TASK * T * packed_length(data.specs) * 4
    storage = metrics.storage(base=base, shared_vectors=kept, private=private, buffer=buffer)
    return _result(R, storage)


for _name in ("naive", "ewc", "lwf", "replay"):
    method(_name)(lambda run, data, _name=_name: _run_avalanche(run, data, _name))


@method("magmax")
def run_magmax(run: Run, data: StreamData) -> dict:
    """MagMax over the sequential fine-tunes (Naive's model after each experience): theta0 + MagMax(tau_seq);
    each task's private parameters from the last sequential model (only that task trains them)."""
    run.cached(f"{data.name}/naive", lambda: _run_avalanche(run, data, "naive"))
    pool, model = run.pool(data), _full_model(data)
    folder = run.dir / data.name / "naive_sequential"
    seq_taus = []
    for t in range(len(data.tasks)):
        state = load_file(folder / f"{t}.safetensors")
        seq_taus.append({n: state[n].float() - pool.theta0[n] for n in pool.theta0})
    last = load_file(folder / f"{len(data.tasks) - 1}.safetensors")
    private_last = {t: {n: last[n] for n in pool.private[t]} for t in data.tasks}
    R = _nan_matrix(len(data.tasks))
    for t in range(len(data.tasks)):
        merged = merging.merge_state_dicts(seq_taus[: t + 1], merging.magmax)
        seen = data.tasks[: t + 1]
        with torch.no_grad():
            for j in seen:
                model.load_state_dict({**baselines.add_vector(pool.theta0, merged), **private_last[j]}, strict=False)
                R[t, data.tasks.index(j)] = _evaluate(model, data.test[j], j)
    return _result(R, _one_vector_storage(pool, data.tasks))


@method("lora")
def run_lora(run: Run, data: StreamData) -> dict:
    """One LoRA adapter per task on the frozen base (PEFT), routed by task; storage = adapters + private."""
    R = _nan_matrix(len(data.tasks))
    accs, adapter_bytes, private_bytes = {}, 0, 0
    for spec in data.specs:
        folder = run.expert_dir(data, spec, mode="lora")
        model = models.load_model(folder)
        accs[spec.name] = _evaluate(model, data.test[spec.name], spec.name)
        sizes = models.lora_storage(folder)
        adapter_bytes += sizes["adapters"]
        private_bytes += sizes["private"]
    for t in range(len(data.tasks)):
        for j in range(t + 1):
            R[t, j] = accs[data.tasks[j]]
    pool = run.pool(data)
    return _result(R, metrics.storage(base=_shared_bytes(pool), adapters=adapter_bytes, private=private_bytes))


def _load_model(folder: Path):
    return models.load_model(folder)


def _lora_sizes(folder: Path) -> dict:
    return models.lora_storage(folder)


@method("joint")
def run_joint(run: Run, data: StreamData) -> dict:
    """Upper bound: one model trained on all tasks at once (T x steps round-robin steps); only the final
    row of R exists, so BWT and forgetting are not defined for it."""
    model = _full_model(data)
    steps = data.steps * len(data.tasks)
    with tqdm(total=steps, desc=f"{data.name}/joint", disable=not run.progress) as bar:
        baselines.train_joint(model, data.specs, data.train, steps=steps, batch_size=run.profile.batch_size,
                              seed=run.seed, progress=bar)
    R = _nan_matrix(len(data.tasks))
    R[-1] = [_evaluate(model, data.test[t], t) for t in data.tasks]
    pool = run.pool(data)
    return _result(R, metrics.storage(base=_shared_bytes(pool), private=_private_bytes(pool, data.tasks)))


# ---- the forgetting scenario -------------------------------------------------------------------------


def run_forgetting(run: Run, modality: StreamData) -> dict:
    """The vision expert fine-tuned further on the audio task (a new task with its own private modules):
    old (vision) and new (audio) test accuracy of the further-tuned model, the original vision expert and
    MMER over the two task vectors (tau_old = theta_vision - theta0, tau_new = theta_further - theta0)."""
    vision, audio = modality.specs[0], modality.specs[1]
    old_dir = run.expert_dir(modality, vision)
    new_dir = run.expert_dir(modality, audio, start=old_dir, name="vision-then-audio")
    theta0 = _load_weights(run.base_dir())
    old, new = _load_weights(old_dir), _load_weights(new_dir)
    pool = baselines.ExpertPool(theta0, {"old": old, "new": new})
    model = _full_model(modality)
    task_of = {"old": vision.name, "new": audio.name}
    test = {"old": modality.test[vision.name], "new": modality.test[audio.name]}
    val = {"old": modality.val[vision.name], "new": modality.val[audio.name]}

    def evaluate(model_, dataset, key):
        return _evaluate(model_, dataset, task_of[key])

    def accuracy(state, key):
        with torch.no_grad():
            model.load_state_dict(state, strict=False)
        return evaluate(model, test[key], key)

    tau_m = baselines.ties_vector(pool, ["old", "new"], run.profile.k)
    best, table = baselines.choose_on_validation(
        baselines.grid_points(alpha=run.profile.alphas, lam=run.profile.lams),
        lambda alpha, lam: baselines.mmer_weights(pool, ["old", "new"], tau_m, alpha, lam), model, pool, val, evaluate)
    mmer = baselines.score(model, pool, baselines.mmer_weights(pool, ["old", "new"], tau_m, best["alpha"], best["lam"]),
                           test, evaluate)
    rows = [
        {"model": "vision expert (before further tuning)", "old_task_acc": accuracy(old, "old"), "new_task_acc": float("nan")},
        {"model": "further-tuned on audio (sequential)", "old_task_acc": accuracy(new, "old"), "new_task_acc": accuracy(new, "new")},
        {"model": f"MMER over both task vectors (alpha={best['alpha']}, lam={best['lam']})", "old_task_acc": mmer["old"],
         "new_task_acc": mmer["new"]},
    ]
    return {"rows": rows, "grid": table, "choice": best}


# ---- the run loop and its outputs ---------------------------------------------------------------------

DEFAULT_METHODS = ["individual", "mmer_exact", "mmer_sparse", "mmer_compact", "mmer_controls", "task_arithmetic", "ties",
                   "dare_ties", "tall", "emr", "naive", "magmax", "ewc", "lwf", "replay", "lora", "mmer_lora", "joint"]
DEFAULT_STREAMS = ["modality", "split_fmnist", "forgetting"]
ROW_METHODS_EXCLUDED = {"mmer_controls"}  # results without an accuracy matrix


def run(profile: Profile, streams=DEFAULT_STREAMS, methods=None, seed: int = 0, out="results",
        cache=None, command: str | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) `methods` (default: DEFAULT_METHODS less the profile's skip list) on every stream and
    writes the tables and plots to `out`."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    cache = Path(cache or os.environ.get("MMER_CL_CACHE", Path.home() / ".cache" / "mmer_cl" / "runs"))
    bench = Run(profile, seed, cache / f"{profile.name}-seed{seed}", progress=progress)
    out = Path(out)
    prov = report.provenance(command)
    summaries = {}
    datasets = {}

    def data_of(name):
        if name not in datasets:
            datasets[name] = STREAMS[name](profile, seed)
        return datasets[name]

    for stream_name in streams:
        if stream_name == "forgetting":
            summaries["forgetting"] = bench.cached("forgetting/result", lambda: run_forgetting(bench, data_of("modality")))
            continue
        if stream_name not in STREAMS:
            raise ValueError(f"unknown stream {stream_name!r}; known: {sorted(STREAMS)} and forgetting")
        data = data_of(stream_name)
        chosen = [m for m in methods or DEFAULT_METHODS if stream_name in METHODS[m].streams
                  and (methods or f"{stream_name}/{m}" not in profile.skip)]
        results = {}
        for name in tqdm(chosen, desc=f"{stream_name}: methods", disable=not progress):
            results[name] = bench.cached(f"{stream_name}/{name}", lambda name=name: METHODS[name].fn(bench, data))
        summaries[stream_name] = results
    elapsed = time.perf_counter() - start
    write_outputs(out, prov, profile, summaries, {s: data_of(s).tasks for s in summaries if s in STREAMS}, elapsed, bench)
    return summaries


def _summary_table(results: dict, expert_accuracy) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        if name in ROW_METHODS_EXCLUDED:
            continue
        R = np.asarray(result["matrix"], dtype=float)
        joint = len(R) > 1 and bool(np.isnan(R[:-1]).all())
        row = {"method": name, "final_avg_acc": float(np.mean(R[-1])),
               "bwt": float("nan") if joint else metrics.backward_transfer(R),
               "avg_forgetting": float("nan") if joint else metrics.average_forgetting(R),
               "retention": float(np.mean(metrics.retention(R, expert_accuracy))) if expert_accuracy else float("nan")}
        storage = result["storage"]
        row["storage_total_mb"] = storage["total"] / 2**20
        for component in metrics.STORAGE_COMPONENTS:
            row[f"{component}_mb"] = storage[component] / 2**20
        row["fold_s"] = sum(result["fold_seconds"].values()) if "fold_seconds" in result else float("nan")
        row["method_s"] = result.get("seconds", float("nan"))
        row["peak_rss_mb"] = result.get("peak_rss_mb", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def _retention_table(results: dict, tasks, expert_accuracy) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        if name in ROW_METHODS_EXCLUDED:
            continue
        R = np.asarray(result["matrix"], dtype=float)
        row = {"method": name}
        for task, value, expert in zip(tasks, R[-1], expert_accuracy):
            row[f"{task}_acc"] = value
            row[f"{task}_retention"] = value / expert
        rows.append(row)
    return pd.DataFrame(rows)


def _grid_table(results: dict) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        hyper = result.get("hyper")
        if not hyper or "grid" not in hyper:
            continue
        for point in hyper["grid"]:
            params = {k: v for k, v in point.items() if not k.startswith("val")}
            rows.append({"method": name, "setting": ", ".join(f"{k}={v}" for k, v in params.items()),
                         "val_acc": point["val_acc"], "chosen": params == hyper["choice"]})
    return pd.DataFrame(rows)


def _mask_tables(results: dict, tasks) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    controls = results.get("mmer_controls")
    if controls is None:
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    a = controls["analyses"]
    rows, layers = [], []
    for task in tasks:
        d = a["density"][task]
        rows.append({"task": task, "density_raw": d["raw"], "density_effective": d["effective"],
                     **{f"recon_err_{k}": v for k, v in a["reconstruction_error"][task].items()},
                     **{f"test_acc_{k}": v[task] for k, v in controls["accuracy"].items()}})
        for layer, values in d["per_layer"].items():
            layers.append({"task": task, "layer": layer, "density_raw": values["raw"], "density_effective": values["effective"]})
    overlap = pd.DataFrame([{"pair": pair, "jaccard_where_tau_star_nonzero": v} for pair, v in a["overlap"].items()])
    return pd.DataFrame(rows), pd.DataFrame(layers), overlap


def _modes_table(results: dict, tasks) -> pd.DataFrame:
    rows = []
    for mode in ("exact", "sparse", "compact"):
        result = results.get(f"mmer_{mode}")
        if result is None:
            continue
        R = np.asarray(result["matrix"], dtype=float)
        row = {"mode": mode, "final_avg_acc": float(np.mean(R[-1])), "avg_forgetting": metrics.average_forgetting(R),
               "storage_total_mb": result["storage"]["total"] / 2**20,
               "tau_star_and_kept_vectors_mb": result["storage"]["shared_vectors"] / 2**20,
               "masks_mb": result["storage"]["masks"] / 2**20,
               "fold_s_total": sum(result["fold_seconds"].values()), "alpha": result["hyper"]["choice"]["alpha"],
               "lam": result["hyper"]["choice"]["lam"]}
        for task in tasks:
            row[f"recon_err_{task}"] = result["reconstruction_error"][task]
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(out: Path, prov: dict, profile: Profile, summaries: dict, tasks_by_stream: dict, elapsed: float,
                  bench: Run) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# mmer_cl benchmark, profile `{profile.name}`", "",
                *[f"- {line}" for line in report.provenance_lines(prov)],
                f"- wall time of this invocation: {elapsed / 60:.1f} min (results reused from the run folder are not re-timed; "
                f"each method's own time is `method_s`)",
                f"- profile: `{json.dumps(asdict(profile))}`", ""]
    sections += _targets(summaries)
    for stream_name, results in summaries.items():
        if stream_name == "forgetting":
            df = pd.DataFrame(results["rows"])
            title = "forgetting: vision expert fine-tuned further on audio"
            report.write_table(df, out, "forgetting", prov, title,
                               note=f"MMER's alpha and lam chosen on validation: {results['choice']}")
            sections.append(report.markdown_section(df, title))
            continue
        tasks = tasks_by_stream[stream_name]
        expert = results["individual"]["expert_accuracy"] if "individual" in results else None
        summary = _summary_table(results, expert)
        title = f"{stream_name}: final accuracy, BWT, forgetting, retention, storage, time"
        report.write_table(summary, out, f"{stream_name}_summary", prov, title)
        sections.append(report.markdown_section(summary, title))
        if expert:
            per_task = _retention_table(results, tasks, expert)
            title = f"{stream_name}: final accuracy and retention per task"
            report.write_table(per_task, out, f"{stream_name}_retention", prov, title)
            sections.append(report.markdown_section(per_task, title))
        matrices = {n: np.asarray(r["matrix"], dtype=float) for n, r in results.items() if n not in ROW_METHODS_EXCLUDED}
        long = pd.DataFrame([{"method": n, "after": tasks[t], "task": tasks[j], "acc": R[t, j]}
                             for n, R in matrices.items() for t in range(len(tasks)) for j in range(len(tasks))])
        report.write_table(long, out, f"{stream_name}_matrices", prov, f"{stream_name}: accuracy matrices R[after, task]")
        grids = _grid_table(results)
        if len(grids):
            report.write_table(grids, out, f"{stream_name}_grids", prov, f"{stream_name}: validation grids",
                               note="Mean validation accuracy with every task merged; the test split is never used.")
            sections.append(report.markdown_section(grids[grids["chosen"]], f"{stream_name}: settings chosen on validation "
                                                    f"(full grids in {stream_name}_grids.csv)"))
        masks, layers, overlap = _mask_tables(results, tasks)
        if len(masks):
            report.write_table(masks, out, f"{stream_name}_masks", prov, f"{stream_name}: mask analyses and controls")
            report.write_table(layers, out, f"{stream_name}_mask_layers", prov, f"{stream_name}: mask density per layer")
            report.write_table(overlap, out, f"{stream_name}_mask_overlap", prov, f"{stream_name}: pairwise mask overlap")
            sections.append(report.markdown_section(masks, f"{stream_name}: masks (density, reconstruction error, test accuracy "
                                                           f"of MMER's mask vs controls)"))
            sections.append(report.markdown_section(overlap, f"{stream_name}: pairwise mask overlap"))
        modes = _modes_table(results, tasks)
        if len(modes):
            report.write_table(modes, out, f"{stream_name}_modes", prov, f"{stream_name}: MMER state modes")
            sections.append(report.markdown_section(modes, f"{stream_name}: MMER exact / sparse / compact"))
        inferred = results.get("mmer_exact", {}).get("inferred")
        if inferred:
            final = np.asarray(results["mmer_exact"]["matrix"], dtype=float)[-1]
            df = pd.DataFrame([{"task": row["task"], "task_inference_rate": row["correct"] / max(row["total"], 1),
                                "acc_inferred_task": acc, "acc_given_task": final[j]}
                               for j, (row, acc) in enumerate(zip(inferred["task_inference"], inferred["accuracy"]))])
            title = f"{stream_name}: MMER without task labels (lowest-entropy routing)"
            report.write_table(df, out, f"{stream_name}_task_inference", prov, title)
            sections.append(report.markdown_section(df, title))
        report.plot_accuracy_matrices(matrices, tasks, out / f"{stream_name}_accuracy_matrices.png", prov,
                                      f"{stream_name}: R[after, task]")
        forgetting = summary.dropna(subset=["avg_forgetting"])
        report.plot_bars(dict(zip(forgetting["method"], forgetting["avg_forgetting"])), out / f"{stream_name}_forgetting.png",
                         prov, f"{stream_name}: average forgetting", "average forgetting")
        report.plot_accuracy_vs_storage(summary, out / f"{stream_name}_accuracy_vs_storage.png", prov,
                                        f"{stream_name}: accuracy vs storage")
    (out / "SUMMARY.md").write_text("\n".join(sections) + "\n")
    report.write_provenance(out, prov, extra=f"Run folder (cached experts and method results): {bench.dir}")


def _targets(summaries: dict) -> list[str]:
    lines = ["## Targets (issue 4)", ""]
    modality = summaries.get("modality", {})
    if {"individual", "mmer_exact"} <= set(modality):
        expert = modality["individual"]["expert_accuracy"]
        ret = {n: float(np.mean(metrics.retention(modality[n]["matrix"], expert)))
               for n in ("mmer_exact", "mmer_sparse", "mmer_compact", "ties", "task_arithmetic") if n in modality}
        ok = ret["mmer_exact"] >= 0.99 and all(ret["mmer_exact"] > ret[n] for n in ("ties", "task_arithmetic") if n in ret)
        lines.append("- modality stream, mean retention (target: MMER >= 0.99 and above TIES and TA): "
                     + ", ".join(f"{n} {v:.4f}" for n, v in ret.items()) + f" -> {'met' if ok else 'MISSED'}")
    fm = summaries.get("split_fmnist", {})
    if {"naive", "mmer_exact"} <= set(fm):
        f_mmer = metrics.average_forgetting(fm["mmer_exact"]["matrix"])
        f_naive = metrics.average_forgetting(fm["naive"]["matrix"])
        lines.append(f"- Split Fashion-MNIST average forgetting (target: MMER <= Naive / 5): MMER {f_mmer:.4f}, "
                     f"Naive {f_naive:.4f} -> {'met' if f_mmer <= f_naive / 5 else 'MISSED'}")
    return lines + [""]


# ---- CLI ----------------------------------------------------------------------------------------------


def _cmd_run(args) -> int:
    methods = None if args.methods is None else args.methods.split(",")
    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        raise SystemExit(f"mmer-cl run: unknown methods {unknown}; known: {', '.join(METHODS)}")
    streams = DEFAULT_STREAMS if args.stream is None else args.stream.split(",")
    unknown = [s for s in streams if s not in STREAMS and s != "forgetting"]
    if unknown:
        raise SystemExit(f"mmer-cl run: unknown streams {unknown}; known: {', '.join([*STREAMS, 'forgetting'])}")
    run(PROFILES[args.profile], streams=streams, methods=methods, seed=args.seed, out=args.out, cache=args.cache)
    print(f"results written to {args.out}/ (start with SUMMARY.md)")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run (or resume) the continual-learning benchmark; tables and plots to --out")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--stream", help=f"comma-separated streams (default: {','.join(DEFAULT_STREAMS)})")
    parser.add_argument("--methods", help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}, less the "
                                          "profile's skip list)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results", help="folder for tables and plots (default: results)")
    parser.add_argument("--cache", help="where run folders live (default: $MMER_CL_CACHE or ~/.cache/mmer_cl/runs)")
    parser.set_defaults(func=_cmd_run)
