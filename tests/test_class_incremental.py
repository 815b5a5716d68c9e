"""Class-incremental Split Fashion-MNIST (split_fmnist_ci) on a tiny real run: split_fmnist's examples with their own
labels 0..9; Avalanche's baselines on one 10-way head under task label 0 (so Naive forgets); MMER routing every
test sample without its task label and scored 10-way against its own label, checked against a transcription by hand
and against a router that sends every sample to the wrong task."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from avalanche.models import avalanche_forward
from transformers import BertConfig, BertModel

from mmer_cl import fold, metrics, models
from mmer_cl.bench import loop, methods, registry
from mmer_cl.bench.glue import FineTuning
from mmer_cl.bench.profiles import PROFILES
from mmer_cl.bench.runfolder import Run
from mmer_cl.decoupled import TaskSwitcher
from mmer_cl.routing import entropy_router

# 20 steps of 8 examples per task, 16 validation and 32 test examples per task
TINY = replace(PROFILES["quick"], name="tiny-ci", steps=100, batch_size=8, val_per_task=32, test_per_task=64,
               alphas=(1.0,), lams=(1.0,))
METHODS = ["individual", "mmer_routed", "mmer_routed_entropy", "naive", "joint"]
MMER = dict(merge="ties", mask_rule="mmer", mode="exact", alpha=1.0)  # TINY's one grid point


class Seen(FineTuning):
    """FineTuning that also keeps, per minibatch, how many tasks the strategy's model routes among, the experience,
    the task labels it came with and the output width."""

    seen = []

    def _keep(self, strategy):
        self.seen.append((len(strategy.model.specs), int(strategy.experience.current_experience),
                          strategy.mb_task_id.unique().tolist(), strategy.mb_output.shape[1]))

    def after_training_iteration(self, strategy, **kwargs):
        self._keep(strategy)

    def after_eval_iteration(self, strategy, **kwargs):
        self._keep(strategy)


def tiny_backbone() -> BertModel:
    """A one-layer BERT of width 32 in place of MiniLM: the stream's real data and the library's real model code,
    at a cost a test can pay on 2 shared cores (MiniLM took 10 minutes for this run)."""
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of every class-incremental method (FineTuning recording what the baselines saw); the tiny
    backbone stays in place for the tests, which rebuild the run's models."""
    folder = tmp_path_factory.mktemp("ci")
    Seen.seen = []
    patch = pytest.MonkeyPatch()
    patch.setattr(models, "load_backbone", tiny_backbone)
    with pytest.MonkeyPatch.context() as during:
        during.setattr(methods, "FineTuning", Seen)
        results = loop.run(TINY, streams=["split_fmnist_ci"], methods=METHODS, out=folder / "out", cache=folder / "cache",
                           progress=False, threads=2)["split_fmnist_ci"]
    data = loop.stream_data("split_fmnist_ci", TINY, 0)
    yield {"results": results, "data": data, "bench": Run(TINY, 0, folder / "cache", progress=False),
           "out": folder / "out", "seen": list(Seen.seen)}
    patch.undo()


def test_the_stream_is_split_fmnist_with_its_own_labels_and_only_label_free_methods():
    registry.load_builtins()
    task, ci = (loop.stream_data(name, TINY, 0) for name in ("split_fmnist", "split_fmnist_ci"))
    assert ci.tasks == task.tasks and ci.steps == task.steps and ci.protocol == "class"
    for t, name in enumerate(ci.tasks):
        pair = (2 * t, 2 * t + 1)
        for split in ("train", "val", "test"):
            a, b = getattr(task, split)[name], getattr(ci, split)[name]
            assert len(a) == len(b)
            for i in range(len(a)):  # the same examples, label 0/1 -> the class itself
                assert torch.equal(a[i][0], b[i][0]) and b[i][1] == pair[a[i][1]]
            assert set(torch.as_tensor(b.targets).tolist()) == set(pair)
    assert [s.num_classes for s in ci.specs] == [10] * 5  # each expert's head over the whole label space
    assert ci.learner_labels == [0] * 5 and ci.learner_specs == ci.specs[:1]
    assert task.learner_labels == list(range(5)) and task.learner_specs == task.specs
    assert loop.methods_for(ci, TINY) == ["individual", "mmer_routed", "mmer_routed_entropy", "naive", "ewc", "lwf",
                                          "replay", "joint"]
    assert loop.methods_for(ci, TINY, ["ties", "mmer_exact", "tall", "naive"]) == ["naive"]  # need a task label
    assert loop.DEFAULT_STREAMS.index("split_fmnist_ci") == loop.DEFAULT_STREAMS.index("split_fmnist") + 1
    assert "split_fmnist_ci" in registry.BUILTIN_STREAMS


@pytest.mark.slow
def test_the_baselines_see_task_label_0_and_one_10_way_head_and_naive_forgets(run):
    data, results = run["data"], run["results"]
    learner = [entry for entry in run["seen"] if entry[0] == 1]  # Naive's model; the experts' routes among five
    assert {exp for _, exp, _, _ in learner} == set(range(5))
    assert all(labels == [0] and width == 10 for _, _, labels, width in learner)
    assert all(labels == [exp] for tasks, exp, labels, _ in run["seen"] if tasks == 5)  # experts: their own modules
    model = methods.new_model(data, specs=data.learner_specs)
    assert list(model.model.tasks) == ["fmnist_01"]  # one encoder, projector and 10-way head for all experiences
    every_task = methods.model_storage(methods.new_model(data), data)[1]  # the experts' model: five of them
    assert 5 * results["naive"]["storage"]["private"] == every_task
    # Naive after the last experience, on every experience's test data: it answers with the last classes only
    model.load_state_dict(methods.load_weights(run["bench"].dir / data.name / "naive-models" / "4"), strict=False)
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model.model(torch.stack([x for x, _ in data.test[task]]), task="fmnist_01").argmax(1)
                               for task in data.tasks[:4]])
    assert np.isin(predicted.numpy(), [8, 9]).mean() >= 0.95
    R = np.asarray(results["naive"]["matrix"])
    assert R[-1, :4].max() <= 0.05 and metrics.average_forgetting(R) >= 0.3  # it had learnt them, then lost them
    joint = np.asarray(results["joint"]["matrix"])[-1]
    assert joint.mean() > R[-1].mean()  # every class at once, through the one head


def hand_routed(data, state_dir, router):
    """Per experience j, per test sample: the task `router` picks among all five decoupled models' 10-way logits,
    and whether the picked model's top class is the sample's own label."""
    model = methods.new_model(data).eval()
    switcher, chosen, correct = TaskSwitcher(model, state_dir), [], []
    length = max(spec.numel for spec in data.specs)
    for task in data.tasks:
        x = torch.stack([torch.nn.functional.pad(x.flatten().float(), (0, length - x.numel())) for x, _ in data.test[task]])
        y = torch.tensor([int(y) for _, y in data.test[task]])
        logits = []
        with torch.no_grad():
            for c in range(len(data.tasks)):
                switcher.switch(methods.task_name(c))
                logits.append(avalanche_forward(model, x, torch.full((len(x),), c)))
        pick = router(logits)
        answer = torch.stack(logits)[pick, torch.arange(len(x))].argmax(1)
        chosen.append(pick.tolist())
        correct.append((answer == y).int().tolist())
    return chosen, correct


def exact_state(run):
    state = methods.experts_folder(run["bench"], run["data"]) / "state"
    fold.refit(state, lams=1.0, **{k: v for k, v in MMER.items() if k != "mode"})
    return state


@pytest.mark.slow
def test_routed_accuracy_is_right_routing_and_right_class_counted_by_hand(run):
    data, result = run["data"], run["results"]["mmer_routed_entropy"]
    chosen, correct = hand_routed(data, exact_state(run), entropy_router)
    assert result["correct"] == correct
    assert np.allclose(np.asarray(result["matrix"])[-1], [np.mean(c) for c in correct])
    assert result["routing_confusion"] == [[row.count(c) for c in range(5)] for row in chosen]
    for name in ("mmer_routed", "mmer_routed_entropy"):  # every test sample routed once, after the last experience
        assert [sum(row) for row in run["results"][name]["routing_confusion"]] == [len(data.test[t]) for t in data.tasks]


@pytest.mark.slow
def test_a_sample_routed_to_the_wrong_task_is_scored_against_its_own_label(run, tmp_path):
    """Every sample sent to the first task's model: that model answers 0 or 1, so every other experience scores 0."""
    data = run["data"]
    always_first = lambda outputs: torch.zeros(len(outputs[0]), dtype=torch.long)
    models = methods.experts_folder(run["bench"], data) / "models"
    R, plugin, correctness = methods.replay(data, models, tmp_path / "state", dict(MMER), infer_task=True,
                                            router=always_first)
    _, by_hand = hand_routed(data, exact_state(run), always_first)
    assert correctness.correct == dict(enumerate(by_hand))
    assert np.all(R[-1, 1:] == 0.0) and R[-1, 0] > 0.5


@pytest.mark.slow
def test_the_tables_come_out_for_the_stream(run):
    import pandas as pd

    out = run["out"]
    for stem in ("summary", "matrices", "routing", "routing_entropy", "paired", "experts", "accuracy_matrices.png",
                 "forgetting.png"):
        assert (out / f"split_fmnist_ci_{stem}" if "." in stem else out / f"split_fmnist_ci_{stem}.csv").exists(), stem
    summary = pd.read_csv(out / "split_fmnist_ci_summary.csv", comment="#")
    assert set(summary["method"]) == set(METHODS)
    paired = pd.read_csv(out / "split_fmnist_ci_paired.csv", comment="#")
    assert set(paired["method"]) == {"mmer_routed_entropy", "naive"}  # against mmer_routed, per-sample scores only
    assert "`individual` is each expert given its task label" in (out / "SUMMARY.md").read_text()
