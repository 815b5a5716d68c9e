"""MMERPlugin in standard Avalanche workflows: Naive on a real Split Fashion-MNIST stream built with
Avalanche's own nc_benchmark, task-incremental (MTSimpleMLP, one head per task) and class-incremental (a plain
MLP with one 10-way head), with Avalanche's own accuracy and forgetting metrics."""

import runpy
from pathlib import Path

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from mmer_cl import MMERPlugin, data, store
from mmer_cl.checkpoints import Checkpoint

torch.set_num_threads(2)
FORGETTING = "StreamForgetting/eval_phase/test_stream"


@pytest.fixture(scope="module")
def fmnist():
    splits = data.load_fashion_mnist()
    train, test = data.subset(splits.train, 2000), data.subset(splits.test, 1000)

    def tensors(part):
        return torch.utils.data.TensorDataset(part.inputs.float().div(255).reshape(len(part), -1), part.targets)
    return tensors(train), tensors(test)


def split(fmnist, task_labels: bool):
    train, test = fmnist
    return nc_benchmark(train, test, n_experiences=5, task_labels=task_labels, seed=0,
                        fixed_class_order=list(range(10)))


def strategy_for(model, plugins, epochs=3):
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True), loggers=[])
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                 criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=epochs, eval_mb_size=500,
                 plugins=plugins, evaluator=evaluator)


def run(benchmark, model, plugins):
    strategy = strategy_for(model, plugins)
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
    return strategy, results


def mlp(task_labels: bool):
    torch.manual_seed(0)
    return MTSimpleMLP(hidden_size=64) if task_labels else SimpleMLP(num_classes=10, hidden_size=64, drop_rate=0)


@pytest.mark.slow
@pytest.mark.parametrize("task_labels", [True, False], ids=["task-incremental", "class-incremental"])
def test_the_plugin_forgets_far_less_than_naive_on_the_same_stream(fmnist, tmp_path, task_labels):
    benchmark = split(fmnist, task_labels)
    _, naive = run(benchmark, mlp(task_labels), [])
    plugin = MMERPlugin(tmp_path / "state")
    _, mmer = run(benchmark, mlp(task_labels), [plugin])
    assert naive[FORGETTING] > 0.1
    # task labels route exactly; without them the Gaussian router's mistakes are what is forgotten
    assert mmer[FORGETTING] < (0.2 if task_labels else 0.4) * naive[FORGETTING]
    state = store.load(tmp_path / "state")
    assert [t["name"] for t in state.tasks] == [f"exp{i:03d}" for i in range(5)]
    assert state.manifest["settings"]["mode"] == "compact"
    if task_labels:  # each head is private to its task, the features shared
        assert all(t["meta"]["task_label"] == i for i, t in enumerate(state.tasks))
        assert not any(n.startswith("classifier.") for n in Checkpoint(tmp_path / "state" / "theta0").names)
    else:
        assert len(plugin.routing) == 5 * 5 - 5 and sum(plugin.routing[-1]["chosen"]) == 200
        final = plugin.routing[-5:]
        assert sum(e["chosen"][e["experience"]] for e in final) / 1000 > 0.65  # 0.74 measured; entropy: 0.46
        assert sorted(Checkpoint(tmp_path / "state" / "router").names)[:2] == ["exp000/0/count", "exp000/0/sum"]


class Probe(SupervisedPlugin):
    """Records what the model and optimizer hold when an experience starts (after MMERPlugin's reset) and
    the weights after each optimizer step (the last one: the trained model, before MMERPlugin folds it)."""

    def __init__(self):
        super().__init__()
        self.at_start, self.optimizer_state, self.trained = [], [], []

    def before_training_exp(self, strategy, **kwargs):
        self.at_start.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()})
        self.optimizer_state.append(len(strategy.optimizer.state))

    def after_update(self, strategy, **kwargs):
        self.last = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}

    def after_training_epoch(self, strategy, **kwargs):
        self.trained.append(self.last)


def test_each_experience_starts_from_theta0_and_is_folded_as_its_task_vector(fmnist, tmp_path):
    benchmark = split(fmnist, task_labels=True)
    probe = Probe()
    strategy = strategy_for(mlp(True), [MMERPlugin(tmp_path / "state", mode="exact"), probe], epochs=1)
    for experience in benchmark.train_stream[:3]:
        strategy.train(experience)
    theta0 = Checkpoint(tmp_path / "state" / "theta0")
    assert set(theta0.names) == {"features.0.weight", "features.0.bias"}  # the heads are per task: private
    for start in probe.at_start:
        assert all(torch.equal(start[n], theta0.read(n)) for n in theta0.names)
    assert probe.optimizer_state == [0, 0, 0]
    state = store.load(tmp_path / "state")
    for i, (task, trained) in enumerate(zip(state.tasks, probe.trained)):
        vectors, private = state.vectors(task), state.private(task)
        for name in theta0.names:  # the exact state keeps tau = theta_trained - theta0
            assert torch.equal(vectors.read(name), trained[name] - theta0.read(name))
        assert torch.equal(private.read(f"classifier.classifiers.{i}.classifier.weight"),
                           trained[f"classifier.classifiers.{i}.classifier.weight"])
        assert not any(f"classifiers.{j}." in n for n in private.names for j in range(3) if j != i)


def test_after_training_the_model_holds_the_last_task_and_eval_restores_it(fmnist, tmp_path):
    benchmark = split(fmnist, task_labels=True)
    model = mlp(True)
    strategy = strategy_for(model, [MMERPlugin(tmp_path / "state")], epochs=1)
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    from mmer_cl.decoupled import decoupled_state_dict
    expected = decoupled_state_dict(tmp_path / "state", "exp001")
    held = model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in expected.items())
    strategy.eval(benchmark.test_stream[:1])  # evaluates on task 0's weights, then puts task 1's back
    held = model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in expected.items())


def test_a_shared_parameter_that_changes_shape_is_refused(fmnist, tmp_path):
    from avalanche.models import IncrementalClassifier

    class Growing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Linear(784, 16)
            self.classifier = IncrementalClassifier(16, initial_out_features=2)

        def forward(self, x):
            return self.classifier(self.features(x))

    benchmark = split(fmnist, task_labels=False)
    strategy = strategy_for(Growing(), [MMERPlugin(tmp_path / "state")], epochs=1)
    strategy.train(benchmark.train_stream[0])
    with pytest.raises(ValueError, match="shared parameter 'classifier.classifier.weight' changed shape"):
        strategy.train(benchmark.train_stream[1])


@pytest.mark.slow
def test_the_example_runs_as_a_user_would(fmnist, capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "avalanche_plugin.py"
    results = runpy.run_path(str(example))["main"](["--epochs", "2"], benchmark=split(fmnist, task_labels=True))
    printed = capsys.readouterr().out
    assert "naive + MMERPlugin" in printed and "forgetting" in printed
    assert set(results) == {"naive", "naive + MMERPlugin"}
    assert abs(results["naive + MMERPlugin"]["forgetting"]) < 0.05  # with task labels MMER barely forgets


def test_a_folder_that_already_holds_a_state_is_refused_and_left_alone(fmnist, tmp_path):
    benchmark = split(fmnist, task_labels=True)
    strategy_for(mlp(True), [MMERPlugin(tmp_path / "state")], epochs=1).train(benchmark.train_stream[0])
    before = {p: p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file()}
    with pytest.raises(store.StateError, match="already holds an MMER state.*exp000.*new folder"):
        strategy_for(mlp(True), [MMERPlugin(tmp_path / "state")], epochs=1).train(benchmark.train_stream[0])
    assert {p: p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file()} == before


def test_a_periodic_evaluation_during_training_sees_the_model_being_trained(fmnist, tmp_path):
    """Avalanche's eval_every: mid-experience, the plugin leaves the model as it is (not theta0, not a
    decoupled model), and after the experience it evaluates the folded task as usual."""
    benchmark = split(fmnist, task_labels=True)
    model = mlp(True)
    seen = []

    class Probe(SupervisedPlugin):
        def before_eval_exp(self, strategy, **kwargs):
            seen.append(model.features[0].weight.detach().clone())

    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=1, eval_mb_size=500,
                     plugins=[MMERPlugin(tmp_path / "state"), Probe()], evaluator=evaluator, eval_every=3,
                     peval_mode="iteration")
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience, eval_streams=[experience])
    theta0 = Checkpoint(tmp_path / "state" / "theta0").read("features.0.weight")
    middle = seen[len(seen) // 2 + 2]  # an evaluation inside the second experience's training
    assert not torch.equal(middle, theta0)
    assert not torch.equal(seen[-1], seen[-2])  # mid-training weights, then the folded task's decoupled ones
