"""The expansion setting: the weights for a mixed input against their definitions (union, merged, routed),
the shared answer space, mixed-input batching. Tiny real Llama checkpoints for the state algebra, a tiny BERT
for per-token routing, the packaged MiniLM for the mixed-input model."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mmer_cl import decoupled, expansion, merging, models, store
from mmer_cl import fold as F
from mmer_cl.data.common import LabelledTensors
from mmer_cl.data.mixed import SEP_ID, MixedSet, noisy_images, truncated_texts
from test_checkpoints import finetune, save, state_of, tiny_llama

torch.set_num_threads(1)
NAMES = ["task0", "task1", "task2"]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    root = tmp_path_factory.mktemp("expansion")
    base = tiny_llama()
    save(base, root / "base")
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    for i, task in enumerate(NAMES):
        save(finetune(tiny_llama(), base_state, seed=50 + i, scale=0.01 * (i + 1)), root / f"ft{i}")
        F.fold(root / "s", root / f"ft{i}", task, base=root / "base" if i == 0 else None, lam=0.8, progress=False)
    return root


def test_union_and_merged_are_their_definitions(state):
    s = store.load(state / "s")
    theta0 = state_of(state / "base")
    union = decoupled.combined_state_dict(state / "s", NAMES[:2], "union")
    merged = decoupled.combined_state_dict(state / "s", NAMES, "merged")
    for name, base in theta0.items():
        if not base.is_floating_point():
            continue
        tau_star = s.tau_star().read(name).reshape(base.shape)
        masks = [merging.unpack_mask(s.masks(s.task(t)).read(name), base.shape) for t in NAMES[:2]]
        either = masks[0] | masks[1]
        assert torch.equal(union[name], (base.float() + either.float() * tau_star).to(base.dtype)), name
        assert torch.equal(merged[name], (base.float() + tau_star).to(base.dtype)), name
    alone = decoupled.combined_state_dict(state / "s", ["task1"], "union")
    own = decoupled.decoupled_state_dict(state / "s", "task1")
    assert all(torch.equal(alone[n], own[n]) for n in alone)  # the union of one mask is that task's model
    with pytest.raises(ValueError, match="kind must be one of"):
        decoupled.combined_state_dict(state / "s", NAMES, "mean")


def tiny_bert(seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False).eval()


def test_routed_backbone_gives_each_token_its_own_weights():
    backbones = [tiny_bert(seed) for seed in (1, 2, 3)]
    routed = expansion.RoutedBackbone(backbones[0], [b.state_dict() for b in backbones])
    with torch.no_grad():
        # one-token sequences: no attention between tokens, so each row must equal its own backbone's output
        ids = torch.tensor([[5], [7], [9], [11]])
        route = torch.tensor([[0], [2], [1], [2]])
        out = routed(route, input_ids=ids).last_hidden_state
        for row, k in enumerate(route.flatten().tolist()):
            want = backbones[k](input_ids=ids[row:row + 1]).last_hidden_state
            torch.testing.assert_close(out[row:row + 1], want, rtol=1e-5, atol=1e-6)
        # every token of longer sequences through one set: that backbone exactly
        ids = torch.randint(1, 50, (3, 6))
        for k in range(3):
            torch.testing.assert_close(routed(torch.full((3, 6), k), input_ids=ids).last_hidden_state,
                                       backbones[k](input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-6)


def test_per_token_module_is_a_loop_over_tokens():
    copies = [nn.Linear(4, 3) for _ in range(3)]
    route = expansion.Route()
    layer = expansion.PerToken(copies, route)
    x = torch.randn(2, 5, 4)
    route.set(torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]]))
    with torch.no_grad():
        out = layer(x)
        for b in range(2):
            for i in range(5):
                assert torch.allclose(out[b, i], copies[int(route.index[b, i])](x[b, i]), atol=1e-6), (b, i)


NAMES_10 = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


@pytest.fixture(scope="module")
def answering():
    specs = {"vision": models.task_spec("vision", 10, (1, 28, 28), answers=NAMES_10),
             "text": models.task_spec("text", 10, answers=NAMES_10)}
    return models.on_pretrained_backbone(specs, seed=0).eval()


def test_answers_are_scaled_cosines_to_the_names_encodings(answering, tmp_path):
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits = answering(images, task="vision")
        names = answering.answer_embeddings("vision")
        want = 20.0 * nn.functional.cosine_similarity(answering.features(images, "vision")[:, None], names[None], dim=-1)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert names.shape == (10, 384) and "head" not in {n.split(".")[2] for n, _ in answering.named_parameters()
                                                        if n.startswith("tasks.") and "log_scale" not in n}
    answering.save_pretrained(tmp_path / "m")
    loaded = models.load_model(tmp_path / "m")
    assert loaded.config.tasks["text"]["answer_ids"] == answering.config.tasks["text"]["answer_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(images, task="vision"), logits)
    with pytest.raises(ValueError, match="3 answers for 10 classes"):
        models.task_spec("text", 10, answers=NAMES_10[:3])


def test_mixed_inputs_concatenate_parts_at_their_own_positions(answering):
    images = torch.rand(2, 1, 28, 28)
    ids = torch.zeros(2, 32, dtype=torch.long)
    ids[0, :5], ids[1, :3] = torch.tensor([101, 2000, 2001, 2002, 102]), torch.tensor([101, 2003, 102])
    inputs = answering.mixed_inputs({"vision": images, "text": ids})
    assert inputs["inputs_embeds"].shape == (2, 16 + 5, 384)  # padding no row uses is dropped
    assert inputs["segments"][0].tolist() == [0] * 16 + [1] * 5
    assert inputs["position_ids"][0].tolist() == list(range(16)) + list(range(5))
    assert inputs["attention_mask"][1].tolist() == [1] * 16 + [1, 1, 1, 0, 0]
    with torch.no_grad():  # one part alone: the single-modality model's features
        torch.testing.assert_close(expansion.mixed_features(answering, {"text": ids}), answering.features(ids, "text"),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(expansion.mixed_features(answering, {"vision": images}),
                                   answering.features(images, "vision"), rtol=1e-4, atol=1e-5)


def test_mixed_set_is_balanced_and_every_part_has_the_class():
    pools = {"a": LabelledTensors(torch.arange(30.0)[:, None], torch.arange(30) % 3),
             "b": LabelledTensors(torch.arange(40.0)[:, None], torch.arange(40) % 4)}
    mixed = MixedSet(pools, 60, seed=1)
    assert mixed.classes == [0, 1, 2] and torch.bincount(mixed.targets).tolist() == [20, 20, 20]
    for i in range(len(mixed)):
        parts, y = mixed[i]
        assert int(parts["a"]) % 3 == y and int(parts["b"]) % 4 == y
    again = MixedSet(pools, 60, seed=1)
    assert torch.equal(again.sources, mixed.sources) and not torch.equal(MixedSet(pools, 60, seed=2).sources, mixed.sources)
    batch = next(mixed.batches(8))
    assert set(batch) == {"a", "b"} and batch["a"].shape == (8, 1)
    with pytest.raises(ValueError, match="share no class"):
        MixedSet({"a": pools["a"], "c": LabelledTensors(torch.zeros(2, 1), torch.tensor([7, 8]))}, 4)


def test_degradations():
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :8] = torch.tensor([101, 1, 2, 3, 4, 5, 6, 102])
    ids[1, :4] = torch.tensor([101, 1, 2, 102])
    cut = truncated_texts(LabelledTensors(ids, torch.tensor([0, 1])), keep=3).inputs
    assert cut[0].tolist() == [101, 1, 2, 3, SEP_ID] + [0] * 5 and torch.equal(cut[1], ids[1])
    images = LabelledTensors(torch.full((4, 1, 2, 2), 0.5), torch.arange(4))
    noisy = noisy_images(images, 0.3, seed=0).inputs
    assert torch.equal(noisy, noisy_images(images, 0.3, seed=0).inputs)
    assert 0.2 < float((noisy - 0.5).std()) < 0.4
