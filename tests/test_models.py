"""The mini multimodal models: shared/private naming, the real pretrained backbone, save/load, tokenisation.

Inputs are real: Fashion-MNIST images, espeak-ng spoken-word log-mels and sentences through the backbone's
tokenizer; the backbone is the packaged all-MiniLM-L6-v2.
"""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from mmer_cl import data, models
from mmer_cl.backbone import load_tokenizer

torch.set_num_threads(1)  # 2 shared cores: one thread per process is fastest

PRIVATE = re.compile(r"^tasks\.(vision|audio|text)\.(encoder|projector|head)\.")


@pytest.fixture(scope="module")
def inputs():
    vision = data.load_fashion_mnist(seed=0)
    audio = data.load_spoken_words(seed=0)
    tokenizer = load_tokenizer()
    sentences = ["a domesticated carnivorous mammal", "move fast by using one's feet", "a hard yellow cheese"]
    ids = torch.tensor(tokenizer(sentences, padding="max_length", max_length=32)["input_ids"])
    return {
        "vision": torch.stack([vision.train[i][0] for i in range(3)]),
        "audio": torch.stack([audio.train[i][0] for i in range(3)]),
        "text": ids,
        "classes": {"vision": len(vision.classes), "audio": len(audio.classes), "text": 10},
    }


@pytest.fixture(scope="module")
def model(inputs):
    tasks = [(m, m, inputs["classes"][m], tuple(inputs[m].shape[1:])) for m in ("vision", "audio", "text")]
    return models.build_model(tasks, seed=0).eval()


def test_every_parameter_is_shared_backbone_or_private_to_one_task(model):
    names = [name for name, _ in model.named_parameters()]
    assert set(names) == set(model.state_dict())  # no buffers saved beside the parameters
    odd = [n for n in names if not n.startswith("backbone.") and not PRIVATE.match(n)]
    assert odd == []
    private = {tuple(n.split(".")[1:3]) for n in names if PRIVATE.match(n)}
    assert private == {("vision", "encoder"), ("vision", "projector"), ("vision", "head"),
                       ("audio", "encoder"), ("audio", "projector"), ("audio", "head"), ("text", "head")}
    assert models.shared_names(names) == [n for n in names if n.startswith("backbone.")]


def test_base_holds_only_the_backbone(model, tmp_path):
    model.save_base(tmp_path / "base")
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert base and all(name.startswith("backbone.") for name in base)
    assert set(base) == {n for n in model.state_dict() if n.startswith("backbone.")}
    for name, tensor in base.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert json.loads((tmp_path / "base" / "config.json").read_text())["tasks"] == {}


def test_backbone_is_the_packaged_pretrained_minilm(model):
    package = models.package_backbone_weights()
    mine = {n.removeprefix("backbone."): t for n, t in model.state_dict().items() if n.startswith("backbone.")}
    # the pooler is left out (features are mean-pooled); every other packaged weight is in the model as shipped
    assert set(package) - set(mine) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert set(mine) <= set(package)
    for name, tensor in mine.items():
        assert torch.equal(tensor, package[name]), name
    assert sum(t.numel() for t in mine.values()) == 22_565_376  # 22.7M packaged minus the 148k pooler
    assert model.config.backbone_config.hidden_size == 384


def test_save_load_round_trip_gives_identical_weights_and_logits(model, inputs, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mmer_mini_mllm"
    assert config["tasks"]["audio"]["input_shape"] == list(inputs["audio"].shape[1:])

    def no_package(*args, **kwargs):
        raise AssertionError("from_pretrained must rebuild the backbone from config.json, not load the package")

    monkeypatch.setattr(models, "load_backbone", no_package)
    monkeypatch.setattr(models, "backbone_dir", no_package)
    loaded = models.load_model(tmp_path / "m")
    assert isinstance(loaded, models.MiniMLLM) and not loaded.training
    before, after = model.state_dict(), loaded.state_dict()
    assert set(before) == set(after)  # config.json sorts the tasks by name, so their order may change
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    with torch.no_grad():
        for task in ("vision", "audio", "text"):
            assert torch.equal(model(inputs[task], task=task), loaded(inputs[task], task=task)), task


def test_logits_have_one_column_per_class(model, inputs):
    with torch.no_grad():
        for task in ("vision", "audio", "text"):
            assert model(inputs[task], task=task).shape == (3, inputs["classes"][task])


def test_text_padding_is_masked_out(model, inputs):
    """The same sentence padded to 32 or to 48 tokens gives the same logits: padding (id 0) is neither attended
    to nor pooled."""
    ids = inputs["text"]
    longer = torch.cat([ids, torch.zeros(len(ids), 16, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, task="text"), model(longer, task="text"), atol=1e-5, rtol=1e-5)


def test_vision_tokens_are_row_major_7x7_patches(inputs):
    images = inputs["vision"]
    tokens = models.vision_tokens(images, 7)
    assert tokens.shape == (3, 16, 49)
    for k in range(16):
        r, c = divmod(k, 4)
        assert torch.equal(tokens[:, k], images[:, 0, 7 * r:7 * r + 7, 7 * c:7 * c + 7].reshape(3, 49))


def test_audio_tokens_group_consecutive_frames(inputs):
    mels = inputs["audio"]  # [B, n_mels, frames]
    n_mels, frames = mels.shape[1:]
    tokens = models.audio_tokens(mels, 4)
    assert tokens.shape == (3, -(-frames // 4), 4 * n_mels)
    assert torch.equal(tokens[:, 1], mels[:, :, 4:8].transpose(1, 2).reshape(3, 4 * n_mels))
    odd = models.audio_tokens(mels[:, :, :frames - 1], 4)  # a short last token repeats the last frame
    assert torch.equal(odd[:, -1, -n_mels:], mels[:, :, frames - 2])


def test_wrong_input_names_the_task_and_shape(model, inputs):
    with pytest.raises(ValueError, match=r"task 'vision' \(vision\) takes inputs \[B, 1, 28, 28\], got \[3, 1, 14, 14\]"):
        model(inputs["vision"][:, :, :14, :14], task="vision")
    with pytest.raises(KeyError, match="unknown task 'speech'"):
        model(inputs["audio"], task="speech")
    with pytest.raises(ValueError, match="needs its input_shape"):
        models.build_model([("audio", "audio", 20)])


def test_add_task_leaves_the_other_tasks_unchanged(model, inputs):
    grown = copy.deepcopy(model)
    grown.add_task("fmnist_pairs", models.task_spec("vision", 2, (1, 28, 28)))
    assert "fmnist_pairs" in grown.config.tasks and "fmnist_pairs" not in model.config.tasks
    with torch.no_grad():
        for task in ("vision", "audio", "text"):
            assert torch.equal(grown(inputs[task], task=task), model(inputs[task], task=task)), task
        assert grown(inputs["vision"], task="fmnist_pairs").shape == (3, 2)
    with pytest.raises(ValueError, match="task 'vision' is already in the model"):
        grown.add_task("vision", models.task_spec("vision", 10, (1, 28, 28)))
