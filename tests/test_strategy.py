"""MMERStrategy on a tiny real stream: folds, mask refresh, routing by task label and by entropy, the three
state modes, and Avalanche's own metrics on top. The model is a small torch model with the same naming as
MiniMLLM (shared `backbone.*`, private `tasks.<task>.*`), so each test runs in seconds."""

import pytest
import torch
from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from safetensors.torch import save_file
from torch import nn

from mmer_cl import merging
from mmer_cl.strategy import MASKED_LOGIT, MMERStrategy, PackedInputs, TaskRouter, TaskSpec, packed_length, predictive_entropy

DIM = 6
TASKS = ["left", "right"]


class TinyModel(nn.Module):
    """backbone (shared) -> task head (private); forward(x, task) like MiniMLLM."""

    def __init__(self, tasks):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 16))
        self.tasks = nn.ModuleDict({t: nn.Linear(16, 2) for t in tasks})

    def forward(self, x, task):
        return self.tasks[task](torch.tanh(self.backbone(x)))


class Points(torch.utils.data.Dataset):
    """Two Gaussian blobs; task 'left' separates them along axis 0, 'right' along axis 1."""

    def __init__(self, axis: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 2 for i in range(n)]
        y = torch.tensor(self.targets, dtype=torch.float32)
        self.x = torch.randn(n, DIM, generator=g) * 0.5
        self.x[:, axis] += 2 * y - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """theta0 (shared only), one fine-tuned expert folder per task, the stream, the specs."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    base = TinyModel(TASKS)
    (root / "base").mkdir()
    save_file({n: p.detach().clone() for n, p in base.state_dict().items() if n.startswith("backbone.")},
              root / "base" / "model.safetensors")
    experts = {}
    for axis, task in enumerate(TASKS):
        model = TinyModel([task])
        model.load_state_dict({n: p for n, p in base.state_dict().items() if n.startswith("backbone.")}, strict=False)
        data = Points(axis, 256, seed=axis)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(60):
            loss = nn.functional.cross_entropy(model(data.x, task), torch.tensor(data.targets))
            opt.zero_grad()
            loss.backward()
            opt.step()
        experts[task] = root / task
        experts[task].mkdir()
        save_file({n: p.detach().clone() for n, p in model.state_dict().items()}, experts[task] / "model.safetensors")
    specs = [TaskSpec(t, "points", (DIM,), torch.float32, 2) for t in TASKS]
    length = packed_length(specs)
    streams = {
        part: [_make_taskaware_classification_dataset(PackedInputs(Points(a, n, seed=s + a), length), task_labels=a)
               for a in range(len(TASKS))]
        for part, n, s in (("train", 32, 10), ("test", 200, 20))
    }
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))
    return root, experts, specs, bm


def _strategy(world, mode, state, **kwargs):
    root, experts, specs, _ = world
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    return MMERStrategy(model=TinyModel(TASKS), specs=specs, base_dir=root / "base", state_dir=state, expert_source=experts,
                        mode=mode, evaluator=evaluator, **kwargs)


def _taus(world):
    root, experts, _, _ = world
    from safetensors.torch import load_file

    theta0 = load_file(root / "base" / "model.safetensors")
    return theta0, {t: {n: load_file(experts[t] / "model.safetensors")[n] - theta0[n] for n in theta0} for t in TASKS}


def _live_shared(strategy):
    return {n: p.detach().clone() for n, p in strategy.model.model.state_dict().items() if n.startswith("backbone.")}


def test_folds_refresh_masks_and_route_by_task_label(world, tmp_path):
    _, _, _, bm = world
    theta0, taus = _taus(world)
    strategy = _strategy(world, "exact", tmp_path / "state", k=0.5, alpha=1.0, lam=1.0)
    strategy.train(bm.train_stream[0])
    strategy.switch("left")
    # one task: tau_star = TIES_k(tau_left) and the live model is theta0 + m * tau_star
    for name, value in _live_shared(strategy).items():
        tau_star, masks = merging.mmer(taus["left"][name].unsqueeze(0), k=0.5)
        torch.testing.assert_close(value, merging.decouple(theta0[name], masks[0], tau_star))
    strategy.train(bm.train_stream[1])
    changed = False
    for task_index, task in enumerate(TASKS):
        strategy.switch(task)
        live = _live_shared(strategy)
        for name in theta0:
            tau_star, masks = merging.mmer(torch.stack([taus[t][name] for t in TASKS]), k=0.5)
            torch.testing.assert_close(live[name], merging.decouple(theta0[name], masks[task_index], tau_star))
            changed |= not torch.equal(masks[0], merging.mmer(taus["left"][name].unsqueeze(0), k=0.5)[1][0])
    assert changed, "folding the second task must refresh the first task's mask"
    assert set(strategy.fold_seconds) == set(TASKS)
    results = strategy.eval(bm.test_stream)
    accs = [results[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(2)]
    # each decoupled model solves its own task; the experts reach ~0.97 on these blobs
    assert min(accs) > 0.85, accs
    # the private heads are routed by task label: running 'right' through 'left's head is near chance
    router = strategy.model
    x = torch.stack([bm.test_stream[1].dataset[i][0] for i in range(200)])
    y = torch.tensor([bm.test_stream[1].dataset[i][1] for i in range(200)])
    strategy.switch("left")
    wrong = (router.forward_single_task(x, 0).argmax(1) == y).float().mean()
    assert wrong < 0.75


def test_three_modes_agree_when_nothing_is_lost(world, tmp_path):
    """k = 1 trims nothing and with alpha = lam = 1 a single task's mask is all ones, so compact's
    m * tau_star reproduces tau exactly: all modes must give the same tau_star and masks."""
    from mmer_cl import store

    _, _, _, bm = world
    weights = {}
    for mode in ("exact", "sparse", "compact"):
        strategy = _strategy(world, mode, tmp_path / mode, k=1.0, alpha=1.0, lam=1.0)
        for experience in bm.train_stream:
            strategy.train(experience)
        state = store.load(tmp_path / mode)
        weights[mode] = {
            "tau_star": {n: state.tau_star().read(n) for n in state.tau_star().names},
            "masks": {t["name"]: {n: state.masks(t).read(n) for n in state.masks(t).names} for t in state.tasks},
        }
        assert state.manifest["mode"] == mode
    for mode in ("sparse", "compact"):
        for name, value in weights["exact"]["tau_star"].items():
            torch.testing.assert_close(weights[mode]["tau_star"][name], value)
        for task in TASKS:
            for name, packed in weights["exact"]["masks"][task].items():
                assert torch.equal(weights[mode]["masks"][task][name], packed), (mode, task, name)


def test_task_inference_by_lowest_entropy(world, tmp_path):
    _, _, _, bm = world
    strategy = _strategy(world, "exact", tmp_path / "state", k=0.5, infer_task=True)
    for experience in bm.train_stream:
        strategy.train(experience)
    results = strategy.eval(bm.test_stream)
    log = strategy.inference_log
    assert [row["task"] for row in log] == TASKS and all(row["total"] == 200 for row in log)
    rate = sum(row["correct"] for row in log) / 400
    # each decoupled model is more certain on its own task's inputs than chance would make it
    assert rate > 0.6, log
    accs = [results[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(2)]
    assert min(accs) > 0.5  # inferred routing is no oracle, but it must beat chance on these blobs


def test_router_pads_logits_and_entropy():
    specs = [TaskSpec("a", "points", (DIM,), torch.float32, 2), TaskSpec("b", "points", (DIM,), torch.float32, 3)]
    router = TaskRouter(TinyModel(["a", "b"]), specs)
    x = torch.randn(4, DIM)
    out = router(x, torch.tensor([0, 0, 1, 1]))
    assert out.shape == (4, 3) and (out[:, 2] == MASKED_LOGIT).all()
    torch.testing.assert_close(out[:2, :2], router.model(x[:2], task="a"))
    assert torch.allclose(predictive_entropy(torch.zeros(3, 2)), torch.full((3,), torch.log(torch.tensor(2.0))))
    with pytest.raises(ValueError, match="exact, sparse or compact"):
        MMERStrategy(model=TinyModel(["a"]), specs=specs[:1], base_dir="base", state_dir="state", expert_source={}, mode="dense")
