"""The benchmark's methods, each a short function (run, data) -> Result, registered by name.

Every method sees the same experts, trained once per stream as Avalanche trains them: Naive with the experts'
recipe (glue.FineTuning) and MMERPlugin in an exact state, each experience fine-tuned from theta0 (`experts`).
Every merging method, MMER and the baselines alike, then runs as an Avalanche strategy through the same
plugin and the same fold: ExpertReplay hands the plugin each expert in turn, and R[t, j] is Avalanche's
accuracy on task j after experience t. Hyperparameters are chosen on the validation sets with all experts
merged (`choose`: a refit of the experts' exact state per grid point), never on test; each method keeps its
state in the mode its merge needs (TIES: trimmed vectors; Task Arithmetic, continual TIES, OPCM: tau_star
alone; EMR, TALL, DARE: every vector), so its storage is what it really keeps.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from tqdm.auto import tqdm

from mmer_cl import analysis, experts, fold, metrics, store
from mmer_cl.bench.glue import (ExpertReplay, FineTuning, LearningCurve, SampleCorrectness, SaveModels, TaskRouter,
                                avalanche_stream, optimizer_for)
from mmer_cl.bench.registry import method, stage
from mmer_cl.bench.runfolder import Result, write_json_atomic
from mmer_cl.checkpoints import Checkpoint
from mmer_cl.decoupled import TaskSwitcher
from mmer_cl.plugin import MMERPlugin
from mmer_cl.routing import GaussianRouter, entropy_router

ACCURACY = "Top1_Acc_Exp/eval_phase/{stream}/Task{label:03d}/Exp{exp:03d}"


# ---- shared pieces ----------------------------------------------------------------------------------


def accuracies(results: dict, labels, stream: str = "test_stream") -> list[float]:
    """Avalanche's accuracy on experiences j = 0, 1 ... of an evaluation, experience j under task label labels[j]."""
    return [results[ACCURACY.format(stream=stream, label=label, exp=j)] for j, label in enumerate(labels)]


def task_labelled(data) -> bool:
    """Whether test samples carry their task label (not class-incremental): what a method needs that picks a
    task's private modules by it."""
    return data.protocol == "task"


def new_model(data, device: str = "cpu", specs=None) -> TaskRouter:
    """The stream's model behind a TaskRouter over `specs` (default: every task's, task label t = specs[t])."""
    specs = data.specs if specs is None else specs
    return TaskRouter(data.model(specs), specs).to(device)


def shared_of(data):
    """The plugin sees the router's names (`model.` + the model's own)."""
    return lambda name: data.shared(name.removeprefix("model."))


def task_name(t: int) -> str:
    return f"exp{t:03d}"  # how MMERPlugin names the task folded from experience t


def evaluate(model: TaskRouter, dataset, spec) -> float:
    return float(experts.evaluate(model.model, dataset, spec.name, batch_size=128))


def epochs_for(data, experience) -> int:
    """Passes over an experience that give about the experts' steps per task."""
    return max(1, round(data.steps * data.batch_size / len(experience.dataset)))


def refitting(state_dir: Path):
    """Holds a state's writer lock while a method refits it and reads what the refit made: methods that share
    the experts' state (Ray tasks side by side) take turns. Re-entrant, so fold.refit inside proceeds."""
    return store.lock(state_dir, wait=float("inf"))


def nan_matrix(T: int) -> np.ndarray:
    return np.full((T, T), np.nan)


def load_weights(folder: Path) -> dict:
    ckpt = Checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.names}


def model_storage(model: nn.Module, data, *extra_components) -> tuple[int, int]:
    """(shared bytes, private bytes) of a model's parameters."""
    state = model.state_dict()
    shared = shared_of(data)
    return (metrics.nbytes({n: t for n, t in state.items() if shared(n)}),
            metrics.nbytes({n: t for n, t in state.items() if not shared(n)}))


def state_storage(state_dir: Path) -> dict:
    """What a state keeps, and its router's statistics if the plugin saved a feature router beside it."""
    sizes = analysis.storage_bytes(store.load(state_dir))
    router = state_dir / "router"
    return metrics.storage(base=sizes["base (referenced, not stored)"], shared_vectors=sizes["tau_star"] + sizes["kept vectors"],
                           masks=sizes["masks"], private=sizes["private"],
                           router=metrics.nbytes(router) if router.exists() else 0)


# ---- the experts ------------------------------------------------------------------------------------


CURVE_POINTS = 10  # evaluations of each expert during its training, for its learning curve


@stage("experts")
def experts_folder(run, data) -> Path:
    """One expert per task, as Avalanche trains it (module docstring): `models/<t>/` the trained weights,
    `state/` their exact MMER state (theta0 and every task vector), `curves.json` each expert's validation and
    test accuracy on its own task during its training (glue.LearningCurve)."""
    def build(folder: Path):
        torch.manual_seed(run.seed)
        model = new_model(data, run.device)
        curve = LearningCurve(lambda t, split: evaluate(model, getattr(data, split)[data.specs[t].name], data.specs[t]),
                              every=max(1, data.steps // CURVE_POINTS))
        plugins = [FineTuning(), curve, SaveModels(folder / "models"),
                   MMERPlugin(folder / "state", mode="exact", shared=shared_of(data))]
        strategy = _naive(model, data, plugins, device=run.device)
        for experience in tqdm(avalanche_stream(data.specs, data.train, data.test).train_stream,
                               desc=f"{data.name}: experts", disable=not run.progress):
            strategy.train_epochs = epochs_for(data, experience)
            strategy.train(experience)
        write_json_atomic(folder / "curves.json", [{**row, "task": data.specs[row["task"]].name} for row in curve.rows])
    return run.artifact(data, "experts", build)


def _naive(model, data, plugins, strategy=None, **kwargs):
    from avalanche.training import Naive

    return (strategy or Naive)(model=model, optimizer=optimizer_for(model, shared_of(data)), criterion=nn.CrossEntropyLoss(),
                               train_mb_size=data.batch_size, eval_mb_size=128, plugins=plugins, evaluator=None, **kwargs)


def exact_state_of(run, data, models: Path, name: str) -> Path:
    """An exact state of saved models (sequential fine-tunes, merged LoRA experts), for refits."""
    return run.artifact(data, name, lambda folder: replay(data, models, folder / "state", dict(mode="exact"),
                                                          evaluate_each=False, device=run.device))


# ---- merging methods through MMERPlugin -------------------------------------------------------------


def replay(data, models: Path, state_dir: Path, settings: dict, lam=1.0, evaluate_each: bool = True,
           infer_task: bool = False, router=entropy_router, device: str = "cpu"):
    """ExpertReplay + MMERPlugin over the saved models: (R, the plugin, per-sample correctness); R[t, j] is
    Avalanche's accuracy on task j after the fold of experience t. The router only matters with infer_task."""
    shutil.rmtree(state_dir, ignore_errors=True)
    plugin = MMERPlugin(state_dir, lam=lam, shared=shared_of(data), infer_task=infer_task, router=router, **settings)
    correctness = SampleCorrectness()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = ExpertReplay(model=new_model(data, device), load=lambda t: load_weights(models / str(t)),
                            plugins=[plugin, correctness], evaluator=evaluator, eval_mb_size=128, device=device)
    bm = avalanche_stream(data.specs, data.train, data.test)
    R = nan_matrix(len(data.specs))
    for t, experience in enumerate(bm.train_stream):
        strategy.train(experience)
        if evaluate_each:
            results = strategy.eval(bm.test_stream[: t + 1])
            R[t, : t + 1] = accuracies(results, range(t + 1))
    return R, plugin, correctness


def final_correct(correctness: SampleCorrectness, data) -> dict:
    """{"correct": [task][sample] 0/1} of the evaluation after the last experience, for paired intervals."""
    return {"correct": [correctness.correct[t] for t in range(len(data.specs))]}


def score_state(model: TaskRouter, state_dir: Path, data, sets: dict) -> dict[str, float]:
    """Each task's accuracy on sets[task] with the state's decoupled weights."""
    switcher = TaskSwitcher(model, state_dir)
    out = {}
    for t, spec in enumerate(data.specs):
        switcher.switch(task_name(t))
        out[spec.name] = evaluate(model, sets[spec.name], spec)
    return out


def choose(run, data, name: str, state_dir: Path, settings: dict, grid: list[dict], per_task_lam: bool = False) -> dict:
    """The grid point with the best mean validation accuracy, all experts merged (a refit of their exact state
    per point; the test split is never read). per_task_lam: each task's lam on its own validation accuracy
    (a task's model depends on its own lam alone when tau_star does not depend on lam, as in TALL)."""
    refit = {k: v for k, v in settings.items() if k != "mode"}  # the experts' state is exact, whatever the method's

    def compute():
        model, table = new_model(data, run.device), []
        for point in grid:
            lam = point.get("lam", 1.0)
            fold.refit(state_dir, lams=lam, **{**refit, **{k: v for k, v in point.items() if k != "lam"}})
            accs = score_state(model, state_dir, data, data.val)
            table.append({**point, "val_acc": float(np.mean(list(accs.values()))), **{f"val_{t}": a for t, a in accs.items()}})
        best = dict(grid[max(range(len(table)), key=lambda i: (table[i]["val_acc"], -i))])
        if per_task_lam:
            best["lam"] = {task_name(t): max(table, key=lambda row: row[f"val_{spec.name}"])["lam"]
                           for t, spec in enumerate(data.specs)}
        return {"choice": best, "grid": table}
    with refitting(state_dir):
        return run.cached(data, f"grid_{name}", compute, settings=(settings, grid, per_task_lam))


def merging_method(run, data, name: str, settings: dict, grid: list[dict], *, models="full", per_task_lam=False) -> Result:
    """`settings` chosen on `grid` (validation), then the merge as a continual method: R, storage, choice."""
    models_dir, exact = models_and_state(run, data, models)
    chosen = choose(run, data, name, exact, settings, grid, per_task_lam) if grid else {"choice": {}, "grid": []}
    point = dict(chosen["choice"])
    lam = point.pop("lam", 1.0)
    state_dir = run.dir / data.name / f"state-{name}"
    R, plugin, correctness = replay(data, models_dir, state_dir, {**settings, **point}, lam=lam, device=run.device)
    state = store.load(state_dir)
    with refitting(exact):  # its task vectors, not being rewritten by another method's refit
        errors = analysis.reconstruction_errors(state, store.load(exact))
    result = Result(R, state_storage(state_dir), {
        "hyper": chosen, "settings": state.manifest["settings"], "lam": [t["lam"] for t in state.tasks],
        "fold_seconds": plugin.fold_seconds, **final_correct(correctness, data), "reconstruction_error": errors})
    shutil.rmtree(state_dir)  # measured: a run keeps its experts, not every method's state (GBs each)
    return result


def models_and_state(run, data, kind: str) -> tuple[Path, Path]:
    """(saved models, their exact state): the experts, Naive's sequential fine-tunes, or the LoRA experts."""
    if kind == "full":
        folder = experts_folder(run, data)
        return folder / "models", folder / "state"
    models = {"naive": lambda: naive_models(run, data), "lora": lambda: lora_experts(run, data) / "merged"}[kind]()
    return models, exact_state_of(run, data, models, f"{kind}-state") / "state"


def grid(**axes) -> list[dict]:
    import itertools

    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


MODELS_NEED = {"full": "experts", "naive": "naive", "lora": "lora_experts"}  # what models_and_state reuses


def _register_merging():
    p = None  # the profile is read when the method runs

    def register(name, settings, axes, **options):
        method(name, applies=options.pop("applies", task_labelled), needs=(MODELS_NEED[options.get("models", "full")],))(
            lambda run, data: merging_method(run, data, name, settings(run) if callable(settings) else settings,
                                             grid(**axes(run.profile)), **options))

    for mode in ("exact", "sparse", "compact"):
        register(f"mmer_{mode}", dict(merge="ties", mask_rule="mmer", mode=mode),
                 lambda p: dict(alpha=p.alphas, lam=p.lams))
    register("ties", dict(merge="ties", mask_rule="none", mode="sparse"), lambda p: dict(alpha=p.alphas))
    register("dare_ties", lambda run: dict(merge="dare_ties", mask_rule="none", mode="exact", p=0.5, seed=run.seed),
             lambda p: dict(alpha=p.alphas))
    register("task_arithmetic", dict(merge="task_arithmetic", mask_rule="none", mode="compact"),
             lambda p: dict(alpha=p.ta_alphas))
    register("tall", dict(merge="task_arithmetic", mask_rule="tall", mode="exact", alpha=1.0),
             lambda p: dict(lam=p.tall_lams), per_task_lam=True)
    register("emr", dict(merge="emr", mask_rule="emr", mode="exact"), lambda p: {})
    register("continual_ties", dict(merge="continual_ties", mask_rule="none", mode="compact"), lambda p: dict(alpha=p.alphas))
    register("opcm", dict(merge="opcm", mask_rule="none", mode="compact"), lambda p: dict(energy=p.energies))
    register("magmax", dict(merge="magmax", mask_rule="none", mode="exact"), lambda p: dict(alpha=p.alphas), models="naive")
    register("mmer_lora", dict(merge="ties", mask_rule="mmer", mode="compact"), lambda p: dict(alpha=p.alphas, lam=p.lams),
             models="lora", applies=lambda data: data.new_model is None and task_labelled(data))
    del p


_register_merging()


@method("individual", needs=("experts",))
def run_individual(run, data) -> Result:
    """Upper bound: task j's own expert, one full copy per task."""
    folder, model = experts_folder(run, data), new_model(data, run.device)
    accs = []
    for t, spec in enumerate(data.specs):
        model.load_state_dict(load_weights(folder / "models" / str(t)), strict=False)
        accs.append(evaluate(model, data.test[spec.name], spec))
    R = np.tril(np.tile(accs, (len(accs), 1)))
    R[np.triu_indices(len(accs), 1)] = np.nan
    base, private = model_storage(model, data)
    return Result(R, metrics.storage(base=base, shared_vectors=len(accs) * base, private=private),
                  {"expert_accuracy": accs, "learning_curves": json.loads((folder / "curves.json").read_text())})


@method("mmer_controls", applies=task_labelled, needs=("experts",))
def run_mmer_controls(run, data) -> dict:
    """Mask analyses and controls at MMER's chosen settings, all experts merged: MMER's masks against a random
    mask of the same effective density, the sign-agreement mask, and no mask (TIES)."""
    state_dir = experts_folder(run, data) / "state"
    with refitting(state_dir):
        return mask_controls(run, data, state_dir)


def mask_controls(run, data, state_dir: Path) -> dict:
    settings = dict(merge="ties", mask_rule="mmer", mode="exact")
    p = run.profile
    choice = choose(run, data, "mmer_exact", state_dir, settings, grid(alpha=p.alphas, lam=p.lams))["choice"]
    model, alpha, lam = new_model(data, run.device), choice["alpha"], choice["lam"]
    fold.refit(state_dir, lams=lam, alpha=alpha, **{k: v for k, v in settings.items() if k != "mode"})
    state = store.load(state_dir)
    densities = analysis.densities(state)
    out = {"analyses": {"density": {spec.name: d for spec, d in zip(data.specs, densities)},
                        "overlap": analysis.overlaps(state),
                        "reconstruction_error": {"mmer": analysis.reconstruction_errors(state)}},
           "accuracy": {"mmer": score_state(model, state_dir, data, data.test)}, "alpha": alpha, "lam": lam}
    controls = {"random_mask": dict(mask_rule="random", lams=[d["effective"] for d in densities], seed=run.seed),
                "sign_mask": dict(mask_rule="sign", lams=lam), "ties_no_mask": dict(mask_rule="none", lams=lam)}
    for control, changes in controls.items():
        fold.refit(state_dir, alpha=alpha, merge="ties", **changes)
        out["accuracy"][control] = score_state(model, state_dir, data, data.test)
        out["analyses"]["reconstruction_error"][control] = analysis.reconstruction_errors(store.load(state_dir))
    return out


# ---- Avalanche's strategies, LoRA, joint training -------------------------------------------------------


def naive_models(run, data) -> Path:
    run.cached(data, "naive", lambda: avalanche_method(run, data, "naive"))
    return run.dir / data.name / "naive-models"


def avalanche_method(run, data, name: str):
    """An Avalanche baseline with its options chosen on validation: each point of its grid trained once
    (baselines.settings_grid), the one with the best mean validation accuracy after the last experience kept."""
    from mmer_cl.bench import baselines

    points = baselines.settings_grid(name, run.profile)
    if len(points) == 1:
        return train_baseline(run, data, name, points[0]).to_json()
    runs = [run.cached(data, f"grid_{name}_{i}", lambda point=point: train_baseline(run, data, name, point),
                       settings=point) for i, point in enumerate(points)]
    best = max(range(len(runs)), key=lambda i: (runs[i]["val_acc"], -i))
    grid_rows = [{**point, "val_acc": r["val_acc"]} for point, r in zip(points, runs)]
    return {**{k: v for k, v in runs[best].items() if k != "key"}, "hyper": {"choice": points[best], "grid": grid_rows},
            "seconds": sum(r["seconds"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def train_baseline(run, data, name: str, options: dict) -> Result:
    """A real Avalanche strategy on one model, with the experts' recipe and about their steps per experience:
    a head per task (task-incremental) or one head that every experience shares under task label 0
    (class-incremental, StreamData.learner_labels); R on test after each experience, and the mean validation
    accuracy after the last one. Naive also saves its sequential fine-tunes (for MagMax)."""
    from avalanche.training import EWC, LwF, Naive, Replay

    from mmer_cl.bench import baselines

    torch.manual_seed(run.seed)
    model = new_model(data, run.device, data.learner_specs)
    correctness = SampleCorrectness()
    scale = {t: data.shared_lr_scale[spec.name] for t, spec in enumerate(data.specs) if spec.name in data.shared_lr_scale}
    plugins = [FineTuning(scale), correctness]
    if name == "naive":
        shutil.rmtree(run.dir / data.name / "naive-models", ignore_errors=True)
        plugins.append(SaveModels(run.dir / data.name / "naive-models"))
    strategy_cls, fixed = {"naive": (Naive, {}), "ewc": (EWC, {}), "lwf": (LwF, {}),
                           "replay": (Replay, {"mem_size": baselines.REPLAY_MEM_PER_TASK * len(data.specs)})}[name]
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = strategy_cls(model=model, optimizer=optimizer_for(model, shared_of(data)), criterion=nn.CrossEntropyLoss(),
                            train_mb_size=data.batch_size, eval_mb_size=128, plugins=plugins, evaluator=evaluator,
                            device=run.device, **fixed, **options)
    labels = data.learner_labels
    bm = avalanche_stream(data.specs, data.train, data.test, labels, val=data.val)
    R = nan_matrix(len(data.specs))
    for t, experience in enumerate(tqdm(bm.train_stream, desc=f"{data.name}/{name} {options}", disable=not run.progress)):
        strategy.train_epochs = epochs_for(data, experience)
        strategy.train(experience)
        if t == len(data.specs) - 1:  # validation first: the per-sample scores kept are the last test ones
            val_acc = float(np.mean(accuracies(strategy.eval(bm.val_stream), labels, "val_stream")))
        R[t, : t + 1] = accuracies(strategy.eval(bm.test_stream[: t + 1]), labels[: t + 1])
    base, private = model_storage(model, data)
    kept = baselines.kept_state(strategy)
    return Result(R, metrics.storage(base=base, private=private, shared_vectors=metrics.nbytes(kept["vectors"]),
                                     buffer=metrics.nbytes(kept["buffer"])),
                  {"options": options, "val_acc": val_acc, **final_correct(correctness, data)})


for _name in ("naive", "ewc", "lwf", "replay"):
    method(_name)(lambda run, data, _name=_name: avalanche_method(run, data, _name))


@stage("lora_experts")
def lora_experts(run, data) -> Path:
    """One PEFT LoRA adapter per task on the frozen base (experts.train_expert, mode lora): `adapters/<t>/`
    the adapter folders, `merged/<t>/` theta0 + (alpha/r) B A with the router's names."""
    from mmer_cl import checkpoints, models

    def build(folder: Path):
        for t, spec in enumerate(data.specs):
            expert, _ = experts.train_expert(spec.name, spec.modality, (data.train[spec.name], data.val[spec.name]),
                                             mode="lora", steps=data.steps, seed=run.seed, batch_size=data.batch_size,
                                             num_classes=spec.num_classes, progress=run.progress, device=run.device)
            expert.save_pretrained(folder / "adapters" / str(t))
            merged = models.merge_lora(expert).state_dict()
            checkpoints.save(folder / "merged" / str(t), {f"model.{n}": v for n, v in merged.items()})
    return run.artifact(data, "lora-experts", build)


@method("lora", applies=lambda data: data.new_model is None and task_labelled(data), needs=("lora_experts",))
def run_lora(run, data) -> Result:
    """One LoRA adapter per task, routed by task; storage = the adapters' own bytes."""
    folder = lora_experts(run, data)
    model = new_model(data, run.device)
    accs, adapters, private = [], 0, 0
    for t, spec in enumerate(data.specs):
        model.load_state_dict(load_weights(folder / "merged" / str(t)), strict=False)
        accs.append(evaluate(model, data.test[spec.name], spec))
        weights = Checkpoint([folder / "adapters" / str(t) / "adapter_model.safetensors"])
        adapters += sum(i.stop - i.start for n, i in weights.info.items() if ".lora_" in n)
        private += sum(i.stop - i.start for n, i in weights.info.items() if ".lora_" not in n)
    R = np.tril(np.tile(accs, (len(accs), 1)))
    R[np.triu_indices(len(accs), 1)] = np.nan
    base, _ = model_storage(model, data)
    return Result(R, metrics.storage(base=base, adapters=adapters, private=private))


@method("joint")
def run_joint(run, data) -> Result:
    """Upper bound: one model trained on all tasks at once (T x steps steps: round-robin over the tasks' own
    modules, or, class-incremental, batches of every task's data mixed through the one shared head); only the
    final row of R exists, so BWT and forgetting are not defined for it."""
    from mmer_cl.bench import baselines

    specs, train = data.learner_specs, data.train
    if not task_labelled(data):
        train = {specs[0].name: torch.utils.data.ConcatDataset([data.train[task] for task in data.tasks])}
    model = data.model(specs).to(run.device)
    steps = data.steps * len(data.specs)
    with tqdm(total=steps, desc=f"{data.name}/joint", disable=not run.progress) as bar:
        baselines.train_joint(model, specs, train, steps=steps, batch_size=data.batch_size, seed=run.seed,
                              shared=data.shared, progress=bar)
    router = TaskRouter(model, specs)
    R = nan_matrix(len(data.specs))
    R[-1] = [evaluate(router, data.test[task], specs[label]) for task, label in zip(data.tasks, data.learner_labels)]
    base, private = model_storage(router, data)
    return Result(R, metrics.storage(base=base, private=private))


ROUTED = dict(applies=lambda data: len(data.specs) > 1 and len({s.modality for s in data.specs}) == 1, needs=("experts",))


def routed(run, data, name: str, router) -> Result:
    """MMER (exact, settings chosen as mmer_exact's) with no task label at test: each sample routed among all
    folded tasks by `router`; the routing confusion kept. For streams of one modality (an input of another
    modality names its task by itself). Class-incremental, every task's head answers over the whole label space,
    so a sample routed to the wrong task is scored by that task's answer against its own label: right only if
    the wrong task's model names the right class (never half the time, as a 0/1 label would)."""
    models_dir, exact = models_and_state(run, data, "full")
    p = run.profile
    settings = dict(merge="ties", mask_rule="mmer", mode="exact")
    point = dict(choose(run, data, "mmer_exact", exact, settings, grid(alpha=p.alphas, lam=p.lams))["choice"])
    lam = point.pop("lam", 1.0)
    state_dir = run.dir / data.name / f"state-{name}"
    R, plugin, correctness = replay(data, models_dir, state_dir, {**settings, **point}, lam=lam, infer_task=True,
                                    router=router, device=run.device)
    storage = state_storage(state_dir)
    shutil.rmtree(state_dir)
    confusion = [[0] * len(data.specs) for _ in data.specs]
    for entry in plugin.routing[-len(data.specs):]:  # the evaluation after the last experience
        for task, count in zip(entry["candidates"], entry["chosen"]):
            confusion[entry["experience"]][int(task[3:])] += count
    return Result(R, storage, {"routing_confusion": confusion, **final_correct(correctness, data)})


@method("mmer_routed", **ROUTED)
def run_mmer_routed(run, data) -> Result:
    """Routed by class-conditional Gaussians in theta0's pooled features (routing.GaussianRouter), the first
    task's private encoder reading every input."""
    return routed(run, data, "mmer_routed", GaussianRouter(features=lambda model, x, label: model.features(x, label)))


@method("mmer_routed_entropy", **ROUTED)
def run_mmer_routed_entropy(run, data) -> Result:
    """Routed by the lowest predictive entropy among the tasks' decoupled models (the baseline router)."""
    return routed(run, data, "mmer_routed_entropy", entropy_router)


@method("forgetting", applies=lambda data: "forgetting" in (data.methods or ()), needs=("naive",))
def run_forgetting(run, data) -> dict:
    """Task A fine-tuned from theta0, then further on task B from there (Naive's sequential models), against
    MMER over tau_A = theta_A - theta0 and tau_B = theta_B - theta0, alpha and lam chosen on validation:
    old- and new-task test accuracy of each."""
    models = naive_models(run, data)
    exact = exact_state_of(run, data, models, "sequential-state") / "state"
    p = run.profile
    settings = dict(merge="ties", mask_rule="mmer", mode="exact")
    choice = choose(run, data, "mmer", exact, settings, grid(alpha=p.alphas, lam=p.lams))
    point = dict(choice["choice"])
    lam = point.pop("lam")
    with refitting(exact):
        fold.refit(exact, lams=lam, **{k: v for k, v in settings.items() if k != "mode"}, **point)
        model, (old, new) = new_model(data, run.device), data.specs
        mmer = score_state(model, exact, data, data.test)
    rows = []
    for label, t in (("A: fine-tuned on the old task", 0), ("B: then further on the new task (sequential)", 1)):
        model.load_state_dict(load_weights(models / str(t)), strict=False)
        rows.append({"model": label, "old_task_acc": evaluate(model, data.test[old.name], old),
                     "new_task_acc": evaluate(model, data.test[new.name], new) if t else float("nan")})
    rows.append({"model": f"MMER over tau_A and tau_B ({point}, lam={lam})", "old_task_acc": mmer[old.name],
                 "new_task_acc": mmer[new.name]})
    return {"rows": rows, "grid": choice["grid"], "choice": choice["choice"], "tasks": [old.name, new.name]}
