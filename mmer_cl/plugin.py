"""MMER as an Avalanche plugin: add it to the strategy you already run, as EWC is added.

    strategy = Naive(model, optimizer, criterion, ..., plugins=[MMERPlugin("state")], evaluator=...)
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)

What the plugin does around the strategy's own training (which every metric, logger and plugin still sees):
- theta0 is the model's weights when the first experience starts; its shared parameters (every float
  parameter that exists then, but the per-task heads of a MultiHeadClassifier, or those `shared(name)`
  selects) are saved in `<state>/theta0`;
- before each training experience the shared parameters go back to theta0 and the optimizer state is
  cleared, so each experience fine-tunes an expert from theta0;
- after it, the trained model is folded into the state as a new task (tau = theta - theta0 over the shared
  parameters; whatever else the experience changed is that task's private parameters), with fresh masks for
  every task (fold.fold); the model is left on the new task's decoupled weights;
- before each evaluation experience the model carries that experience's decoupled weights, theta0 +
  r_t * m_t * tau_star: by task label when one folded task has that label; per sample, by a router
  (mmer_cl.routing), when several share the label (class-incremental streams) or with `infer_task`; theta0
  for a label no task has yet. The weights from before the evaluation are restored after it. A periodic
  evaluation during training (Avalanche's eval_every) sees the model being trained, as it is.
- a feature router (routing.GaussianRouter) is fitted after each training experience on a support set of it,
  in theta0's features, and saved in `<state>/router`.
"""

import dataclasses
import shutil
import time
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, avalanche_forward
from torch import Tensor

from mmer_cl import checkpoints, decoupled, fold, store
from mmer_cl.routing import GaussianRouter

MASKED_LOGIT = -1e4


class MMERPlugin(SupervisedPlugin):
    """Folds each experience's trained model into an MMER state and evaluates on decoupled weights.

    state_dir: where the state lives (a new or empty folder; theta0 is kept inside it).
    mode, k, alpha, lam and **settings (merge, mask_rule, p, energy, seed, trim): the fold's settings
    (fold.Settings); lam may be {task: lam}, tasks named exp000, exp001 ... by experience.
    shared: name -> bool, which parameters are shared (default: see the module docstring).
    infer_task: route every evaluation sample among all folded tasks, ignoring task labels.
    router: how a sample without a telling task label picks its task: a feature router with fit(task, features,
    targets), route(features, tasks), features(model, x, task_label) and support (default: routing.GaussianRouter(),
    fitted at theta0 with the first task's label), or a function outputs [C][B, classes] -> chosen candidate [B]
    (routing.entropy_router). A feature router that cannot be fitted (say, no classifier to take features
    from) stops the run only when a sample needs routing.
    """

    def __init__(self, state_dir, mode: str = "compact", k: float = 0.2, alpha: float = 1.0, lam=1.0, *,
                 shared=None, infer_task: bool = False, router=None, progress: bool = False, **settings):
        super().__init__()
        self.state_dir = Path(state_dir)
        self.settings = fold.Settings(mode=mode, k=k, alpha=alpha, **settings).check()
        self.lam, self.shared, self.infer_task, self.progress = lam, shared, infer_task, progress
        self.router = GaussianRouter() if router is None else router
        self._router_error: Exception | None = None
        self.theta0: dict[str, Tensor] | None = None
        self.tasks: list[dict] = []  # per folded task: name, task label, experience
        self.fold_seconds: dict[str, float] = {}
        self.routing: list[dict] = []  # per routed evaluation experience: counts of the chosen tasks
        self._switcher: decoupled.TaskSwitcher | None = None
        self._saved: dict[str, Tensor] | None = None
        self._training = False
        self._routed: list | None = None

    # ---- training ------------------------------------------------------------------------------------

    def shared_names(self, model: torch.nn.Module) -> list[str]:
        if self.shared is not None:
            return [n for n, p in model.named_parameters() if self.shared(n)]
        heads = [f"{name}." for name, module in model.named_modules() if isinstance(module, MultiHeadClassifier)]
        return [n for n, p in model.named_parameters() if p.is_floating_point() and not n.startswith(tuple(heads))]

    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        params = dict(model.named_parameters())
        if self.theta0 is None:
            self.theta0 = {n: params[n].detach().clone() for n in self.shared_names(model)}
            with store.lock(self.state_dir, create=True):
                existing = store.read_manifest(self.state_dir)
                if existing is not None:
                    raise store.StateError(f"{self.state_dir} already holds an MMER state (tasks "
                                           f"{[t['name'] for t in existing['tasks']]}); give MMERPlugin a new folder")
                shutil.rmtree(self.state_dir / "theta0", ignore_errors=True)
                checkpoints.save(self.state_dir / "theta0", self.theta0)
        else:
            self._check_shapes(params)
            for name, value in self.theta0.items():
                params[name].copy_(value)
        strategy.optimizer.state.clear()
        self._start = {n: t.detach().clone() for n, t in model.state_dict().items() if n not in self.theta0}
        self._training = True

    def _check_shapes(self, tensors: dict) -> None:
        for name, value in self.theta0.items():
            if name not in tensors or tensors[name].shape != value.shape:
                now = tuple(tensors[name].shape) if name in tensors else "gone"
                raise ValueError(f"shared parameter '{name}' changed shape from {tuple(value.shape)} to {now}: MMER "
                                 f"merges parameters of fixed shapes; use a fixed-size head, or mark it private with "
                                 f"shared=...")

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        self._training = False
        model, experience = strategy.model, strategy.experience
        state = model.state_dict()
        self._check_shapes(state)
        changed = {n: t for n, t in state.items() if n not in self.theta0 and (
            n not in self._start or self._start[n].shape != t.shape or not torch.equal(self._start[n], t))}
        labels = list(getattr(experience, "task_labels", [0]))
        task = {"name": f"exp{experience.current_experience:03d}", "label": int(labels[0]),
                "experience": int(experience.current_experience)}
        lam = self.lam.get(task["name"], 1.0) if isinstance(self.lam, dict) else self.lam
        start = time.perf_counter()
        on_cpu = {n: t.cpu() for n, t in {**{n: state[n] for n in self.theta0}, **changed}.items()}  # a no-op on CPU
        fold.fold(self.state_dir, on_cpu, task["name"],
                  base=self.state_dir / "theta0", lam=lam, meta={"task_label": task["label"],
                  "experience": task["experience"]}, progress=self.progress, allow_extra=True,
                  **dataclasses.asdict(self.settings))
        self.fold_seconds[task["name"]] = time.perf_counter() - start
        self.tasks.append(task)
        self._switcher = decoupled.TaskSwitcher(model, self.state_dir)
        if hasattr(self.router, "fit") and self._router_error is None:
            try:
                self._fit_router(strategy, task["name"])
            except ValueError as error:  # raised when a sample needs routing, if one ever does
                self._router_error = error
        self._switcher.switch(task["name"])

    def _theta0_features(self, strategy, batches) -> list[Tensor]:
        """The feature router's features of each batch, at theta0 with the first task's private parameters, in
        eval mode (no dropout: the support set after training and the test samples see the same function)."""
        model, training = strategy.model, strategy.model.training
        self._switcher.switch(self.tasks[0]["name"])
        self._switcher.to_base()
        model.eval()
        try:
            return [self.router.features(model, batch[0].to(strategy.device), self.tasks[0]["label"])
                    for batch in batches]
        finally:
            model.train(training)

    def _fit_router(self, strategy, task: str) -> None:
        dataset = strategy.experience.dataset.eval()
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: self.router.support]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order.tolist()),
                                             batch_size=strategy.eval_mb_size)
        batches = list(loader)
        features = self._theta0_features(strategy, batches)
        self.router.fit(task, torch.cat(features), torch.cat([torch.as_tensor(b[1]) for b in batches]))
        self.router.save(self.state_dir / "router")

    # ---- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def before_eval(self, strategy, **kwargs):
        self._saved = {n: t.detach().clone() for n, t in strategy.model.state_dict().items()}

    @torch.no_grad()
    def after_eval(self, strategy, **kwargs):
        current = strategy.model.state_dict()
        for name, value in self._saved.items():
            if name in current and current[name].shape == value.shape:
                current[name].copy_(value)
        self._saved = None

    @torch.no_grad()
    def before_eval_exp(self, strategy, **kwargs):
        self._routed = None
        if not self.tasks or self._training:  # a periodic evaluation during training sees the model in training
            return
        label = int(list(getattr(strategy.experience, "task_labels", [0]))[0])
        candidates = self.tasks if self.infer_task else [t for t in self.tasks if t["label"] == label]
        if not candidates:  # a task not folded yet: theta0 (its private modules stay untrained)
            self._switcher.to_base()
        elif len(candidates) == 1:
            self._switcher.switch(candidates[0]["name"])
        else:
            if self._router_error is not None:
                raise ValueError(f"experience {strategy.experience.current_experience} needs routing among "
                                 f"{[t['name'] for t in candidates]}, and the router could not be fitted: "
                                 f"{self._router_error}") from self._router_error
            self._routed = self._outputs(strategy, candidates)
            if hasattr(self.router, "fit"):
                self._features = self._theta0_features(strategy, strategy.dataloader)
            self._routed_candidates, self._batch = candidates, 0
            self.routing.append({"experience": int(strategy.experience.current_experience),
                                 "candidates": [t["name"] for t in candidates], "chosen": [0] * len(candidates)})

    def _outputs(self, strategy, candidates: list[dict]) -> list[list[Tensor]]:
        """Every candidate task's logits on every minibatch of the experience, [batch][candidate] -> [B, C]."""
        per_candidate = []
        for task in candidates:
            self._switcher.switch(task["name"])
            outputs = []
            for batch in strategy.dataloader:
                x = batch[0].to(strategy.device)
                labels = torch.full((len(x),), task["label"], dtype=torch.long, device=strategy.device)
                outputs.append(avalanche_forward(strategy.model, x, labels))
            per_candidate.append(outputs)
        return list(zip(*per_candidate))

    @torch.no_grad()
    def after_eval_forward(self, strategy, **kwargs):
        if self._routed is None:
            return
        outputs = list(self._routed[self._batch])
        self._batch += 1
        width = max(o.shape[1] for o in outputs)
        outputs = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=MASKED_LOGIT) for o in outputs]
        if hasattr(self.router, "fit"):
            choice = self.router.route(self._features[self._batch - 1], [t["name"] for t in self._routed_candidates])
        else:
            choice = self.router(outputs)
        strategy.mb_output = torch.stack(outputs)[choice, torch.arange(len(choice))]
        counts = self.routing[-1]["chosen"]
        for c in choice.tolist():
            counts[c] += 1
