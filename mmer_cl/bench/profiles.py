"""Benchmark sizes. A profile holds what every stream shares (optimizer steps per task, batch size, how many
examples per task, seeds, the validation grids); a stream scales them to its own tasks (streams.py)."""

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    """Budgets of one benchmark size. steps: optimizer steps per task, for experts and baselines alike;
    *_per_task: examples per task (None: the whole split); the grids are searched on validation only."""

    name: str
    steps: int
    batch_size: int = 32
    train_per_task: int | None = None
    val_per_task: int | None = None
    test_per_task: int | None = None
    seeds: tuple = (0,)
    k: float = 0.2
    alphas: tuple = (0.5, 1.0, 1.5, 2.0)
    lams: tuple = (0.5, 1.0, 2.0)
    ta_alphas: tuple = (0.3, 0.5, 0.7, 1.0)
    tall_lams: tuple = (0.2, 0.4, 0.6)
    energies: tuple = (0.3, 0.5, 0.7)  # OPCM's singular-value fraction
    ewc_lambdas: tuple = ()  # empty: Avalanche's example settings, untuned (baselines.py)
    lwf_settings: tuple = ()  # (alpha, temperature) pairs
    skip: tuple = ()  # "stream/method" pairs left out unless --methods names them
    every_seed: tuple | None = None  # the methods (or "stream/method" pairs) run on every seed; None: all of them
    # (the others run on the profile's first seed alone)
    cost: str = ""

    def key(self) -> str:
        """A digest of every value that decides a result (the name aside): a run folder's identity."""
        values = {k: v for k, v in asdict(self).items() if k not in ("name", "cost", "seeds", "skip", "every_seed")}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


# The default profile's seeds: the comparisons the benchmark exists for (on the modality stream and task-incremental
# Split Fashion-MNIST: each expert, MMER against Task Arithmetic, TIES and EMR; Naive's forgetting) run on three
# seeds; everything else (the other merges, MMER's storage variants and analyses, what trains a model of its own,
# the class-incremental stream) on the first alone, for time.
DEFAULT_EVERY_SEED = tuple(f"{stream}/{method}" for stream in ("modality", "split_fmnist")
                           for method in ("individual", "mmer_exact", "task_arithmetic", "ties", "emr")) + ("split_fmnist/naive",)

PROFILES = {
    "quick": Profile("quick", steps=4, batch_size=8, train_per_task=32, val_per_task=32, test_per_task=64,
                     alphas=(1.0, 2.0), lams=(1.0,), ta_alphas=(0.5, 1.0), tall_lams=(0.4,), energies=(0.5,),
                     cost="a smoke run of everything, about 16 min on 2 cores"),
    # EWC, LwF and Replay cost 2-3x Naive's training (5-8 min each on the modality stream): within the time
    # budget they run on Split Fashion-MNIST only, where forgetting is measured. One epoch per task
    # (train_per_task = steps x batch_size): every step sees new examples.
    "default": Profile("default", steps=150, train_per_task=4800, val_per_task=200, test_per_task=1000,
                       seeds=(0, 1, 2), ewc_lambdas=(1.0, 100.0), lwf_settings=((1.0, 2.0), (2.0, 2.0)),
                       skip=("modality/ewc", "modality/lwf", "modality/replay", "split_fmnist/lora",
                             "split_fmnist/mmer_lora"),
                       every_seed=DEFAULT_EVERY_SEED, cost="about 100 min on 2 cores"),
    "full": Profile("full", steps=400, train_per_task=12800, val_per_task=1000, test_per_task=None,
                    seeds=(0, 1, 2), ewc_lambdas=(1.0, 10.0, 100.0, 1000.0),
                    lwf_settings=((0.5, 1.0), (1.0, 2.0), (2.0, 2.0)), cost="hours"),
}


def describe() -> str:
    return "profiles:\n" + "\n".join(f"  {p.name:<8} {p.steps} steps per task, seeds {list(p.seeds)}: {p.cost}"
                                     for p in PROFILES.values())
