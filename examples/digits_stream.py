"""A stream, a model and a merge method of your own, run by the benchmark without editing the library.

    mmer-cl run --stream examples/digits_stream.py:digits --profile quick --out results-digits

The stream: scikit-learn's handwritten digits (8x8), five two-class tasks with task labels, on a small
model of your own (a shared `backbone` and one head per task). The method: a plain average of the task
vectors, registered as a merge in three lines, then benchmarked like every built-in method.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from mmer_cl import merging
from mmer_cl.bench import StreamData, TaskSpec, method, stream
from mmer_cl.bench.methods import grid, merging_method
from mmer_cl.data import LabelledTensors, subset


class DigitsModel(nn.Module):
    """backbone (shared by every task) -> the task's head; forward(x, task) as the benchmark calls it, and
    features(x, task), what the label-free router (mmer_routed) compares."""

    def __init__(self, tasks):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
        self.heads = nn.ModuleDict({task: nn.Linear(32, 2) for task in tasks})

    def features(self, x, task):
        return self.backbone(x)

    def forward(self, x, task):
        return self.heads[task](self.features(x, task))


@stream("digits")
def digits(profile, seed) -> StreamData:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed splits, whatever the seed
    parts = {"train": order[:1000], "val": order[1000:1300], "test": order[1300:]}
    specs, sets = [], {"train": {}, "val": {}, "test": {}}
    for a in range(0, 10, 2):
        name = f"digits_{a}{a + 1}"
        specs.append(TaskSpec(name, "vision", (1, 8, 8), torch.float32, 2))
        for split, index in parts.items():
            keep = index[(y[index] == a) | (y[index] == a + 1)]
            sets[split][name] = LabelledTensors(x[keep], (y[keep] == a + 1).long())
    sets["train"] = {n: subset(d, profile.train_per_task, seed) for n, d in sets["train"].items()}
    return StreamData("digits", specs, sets["train"], sets["val"], sets["test"], steps=max(1, profile.steps // 5),
                      batch_size=profile.batch_size, new_model=lambda: DigitsModel([s.name for s in specs]))


merging.register_merge("average")(lambda taus, alpha: alpha * taus.mean(dim=0))


@method("average")
def run_average(run, data):
    """theta0 + alpha * mean_t tau_t, alpha chosen on validation, as a continual method through MMERPlugin."""
    return merging_method(run, data, "average", dict(merge="average", mask_rule="none", mode="exact"),
                          grid(alpha=(1.0, 2.0, 3.0)))
