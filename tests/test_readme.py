"""The README's Python examples run as written (each block in a fresh namespace, in a scratch folder)."""

import re
from pathlib import Path

import pytest

from mmer_cl import merging

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block(containing: str) -> str:
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"one README block with {containing!r}"
    return found[0]


def test_the_algebra_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block("merging.mmer("), namespace)
    assert namespace["packed"].numel() == 1 and namespace["theta_hat_1"].shape == (4,)


def test_the_registry_example_registers_a_merge_and_a_mask_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = dict(merging.MERGES), dict(merging.MASK_RULES)
    try:
        exec(block("register_merge"), {})
        assert "average" in merging.MERGES and "larger_half" in merging.MASK_RULES
    finally:
        merging.MERGES.clear(), merging.MERGES.update(before[0])
        merging.MASK_RULES.clear(), merging.MASK_RULES.update(before[1])


@pytest.mark.slow
def test_the_plugin_example_on_split_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block("strategy.train(experience)"), namespace)
    results = namespace["results"]
    assert results["StreamForgetting/eval_phase/test_stream"] < 0.05  # task labels route exactly
    assert (tmp_path / "state" / "manifest.json").is_file()
