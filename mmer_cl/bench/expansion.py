"""The expansion benchmark: the experts of the `aligned` stream (one per modality, all answering in the
backbone's shared answer space) combined without training, scored on mixed inputs (data.mixed).

Candidates from one MMER state (mmer_cl.expansion): union, merged (which is TIES's merged model), routed;
each at its alpha and lam chosen on the mixed validation sets only, and the choice among them made there too.
Baselines: NaiveMC (theta0 + the mean task vector, the paper's comparison), Task Arithmetic (alpha on mixed
validation), each single expert on its own part of the input, and late fusion (the sum of the single
experts' log-probabilities: an ensemble that keeps every expert).
"""

import numpy as np
import torch

from mmer_cl import analysis, decoupled, expansion, fold, store
from mmer_cl.bench.methods import experts_folder, grid, load_weights, new_model, refitting, task_name
from mmer_cl.bench.registry import method
from mmer_cl.bench.streams import DEGRADATION

BACKBONE = "model.backbone."


def backbone_of(weights: dict) -> dict:
    return {n.removeprefix(BACKBONE): t for n, t in weights.items() if n.startswith(BACKBONE)}


def with_all_experts(data, models_dir):
    """The stream's model with every task's private modules from its own expert, on theta0."""
    router = new_model(data)
    for t, spec in enumerate(data.specs):
        own = f"model.tasks.{spec.name}."
        router.load_state_dict({n: w for n, w in load_weights(models_dir / str(t)).items() if n.startswith(own)},
                               strict=False)
    return router.model.eval()


class Scorer:
    """Per-example correctness on every mixed set of a split, for the weights the model is given."""

    def __init__(self, model, data, split: str):
        self.model, self.sets = model, data.mixed[split]
        self.answers = data.specs[0].name  # every task names the same classes

    def correct(self, predictor) -> dict[str, list[int]]:
        out = {}
        for combo, mixed in self.sets.items():
            logits = expansion.mixed_logits(predictor(combo), mixed.batches(), self.answers)
            out[combo] = (logits.argmax(1) == mixed.targets).int().tolist()
        return out

    def with_backbone(self, weights_of_combo):
        """correct() with the model's backbone loaded from weights_of_combo(combo) (a backbone state dict)."""
        def predictor(combo):
            self.model.backbone.load_state_dict(weights_of_combo(combo))
            return self.model
        return self.correct(predictor)


def accuracy(correct: dict[str, list[int]]) -> float:
    return float(np.mean([np.mean(c) for c in correct.values()]))


def mmer_candidates(scorer, state_dir, tasks, combos, kinds=("union", "merged", "routed")) -> dict:
    """{candidate: correctness} of the MMER state as it stands: union (each combination's masks OR-ed),
    merged, routed."""
    merged = backbone_of(decoupled.combined_state_dict(state_dir, tasks, "merged"))
    out = {}
    if "union" in kinds:
        unions = {c: backbone_of(decoupled.combined_state_dict(state_dir, [tasks[m] for m in combos[c]], "union"))
                  for c in combos}
        out["union"] = scorer.with_backbone(lambda c: unions[c])
    if "merged" in kinds:
        out["merged"] = scorer.with_backbone(lambda c: merged)
    if "routed" in kinds:
        per_task = [backbone_of(decoupled.decoupled_state_dict(state_dir, task)) for task in tasks]
        routed = expansion.RoutedModel(scorer.model, list(scorer.model.config.tasks), per_task, merged)
        out["routed"] = scorer.correct(lambda c: routed)
    return out


def choose_mmer(run, val, test, state_dir, tasks, combos) -> dict:
    """Each candidate at its best (alpha, lam) on mixed validation, scored on test. `merged` does not depend
    on lam (it is TIES's merged model: theta0 + tau_star), so it is scored once per alpha."""
    p, scores = run.profile, {}
    for point in grid(alpha=p.alphas, lam=p.lams):
        fold.refit(state_dir, merge="ties", mask_rule="mmer", alpha=point["alpha"], lams=point["lam"])
        kinds = ("union", "merged", "routed") if point["lam"] == p.lams[0] else ("union", "routed")
        for candidate, correct in mmer_candidates(val, state_dir, tasks, combos, kinds).items():
            scores.setdefault(candidate, []).append({**point, "val_acc": accuracy(correct)})
    out = {}
    for candidate, table in scores.items():
        best = max(table, key=lambda row: row["val_acc"])
        fold.refit(state_dir, merge="ties", mask_rule="mmer", alpha=best["alpha"], lams=best["lam"])
        correct = mmer_candidates(test, state_dir, tasks, combos, (candidate,))[candidate]
        out[f"mmer_{candidate}"] = {"val_acc": best["val_acc"], "choice": {"alpha": best["alpha"], "lam": best["lam"]},
                                    "grid": table, "correct": correct}
    return out


def merge_baselines(run, val, test, state_dir, tasks) -> dict:
    """NaiveMC (theta0 + the mean task vector) and Task Arithmetic (alpha on mixed validation): merged
    weights, no masks. (TIES's merged model is mmer_merged.)"""
    out = {}
    for name, points in {"naive_mc": [1.0 / len(tasks)], "task_arithmetic": list(run.profile.ta_alphas)}.items():
        scored = []
        for alpha in points:
            fold.refit(state_dir, merge="task_arithmetic", mask_rule="none", alpha=alpha, lams=1.0)
            merged = backbone_of(decoupled.combined_state_dict(state_dir, tasks, "merged"))
            scored.append({"alpha": alpha, "val_acc": accuracy(val.with_backbone(lambda c: merged)),
                           "correct": test.with_backbone(lambda c: merged)})
        best = max(scored, key=lambda row: row["val_acc"])
        out[name] = {"val_acc": best["val_acc"], "choice": {"alpha": best["alpha"]}, "correct": best["correct"],
                     "grid": [{k: v for k, v in row.items() if k != "correct"} for row in scored]}
    return out


def single_experts(model, data, models_dir, split: str) -> dict:
    """{combo: {task: log-probabilities [n, classes]}}: each expert alone on its own part of each mixed input."""
    out = {combo: {} for combo in data.mixed[split]}
    for t, spec in enumerate(data.specs):
        model.backbone.load_state_dict(backbone_of(load_weights(models_dir / str(t))))
        with torch.no_grad():
            for combo, mixed in data.mixed[split].items():
                if spec.name in mixed.tasks:
                    out[combo][spec.name] = torch.cat([model(parts[spec.name], task=spec.name).log_softmax(1)
                                                       for parts in mixed.batches()])
    return out


def fusion_scores(logprobs: dict, data, split: str) -> dict:
    """Each single expert's correctness on its part, and late fusion (sum of the parts' log-probabilities)."""
    out = {}
    for combo, mixed in data.mixed[split].items():
        parts = logprobs[combo]
        for task, lp in parts.items():
            out.setdefault(f"single:{task}", {})[combo] = (lp.argmax(1) == mixed.targets).int().tolist()
        out.setdefault("late_fusion", {})[combo] = (sum(parts.values()).argmax(1) == mixed.targets).int().tolist()
    return out


@method("expansion", applies=lambda data: bool(getattr(data, "mixed", None)), needs=("experts",))
def run_expansion(run, data) -> dict:
    """Mixed-input accuracy of every candidate and baseline (module docstring), each chosen on validation."""
    folder = experts_folder(run, data)
    models_dir, state_dir = folder / "models", folder / "state"
    model = with_all_experts(data, models_dir)
    tasks = [task_name(t) for t in range(len(data.specs))]
    names = [spec.name for spec in data.specs]
    combos = {c: [names.index(task) for task in m.tasks] for c, m in data.mixed["val"].items()}
    val, test = Scorer(model, data, "val"), Scorer(model, data, "test")
    with refitting(state_dir):
        results = choose_mmer(run, val, test, state_dir, tasks, combos)
        sizes = analysis.storage_bytes(store.load(state_dir))  # an MMER state, masks and all
        results.update(merge_baselines(run, val, test, state_dir, tasks))
    singles = {split: fusion_scores(single_experts(model, data, models_dir, split), data, split)
               for split in ("val", "test")}
    for name, correct in singles["test"].items():
        results[name] = {"val_acc": accuracy(singles["val"][name]), "correct": correct}
    results["best_single"] = best_single(singles["val"], singles["test"], list(data.mixed["test"]))
    chosen = max((k for k in results if k.startswith("mmer_")), key=lambda k: results[k]["val_acc"])
    return {"methods": results, "mmer_choice": chosen, "storage": kept_bytes(results, sizes, data),
            "mixed": {c: {"test_examples": len(m), "classes": m.classes} for c, m in data.mixed["test"].items()},
            "degradation": dict(DEGRADATION)}


def kept_bytes(results: dict, sizes: dict, data) -> dict[str, int]:
    """What each method keeps beside theta0: MMER's union and routed a compact state (tau_star, packed masks,
    private modules); a merge (MMER's merged, NaiveMC, TA) one merged vector and the private modules; a single
    expert its backbone and its own private modules; late fusion and best_single every expert. `sizes`:
    analysis.storage_bytes of the MMER state."""
    backbone, private = sizes["base (referenced, not stored)"], sizes["private"]
    per_task = {spec.name: sum(v.numel() * v.element_size() for n, v in new_model(data).state_dict().items()
                               if n.startswith(f"model.tasks.{spec.name}.")) for spec in data.specs}
    out = {}
    for name in results:
        if name in ("mmer_union", "mmer_routed"):
            out[name] = sizes["tau_star"] + sizes["masks"] + private
        elif name in ("mmer_merged", "naive_mc", "task_arithmetic"):
            out[name] = sizes["tau_star"] + private
        elif name.startswith("single:"):
            out[name] = backbone + per_task[name.removeprefix("single:")]
        else:
            out[name] = len(data.specs) * backbone + private
    return out


def best_single(val_singles: dict, test_singles: dict, combos) -> dict:
    """Per combination, the single modality with the best validation accuracy, scored on test."""
    out, picks = {}, {}
    for combo in combos:
        scored = {n: np.mean(v[combo]) for n, v in val_singles.items() if n.startswith("single:") and combo in v}
        picks[combo] = max(scored, key=scored.get)
        out[combo] = test_singles[picks[combo]][combo]
    return {"val_acc": None, "choice": picks, "correct": out}
