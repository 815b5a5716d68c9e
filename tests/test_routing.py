"""Routers: the Gaussian router's distances against a loop-level transcription of their definition, its
statistics adding up task by task, its saved copy, and the default features it reads from a model."""

import math

import pytest
import torch
from avalanche.models import MTSimpleMLP, SimpleMLP

from mmer_cl.routing import GaussianRouter, classifier_inputs, entropy_router


def support(seed=0, n=12, d=3):
    g = torch.Generator().manual_seed(seed)
    return {task: (torch.randn(n, d, generator=g, dtype=torch.float64) + shift, torch.arange(n) % 2)
            for task, shift in (("a", 0.0), ("b", 2.0), ("c", -2.0))}


def loop_distances(data, x, shrinkage):
    """d_k(x) = (x - mu_k)^T P (x - mu_k), written out entry by entry."""
    groups = {(task, c): [row for row, y in zip(f.tolist(), ys.tolist()) if y == c]
              for task, (f, ys) in data.items() for c in (0, 1)}
    d = len(next(iter(groups.values()))[0])
    means = {k: [sum(r[i] for r in rows) / len(rows) for i in range(d)] for k, rows in groups.items()}
    n = sum(len(rows) for rows in groups.values())
    S = [[sum((r[i] - means[k][i]) * (r[j] - means[k][j]) for k, rows in groups.items() for r in rows) / (n - len(groups))
          for j in range(d)] for i in range(d)]
    trace = sum(S[i][i] for i in range(d))
    shrunk = [[(1 - shrinkage) * S[i][j] + (shrinkage * trace / d if i == j else 0.0) for j in range(d)] for i in range(d)]
    P = torch.linalg.inv(torch.tensor(shrunk, dtype=torch.float64)).tolist()
    out = []
    for row in x.tolist():
        out.append([sum((row[i] - means[k][i]) * P[i][j] * (row[j] - means[k][j]) for i in range(d) for j in range(d))
                    for k in groups])
    return torch.tensor(out, dtype=torch.float64), [task for task, _ in groups]


@pytest.mark.parametrize("shrinkage", [0.0, 0.3, 1.0])
def test_mahalanobis_distances_match_their_definition(shrinkage):
    data = support()
    router = GaussianRouter(shrinkage=shrinkage)
    for task, (f, y) in data.items():
        router.fit(task, f, y)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got, owner = router.distances(x, ["a", "b", "c"])
    expected, expected_owner = loop_distances(data, x, shrinkage)
    assert owner == expected_owner
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    tasks = ["c", "a", "b"]  # route answers positions in the list it is given
    nearest = [expected_owner[k] for k in expected.argmin(1).tolist()]
    assert router.route(x, tasks).tolist() == [tasks.index(t) for t in nearest]


def test_prototype_metric_is_the_euclidean_nearest_class_mean():
    data = support()
    router = GaussianRouter(metric="prototype")
    for task, (f, y) in data.items():
        router.fit(task, f, y)
    x = torch.randn(4, 3, dtype=torch.float64)
    d, owner = router.distances(x, ["a", "b", "c"])
    means = torch.stack([data[t][0][data[t][1] == c].mean(0) for t in "abc" for c in (0, 1)])
    torch.testing.assert_close(d, torch.cdist(x, means) ** 2)


def test_a_sample_is_routed_only_among_the_candidates():
    data = support()
    router = GaussianRouter()
    for task, (f, y) in data.items():
        router.fit(task, f, y)
    x = data["b"][0]  # b's own samples, offered only a and c
    assert set(router.route(x, ["a", "c"]).tolist()) <= {0, 1}
    assert (router.route(x, ["a", "b", "c"]) == 1).float().mean() > 0.8
    with pytest.raises(ValueError, match=r"no support set for tasks \['z'\]"):
        router.route(x, ["a", "z"])


def test_saved_statistics_give_the_same_routes(tmp_path):
    data = support()
    router = GaussianRouter(shrinkage=0.2)
    for task, (f, y) in data.items():
        router.fit(task, f, y)
        router.save(tmp_path / "router")  # replaced after every task, as the plugin does
    loaded = GaussianRouter.load(tmp_path / "router", shrinkage=0.2)
    x = torch.randn(20, 3, dtype=torch.float64)
    assert torch.equal(loaded.route(x, list("abc")), router.route(x, list("abc")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="metric must be"):
        GaussianRouter(metric="cosine")
    with pytest.raises(ValueError, match="shrinkage"):
        GaussianRouter(shrinkage=math.nan)


def test_default_features_are_the_last_classifiers_input():
    torch.manual_seed(0)
    x = torch.rand(4, 784)
    single, multi = SimpleMLP(num_classes=10, hidden_size=16, drop_rate=0).eval(), MTSimpleMLP(hidden_size=16).eval()
    torch.testing.assert_close(classifier_inputs(single, x, 0), single.features(x))
    multi.classifier.adaptation(type("E", (), {"classes_in_this_experience": [0, 1], "task_labels": [3]})())
    torch.testing.assert_close(classifier_inputs(multi, x, 3), multi.features(x))
    with pytest.raises(ValueError, match="no nn.Linear"):
        classifier_inputs(torch.nn.ReLU(), x, 0)


def test_entropy_router_picks_the_most_certain_candidate():
    sure, unsure = torch.tensor([[9.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert entropy_router([sure, unsure]).tolist() == [0, 1]
