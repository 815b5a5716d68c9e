"""How a state merges: one dataclass of the fold's settings, every value checked before anything is written."""

import math
from dataclasses import dataclass

from mmer_cl import merging, modes
from mmer_cl.store import StateError

TRIMS = ("tensor", "global")
TAU_DTYPES = ("float32", "weights")
FIXED = ("mode", "trim")  # settings a state keeps for life


@dataclass(frozen=True)
class Settings:
    """How a state merges. mode and trim are fixed by the first fold; a refit may change the others.

    mode: exact | sparse | compact; merge, mask_rule: names in merging.MERGES and merging.MASK_RULES;
    k: TIES's trim fraction, per "tensor" or "global" (trim); alpha: the scale of tau_star; p: DARE's drop
    probability; energy: OPCM's singular-value fraction; seed: the draws of DARE and of random masks.
    tau_dtype: how tau_star is stored, "float32" or "weights" (each tensor in its base's floating dtype:
    half the bytes on disk beside bfloat16 weights, what lets a 7B compact state fit; tau_star is rounded
    once, as written, and everything after, masks' statistics included, uses the rounded values).
    """

    mode: str = "exact"
    merge: str = "ties"
    mask_rule: str = "mmer"
    k: float = 0.2
    alpha: float = 1.0
    trim: str = "tensor"
    p: float = 0.5
    energy: float = 0.5
    seed: int = 0
    tau_dtype: str = "float32"

    def check(self) -> "Settings":
        """Every value known, finite and in range, and a mode that can keep what the merge needs."""
        self.check_values()
        merge, rule = merging.MERGES[self.merge], merging.MASK_RULES[self.mask_rule]
        if self.mode == "sparse" and not merge.running and merge.needs != "trimmed":
            raise StateError(f"merge '{self.merge}' needs each task's whole vector; a sparse state keeps only "
                             f"trimmed ones: use mode='exact'")
        if self.mode == "compact" and not merge.running and rule.fn is None:
            raise StateError(f"a compact state keeps only tau_star and masks: merge '{self.merge}' without masks "
                             f"cannot recover old tasks from it; use mode='exact' or 'sparse', or a mask rule")
        return self

    def check_values(self) -> "Settings":
        """Each value on its own: names known, numbers real, finite and in range (NaN fails every range)."""
        for field in ("k", "alpha", "p", "energy"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise StateError(f"{field} must be a number, got {value!r}")
        for field, known in (("mode", modes.NAMES), ("merge", merging.MERGES), ("mask_rule", merging.MASK_RULES),
                             ("trim", TRIMS), ("tau_dtype", TAU_DTYPES)):
            if getattr(self, field) not in known:
                raise StateError(f"{field} must be one of {sorted(known)}, got {getattr(self, field)!r}")
        for field, low, high, closed in (("k", 0.0, 1.0, "(]"), ("p", 0.0, 1.0, "[)"), ("energy", 0.0, 1.0, "[]")):
            value = getattr(self, field)
            if not (low < value if closed[0] == "(" else low <= value) or not (value <= high if closed[1] == "]" else value < high):
                raise StateError(f"{field} must lie in {closed[0]}{low}, {high}{closed[1]}, got {value}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise StateError(f"alpha must be a finite positive number, got {self.alpha}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StateError(f"seed must be an integer, got {self.seed!r}")
        return self

    @property
    def scale(self) -> float:
        """What tau_star carries of alpha (1 for merges without it), divided out of a compact state's tasks."""
        return self.alpha if "alpha" in merging.MERGES[self.merge].params else 1.0

    def params(self) -> dict:
        return {name: getattr(self, name) for name in merging.MERGES[self.merge].params}

    @classmethod
    def of(cls, manifest: dict) -> "Settings":
        return cls(**manifest["settings"])


def check_lam(lam, rule: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise StateError(f"lam must be a number, got {lam!r}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0) or (rule == "random" and lam > 1):
        limit = "a density in [0, 1]" if rule == "random" else "a finite number >= 0"
        raise StateError(f"lam must be {limit}, got {lam}")
    return lam
