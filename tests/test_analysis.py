"""Mask analyses read from a state, against numbers worked out by hand on a tiny one: densities (raw and
effective) overall and per layer, overlap, reconstruction errors, storage by component."""

import math

import pytest
import torch

from mmer_cl import analysis, checkpoints, store
from mmer_cl import fold as F


@pytest.fixture
def state(tmp_path):
    """theta0 = 0; two tasks; task arithmetic (tau_star = tau_a + tau_b), MMER's masks at lam = 1."""
    base = {"backbone.encoder.layer.0.w": torch.zeros(4), "backbone.pooler.w": torch.zeros(2)}
    checkpoints.save(tmp_path / "base", base)
    a = {"backbone.encoder.layer.0.w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "backbone.pooler.w": torch.tensor([3.0, 1.0])}
    b = {"backbone.encoder.layer.0.w": torch.tensor([0.0, 4.0, -0.5, 0.0]), "backbone.pooler.w": torch.tensor([0.0, -2.0])}
    for name, task in (("a", a), ("b", b)):
        F.fold(tmp_path / "s", task, name, base=tmp_path / "base", merge="task_arithmetic", mask_rule="mmer",
               mode="exact", progress=False)
    return store.load(tmp_path / "s")


def test_densities_overlap_and_reconstruction_by_hand(state):
    # tau_star = [1, 2, 0, 0 | 3, -1]; m_a = 1[|a| >= |a - tau_star|]: 1>=0 y, 2>=4 n, .5>=.5 y, 0>=0 y | 3>=0 y, 1>=2 n
    #                                   m_b: 0>=1 n, 4>=2 y, .5>=.5 y, 0>=0 y | 0>=3 n, 2>=1 y
    density = {d["task"]: d for d in analysis.densities(state)}
    assert density["a"]["raw"] == pytest.approx(4 / 6) and density["b"]["raw"] == pytest.approx(4 / 6)
    # tau_star != 0 at entries 0, 1 | 0, 1: a holds 0 | 0, b holds 1 | 1
    assert density["a"]["effective"] == pytest.approx(2 / 4) and density["b"]["effective"] == pytest.approx(2 / 4)
    assert density["a"]["per_layer"]["backbone.encoder.layer.0"] == {"raw": 0.75, "effective": 0.5}
    assert density["a"]["per_layer"]["backbone.pooler"] == {"raw": 0.5, "effective": 0.5}
    assert analysis.overlaps(state) == {"a|b": 0.0}  # where tau_star != 0 they hold opposite entries
    # m_a * tau_star - a = [0, 2, -.5, 0 | 0, -1]; m_b * tau_star - b = [0, -2, .5, 0 | 0, 1]
    errors = analysis.reconstruction_errors(state)
    assert errors["a"] == pytest.approx(math.sqrt(4 + 0.25 + 1) / math.sqrt(1 + 4 + 0.25 + 9 + 1))
    assert errors["b"] == pytest.approx(math.sqrt(4 + 0.25 + 1) / math.sqrt(16 + 0.25 + 4))


def test_storage_is_the_bytes_on_disk(state):
    sizes = analysis.storage_bytes(state)
    files = state.manifest["files"]
    assert sizes["tau_star"] == sum(files[f]["bytes"] for f in state.manifest["tau_star_files"])
    assert sizes["kept vectors"] == sum((state.dir / f).stat().st_size for t in state.tasks for f in t["vector_files"])
    assert sizes["masks"] > 0 and sizes["private"] == 0


def test_reconstruction_needs_the_task_vectors_of_an_exact_state(tmp_path):
    base = {"w": torch.zeros(8)}
    checkpoints.save(tmp_path / "base", base)
    F.fold(tmp_path / "s", {"w": torch.arange(8.0)}, "a", base=tmp_path / "base", mode="compact", progress=False)
    with pytest.raises(store.StateError, match="compact state"):
        analysis.reconstruction_errors(store.load(tmp_path / "s"))
