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
    first_seed_only: tuple = ()  # methods (or "stream/method" pairs) run on the profile's first seed alone
    cost: str = ""

    def key(self) -> str:
        """A digest of every value that decides a result (the name aside): a run folder's identity."""
        values = {k: v for k, v in asdict(self).items() if k not in ("name", "cost", "seeds", "skip", "first_seed_only")}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


# The default profile's seeds: the merging comparisons the benchmark exists for (each expert, MMER, Task
# Arithmetic, TIES, TALL, EMR, OPCM; on Split Fashion-MNIST also Naive and label-free MMER) run on three; what
# costs a training run of its own (the Avalanche baselines, LoRA, joint training, Naive's sequential fine-tunes
# on the modality stream and what merges them), MMER's storage variants and analyses, and the aligned stream run
# on the first seed alone.
DEFAULT_FIRST_SEED_ONLY = ("mmer_sparse", "mmer_compact", "mmer_routed_entropy", "mmer_controls", "dare_ties",
                           "magmax", "continual_ties", "modality/naive", "ewc", "lwf", "replay", "lora", "mmer_lora",
                           "joint", "forgetting", "expansion", "aligned/individual", "aligned/mmer_exact")

PROFILES = {
    "quick": Profile("quick", steps=4, batch_size=8, train_per_task=32, val_per_task=32, test_per_task=64,
                     alphas=(1.0, 2.0), lams=(1.0,), ta_alphas=(0.5, 1.0), tall_lams=(0.4,), energies=(0.5,),
                     cost="a smoke run of everything, about 16 min on 2 cores"),
    # EWC, LwF and Replay cost 2-3x Naive's training (5-8 min each on the modality stream): within the time
    # budget they run on Split Fashion-MNIST only, where forgetting is measured. One epoch per task
    # (train_per_task = steps x batch_size): every step sees new examples.
    "default": Profile("default", steps=150, train_per_task=4800, val_per_task=200, test_per_task=1000,
                       seeds=(0, 1, 2), ewc_lambdas=(1.0, 10.0, 100.0), lwf_settings=((1.0, 2.0), (2.0, 2.0)),
                       skip=("modality/ewc", "modality/lwf", "modality/replay", "split_fmnist/lora",
                             "split_fmnist/mmer_lora"),
                       first_seed_only=DEFAULT_FIRST_SEED_ONLY, cost="about 80 min on 2 cores"),
    "full": Profile("full", steps=400, train_per_task=12800, val_per_task=1000, test_per_task=None,
                    seeds=(0, 1, 2), ewc_lambdas=(1.0, 10.0, 100.0, 1000.0),
                    lwf_settings=((0.5, 1.0), (1.0, 2.0), (2.0, 2.0)), cost="hours"),
}


def describe() -> str:
    return "profiles:\n" + "\n".join(f"  {p.name:<8} {p.steps} steps per task, seeds {list(p.seeds)}: {p.cost}"
                                     for p in PROFILES.values())
