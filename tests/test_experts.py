"""Expert fine-tuning on small subsets of the real data: full and LoRA training lower the loss, only the
intended weights move, a LoRA expert saves as a real PEFT adapter folder, seeds fix the result and a time
budget stops training."""

import json

import pytest
import torch
from torch import nn

from mmer_cl import cli, data, experts, models
from mmer_cl.checkpoints import Checkpoint
from mmer_cl.sources import LoraSource

torch.set_num_threads(1)  # 2 shared cores: one thread per process is fastest


@pytest.fixture(scope="module")
def vision():
    splits = data.load_fashion_mnist(seed=0)
    return data.subset(splits.train, 64, seed=0), data.subset(splits.val, 64, seed=0)


@pytest.fixture(scope="module")
def text():
    splits = data.load_wordnet(seed=0)
    return data.subset(splits.train, 64, seed=0), data.subset(splits.val, 64, seed=0)


def mean_loss(model, dataset, task: str) -> float:
    model.eval()
    x, y = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(torch.stack(x), task=task), torch.tensor(y)))


@pytest.mark.slow
def test_full_fine_tuning_lowers_the_loss_and_moves_the_backbone(vision):
    train, val = vision
    theta0 = models.build_model([("vision", "vision", 10, (1, 28, 28))], seed=0)  # train_expert's starting point
    model, info = experts.train_expert("vision", "vision", (train, val), steps=24, batch_size=16, seed=0,
                                       num_classes=10, progress=False)
    assert info["steps"] == 24 and info["stopped_by"] == "steps" and info["train_time_s"] > 0
    # 2.31 -> 2.12 measured: the soft tokens start from random private modules, so vision learns slowly at first
    assert mean_loss(model, train, "vision") < mean_loss(theta0, train, "vision") - 0.1
    start, end = theta0.state_dict(), model.state_dict()
    assert not torch.equal(start["backbone.encoder.layer.0.attention.self.query.weight"],
                           end["backbone.encoder.layer.0.attention.self.query.weight"])
    # soft tokens never look up word embeddings: the vision expert leaves them exactly at theta_0
    assert torch.equal(start["backbone.embeddings.word_embeddings.weight"], end["backbone.embeddings.word_embeddings.weight"])
    assert 0.0 <= experts.evaluate(model, val, "vision") <= 1.0


@pytest.mark.slow
def test_lora_expert_trains_factors_and_private_modules_only_and_saves_a_peft_folder(text, tmp_path):
    train, val = text
    theta0 = models.build_model([("text", "text", 10)], seed=0)
    expert, info = experts.train_expert("text", "text", (train, val), mode="lora", steps=12, batch_size=16, seed=0,
                                        num_classes=10, lora_r=4, lora_alpha=8, progress=False)
    assert isinstance(expert, models.LoraExpert) and info["mode"] == "lora"
    assert info["trainable_params"] < 0.05 * sum(p.numel() for p in theta0.parameters())
    assert mean_loss(expert, train, "text") < mean_loss(theta0, train, "text") - 0.2

    expert.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    assert not any(name.startswith("model") for name in files)  # no dense copy of the backbone
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    weights = Checkpoint([tmp_path / "adapter" / "adapter_model.safetensors"])
    sizes = {kind: sum(i.stop - i.start for n, i in weights.info.items() if (".lora_" in n) == (kind == "adapters"))
             for kind in ("adapters", "private")}
    # 6 layers x (q, k, v, attention out: 384x384; intermediate 384->1536; output 1536->384), r = 4
    assert sizes["adapters"] == 4 * 6 * (4 * 4 * (384 + 384) + 2 * 4 * (384 + 1536))
    assert sizes["private"] == 4 * (384 * 10 + 10)  # the text task's head

    reloaded = models.load_model(tmp_path / "adapter")
    merged = models.load_model(tmp_path / "adapter", merge=True)
    assert isinstance(merged, models.MiniMLLM)
    ids = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        reference = expert(ids, task="text")
        assert torch.equal(reloaded(ids, task="text"), reference)
        torch.testing.assert_close(merged(ids, task="text"), reference, atol=1e-5, rtol=1e-5)
    # merged = theta_0 + (alpha / r) B A on the adapted matrices only, word embeddings untouched
    start, dense = theta0.state_dict(), merged.state_dict()
    assert torch.equal(start["backbone.embeddings.word_embeddings.weight"], dense["backbone.embeddings.word_embeddings.weight"])
    assert not torch.equal(start["backbone.encoder.layer.3.intermediate.dense.weight"],
                           dense["backbone.encoder.layer.3.intermediate.dense.weight"])
    assert torch.equal(start["backbone.encoder.layer.3.intermediate.dense.bias"],
                       dense["backbone.encoder.layer.3.intermediate.dense.bias"])

    # the fold reads the same folder: dense deltas for the 36 adapted matrices, the head as private weights
    theta0.save_base(tmp_path / "base")
    adapter = LoraSource(tmp_path / "adapter", Checkpoint(tmp_path / "base"))
    assert len(adapter.deltas) == 36
    assert set(adapter.private_tensors) == {"tasks.text.head.weight", "tasks.text.head.bias"}
    assert torch.equal(adapter.private_tensors["tasks.text.head.weight"], dense["tasks.text.head.weight"])


@pytest.mark.slow
def test_same_seed_same_expert_other_seed_other_expert(vision):
    train, val = vision
    run = lambda seed: experts.train_expert("vision", "vision", (train, val), steps=3, batch_size=16, seed=seed,
                                            num_classes=10, progress=False)[0].state_dict()
    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["tasks.vision.head.weight"], other["tasks.vision.head.weight"])


def test_time_budget_stops_training_cleanly(vision):
    train, val = vision
    model, info = experts.train_expert("vision", "vision", (train, val), steps=10_000, batch_size=8,
                                       time_budget=1.0, num_classes=10, progress=False)
    assert info["stopped_by"] == "time_budget"
    assert 1 <= info["steps"] < 10_000
    assert info["train_time_s"] < 1.0 + 5 * info["s_per_step"] + 1.0
    assert not model.training


def test_bad_arguments_are_refused(vision):
    with pytest.raises(ValueError, match="mode must be 'full' or 'lora'"):
        experts.train_expert("vision", "vision", vision, mode="dora")
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        experts.train_expert("vision", "vision", vision, steps=1, epochs=1)


@pytest.mark.slow
def test_train_expert_command_trains_reports_and_saves(tmp_path, capsys):
    out = tmp_path / "vision"
    code = cli.main(["train-expert", "--modality", "vision", "--steps", "2", "--batch-size", "8",
                     "--train-size", "32", "--eval-size", "32", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val accuracy" in printed and "test accuracy" in printed and "2 steps" in printed
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 2 and info["val_examples"] == 32 and 0.0 <= info["test_accuracy"] <= 1.0
    assert isinstance(models.load_model(out), models.MiniMLLM)
