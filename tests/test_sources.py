"""Real multimodal transformers folders over one base language model: every layout the installed transformers has
(LLaVA, LLaVA-NeXT, Qwen2-Audio, Qwen2-VL, Qwen2.5-VL, Idefics2, Idefics3, SmolVLM) folds with no prefix map, its
towers stay private, the architecture check compares the language-model config, and language-model tensors the
base lacks are refused unless allowed. Tiny random models only."""

import json

import pytest
import torch
from safetensors.torch import save_file
import transformers as T

from mmer_cl import decoupled, merging
from mmer_cl import fold as F
from mmer_cl.checkpoints import Checkpoint, CheckpointError, TensorCheckpoint
from mmer_cl.sources import (
    KNOWN_NAME_MAPS, LM_CONFIG_KEYS, check_architecture, detect_name_map, extra_language_model_names,
    language_model_config, map_name, open_source,
)
from test_checkpoints import TINY, finetune, save, state_of
from test_fold import read_state

torch.set_num_threads(1)

CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
SIGLIP = dict(CLIP)
QWEN2_VL_VISION = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, in_channels=3, patch_size=2,
                       spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
QWEN2_5_VL_VISION = dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3,
                         patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                         fullatt_block_indexes=[0])
AUDIO = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
             max_source_positions=16)


def _llava(text):
    return T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=T.CLIPVisionConfig(**CLIP),
                                                         text_config=T.LlamaConfig(**text), image_token_index=63))


def _llava_next(text):
    return T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**CLIP), text_config=T.LlamaConfig(**text), image_token_index=63,
        image_grid_pinpoints=[[8, 8], [8, 16]]))


def _qwen2_audio(text):
    return T.Qwen2AudioForConditionalGeneration(T.Qwen2AudioConfig(audio_config=AUDIO, text_config=T.Qwen2Config(**text)))


def _qwen2_vl(text):
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_VISION))


def _qwen2_5_vl(text):
    return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=QWEN2_5_VL_VISION))


def _idefics2(text):
    return T.Idefics2ForConditionalGeneration(T.Idefics2Config(
        vision_config=SIGLIP, text_config=dict(text, model_type="mistral"), image_token_id=63,
        perceiver_config=dict(hidden_size=16, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1)))


def _idefics3(text):
    return T.Idefics3ForConditionalGeneration(T.Idefics3Config(
        vision_config=SIGLIP, text_config=dict(text, model_type="llama"), scale_factor=1, image_token_id=63))


def _smolvlm(text):
    return T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        vision_config=SIGLIP, text_config=dict(text, model_type="llama"), scale_factor=1, image_token_id=63))


# layout: (build(text config fields), its base's class, the language model's module in memory,
#          the name map of its saved folder, the top-level names of its private tensors there)
LAYOUTS = {
    "llava": (_llava, T.LlamaForCausalLM, "model.language_model", [["", "language_model."]],
              {"vision_tower", "multi_modal_projector"}),
    "llava_next": (_llava_next, T.LlamaForCausalLM, "model.language_model", [["", "language_model."]],
                   {"vision_tower", "multi_modal_projector", "image_newline"}),
    "qwen2_audio": (_qwen2_audio, T.Qwen2ForCausalLM, "model.language_model", [["", "language_model."]],
                    {"audio_tower", "multi_modal_projector"}),
    "qwen2_vl": (_qwen2_vl, T.Qwen2ForCausalLM, "model.language_model", [], {"visual"}),
    "qwen2_5_vl": (_qwen2_5_vl, T.Qwen2ForCausalLM, "model.language_model", [], {"visual"}),
    "idefics2": (_idefics2, T.MistralForCausalLM, "model.text_model", [["model.", "model.text_model."]],
                 {"model.vision_model", "model.connector"}),
    "idefics3": (_idefics3, T.LlamaForCausalLM, "model.text_model", [["model.", "model.text_model."]],
                 {"model.vision_model", "model.connector"}),
    "smolvlm": (_smolvlm, T.LlamaForCausalLM, "model.text_model", [["model.", "model.text_model."]],
                {"model.vision_model", "model.connector"}),
}


def _root(name: str) -> str:
    """`vision_tower` for `vision_tower.encoder...`, `model.vision_model` for `model.vision_model.encoder...`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" else parts[0]


def _base(kind, folder, **text):
    base_cls = LAYOUTS[kind][1]
    torch.manual_seed(0)
    base = base_cls(base_cls.config_class(**{**TINY, **text}))
    save(base, folder)
    return {n: t.clone() for n, t in base.state_dict().items()}


def _multimodal(kind, base_state, folder, seed=3, **text):
    """The layout's model on a language model that starts from the base's weights (by name), then everything
    moves by seeded noise; a deeper language model (text overrides) keeps its extra layers' random weights."""
    build, _, lm_path, *_ = LAYOUTS[kind]
    torch.manual_seed(1)
    model = build({**TINY, **text})
    inner = {n[len("model."):]: t for n, t in base_state.items() if n.startswith("model.")}
    missing, unexpected = model.get_submodule(lm_path).load_state_dict(inner, strict=False)
    assert not unexpected and all(n.startswith("layers.2.") for n in missing), missing
    model.lm_head.load_state_dict({"weight": base_state["lm_head.weight"]})
    finetune(model, model.state_dict(), seed=seed)
    save(model, folder, shard="16KB")
    return model


@pytest.fixture(params=list(LAYOUTS))
def kind(request):
    return request.param


def test_multimodal_folds_with_the_text_task_and_exports_exactly(tmp_path, kind):
    _, base_cls, _, rules, towers = LAYOUTS[kind]
    base_state = _base(kind, tmp_path / "base")
    model = _multimodal(kind, base_state, tmp_path / "mm")
    cls = type(model)
    plain = base_cls(base_cls.config_class(**TINY))
    save(finetune(plain, base_state, seed=4), tmp_path / "text")

    F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False)
    manifest = F.fold(tmp_path / "s", tmp_path / "text", "text", progress=False)
    mm_task, text_task = manifest["tasks"]
    assert mm_task["name_map"] == rules and text_task["name_map"] == []

    # tau_star over the base's names: the in-memory MMER of the two task vectors
    base, original, text = state_of(tmp_path / "base"), state_of(tmp_path / "mm"), state_of(tmp_path / "text")
    tau_star, masks = read_state(tmp_path / "s")
    assert set(tau_star) == set(base)
    for n in base:
        taus = torch.stack([original[map_name(n, rules)].float() - base[n].float(), text[n].float() - base[n].float()])
        ref_tau_star, ref_masks = merging.mmer(taus, 0.2, 1.0, 1.0)
        assert torch.equal(tau_star[n], ref_tau_star), n
        assert torch.equal(masks[n], ref_masks), n

    # towers and projectors: private to the multimodal task, none flagged as language-model weights
    assert mm_task["private_files"] and not text_task["private_files"]
    private = Checkpoint([tmp_path / "s" / f for f in mm_task["private_files"]])
    shared = {map_name(n, rules) for n in base}
    assert set(private.names) == set(original) - shared
    assert {_root(n) for n in private.names} == towers
    assert extra_language_model_names(Checkpoint(tmp_path / "base"), rules, private.names) == []

    # the export: what decoupled_state_dict says, loadable by the model's own class, towers unchanged
    expected = decoupled.decoupled_state_dict(tmp_path / "s", kind)
    assert set(expected) == set(original)
    decoupled.export(tmp_path / "s", kind, tmp_path / "out", progress=False)
    exported = state_of(tmp_path / "out")
    assert set(exported) == set(expected) and all(torch.equal(exported[n], expected[n]) for n in expected)
    assert all(torch.equal(exported[n], original[n]) for n in private.names)
    assert any(not torch.equal(exported[n], original[n]) for n in shared)  # merged and masked
    loaded = cls.from_pretrained(tmp_path / "out")
    loaded.save_pretrained(tmp_path / "again")  # what it loaded, in the file layout it came from
    again = state_of(tmp_path / "again")
    assert set(again) == set(expected) and all(torch.equal(again[n], expected[n]) for n in expected)


def test_state_dicts_in_memory_fold_too(tmp_path, kind):
    """A model's state dict (transformers 5 names, `model.language_model.*` or `model.text_model.*`) as the source."""
    lm_path = LAYOUTS[kind][2]
    base_state = _base(kind, tmp_path / "base")
    model = _multimodal(kind, base_state, tmp_path / "mm")
    state = model.state_dict()
    base = Checkpoint(tmp_path / "base")
    source = open_source(state, base)
    assert source.name_map == [["model.", lm_path + "."]]
    assert all(_root(n) not in {"model.language_model", "model.text_model", "lm_head"} for n in source.private_names)
    name = "model.layers.0.mlp.up_proj.weight"
    tau = source.tau(name, 0, base.info[name].numel)
    assert torch.equal(tau, (state[f"{lm_path}.layers.0.mlp.up_proj.weight"] - base_state[name]).reshape(-1))


def test_every_layout_finds_its_text_config(tmp_path, kind):
    _multimodal(kind, _base(kind, tmp_path / "base"), tmp_path / "mm")
    config = json.loads((tmp_path / "mm" / "config.json").read_text())
    found = language_model_config(config)
    assert found is config["text_config"]
    assert {f: found[f] for f in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 64}


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 3), ("vocab_size", 72), ("intermediate_size", 48)])
def test_a_different_language_model_is_refused_by_its_config(tmp_path, kind, field, value):
    _base(kind, tmp_path / "base")
    _multimodal_random(kind, tmp_path / "mm", **{field: value})  # the config check comes before any weight
    with pytest.raises(CheckpointError, match=rf"different architecture: .*{field} {value} \(base {TINY[field]}\)"):
        F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False)
    with pytest.raises(CheckpointError, match=rf"{field} {value} \(base {TINY[field]}\)"):  # no prefix map gets past it
        F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False,
               prefix_map=LAYOUTS[kind][3])
    assert not (tmp_path / "s" / "manifest.json").exists()


def _multimodal_random(kind, folder, **text):
    """The layout's model on a random language model with these config fields."""
    torch.manual_seed(1)
    model = LAYOUTS[kind][0]({**TINY, **text})
    save(model, folder, shard="16KB")


def _claim_layers(folder, layers: int):
    """Edits config.json so that it states `layers` language-model layers, whatever its weights hold."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for part in (config, config.get("text_config") or {}):
        if "num_hidden_layers" in part:
            part["num_hidden_layers"] = layers
        if isinstance(part.get("layer_types"), list):
            part["layer_types"] = part["layer_types"][:layers]
    path.write_text(json.dumps(config))


def test_an_extra_layer_is_refused_unless_allowed(tmp_path, kind):
    _, _, _, rules, towers = LAYOUTS[kind]
    base_state = _base(kind, tmp_path / "base")
    _multimodal(kind, base_state, tmp_path / "mm", num_hidden_layers=3)
    _claim_layers(tmp_path / "mm", 2)  # the config check passes; the weights carry layer 2
    layer_2 = map_name("model.layers.2.", rules)
    extra = {n for n in Checkpoint(tmp_path / "mm").names if n.startswith(layer_2)}
    assert extra
    with pytest.raises(CheckpointError, match=rf"{len(extra)} language-model tensors the base .* lacks, e\.g\. "
                                              rf"'{layer_2}.*allow_extra=True"):
        F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()

    with pytest.warns(UserWarning, match=rf"'{layer_2}.*kept as this task's private parameters"):
        manifest = F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False,
                          allow_extra=True)
    private = Checkpoint([tmp_path / "s" / f for f in manifest["tasks"][0]["private_files"]])
    original = state_of(tmp_path / "mm")
    assert extra <= set(private.names) and all(torch.equal(private.read(n), original[n]) for n in extra)
    assert {_root(n) for n in set(private.names) - extra} == towers
    assert set(extra_language_model_names(Checkpoint(tmp_path / "base"), rules, private.names)) == extra


def test_a_plain_llama_with_an_extra_layer(tmp_path):
    """The same for a text-only fine-tune: a deeper config is refused by the config check, a config that hides
    the extra layer by the extra-tensor check."""
    base_state = _base("llava", tmp_path / "base")
    deeper = T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    deeper.load_state_dict(base_state, strict=False)
    save(finetune(deeper, deeper.state_dict(), seed=5), tmp_path / "ft")
    with pytest.raises(CheckpointError, match=r"num_hidden_layers 3 \(base 2\)"):
        F.fold(tmp_path / "s", tmp_path / "ft", "t", base=tmp_path / "base", progress=False)
    _claim_layers(tmp_path / "ft", 2)
    with pytest.raises(CheckpointError, match=r"9 language-model tensors .* e\.g\. 'model\.layers\.2\."):
        F.fold(tmp_path / "s", tmp_path / "ft", "t", base=tmp_path / "base", progress=False)
    with pytest.warns(UserWarning, match="kept as this task's private parameters"):
        manifest = F.fold(tmp_path / "s", tmp_path / "ft", "t", base=tmp_path / "base", progress=False,
                          allow_extra=True)
    private = Checkpoint([tmp_path / "s" / f for f in manifest["tasks"][0]["private_files"]])
    assert {n.rsplit(".", 2)[0] for n in private.names} <= {"model.layers.2.self_attn", "model.layers.2.mlp",
                                                             "model.layers.2"}
    assert len(private.names) == 9


def test_the_check_reads_whatever_config_states_the_language_model():
    """A Qwen2-VL config of the hub (text fields at its top, no text_config) on a qwen2 base passes; a LLaVA
    config whose text_config states only some fields is compared on those; every differing field is named."""
    qwen2 = TensorCheckpoint({}, {"model_type": "qwen2", **TINY})
    hub_qwen2_vl = {"model_type": "qwen2_vl", "vision_config": {"hidden_size": 32, "num_hidden_layers": 1}, **TINY}
    check_architecture(qwen2, TensorCheckpoint({}, hub_qwen2_vl))
    check_architecture(qwen2, TensorCheckpoint({}, {"model_type": "llava", "text_config": {"vocab_size": 64}}))
    with pytest.raises(CheckpointError, match=r"has vocab_size 72 \(base 64\); the base"):
        check_architecture(qwen2, TensorCheckpoint({}, {"text_config": {"model_type": "llama", "vocab_size": 72}}))
    deeper = {**hub_qwen2_vl, "num_hidden_layers": 4, "hidden_size": 32}
    with pytest.raises(CheckpointError, match=r"hidden_size 32 \(base 16\), num_hidden_layers 4 \(base 2\)"):
        check_architecture(qwen2, TensorCheckpoint({}, deeper))
    for key in LM_CONFIG_KEYS:  # InternVL's llm_config and the like
        assert language_model_config({"vision_config": {}, key: {"hidden_size": 8}}) == {"hidden_size": 8}


# ---- name maps ---------------------------------------------------------------------------------------


def test_rules_apply_first_match_per_name():
    rules = [["lm_head.", "head.out."], ["model.layers.", "lm.blocks."], ["model.", "lm."]]
    assert map_name("lm_head.weight", rules) == "head.out.weight"
    assert map_name("model.layers.0.mlp.up_proj.weight", rules) == "lm.blocks.0.mlp.up_proj.weight"
    assert map_name("model.norm.weight", rules) == "lm.norm.weight"
    assert map_name("other.weight", rules) == "other.weight"


def test_a_layout_that_moves_model_and_lm_head_apart(tmp_path):
    """A rule list maps `model.` and `lm_head.` to different places; the first rule list that finds every
    base tensor wins, and the tower beside them is private, not an extra language-model tensor."""
    base_state = _base("llava", tmp_path / "base")
    base = Checkpoint(tmp_path / "base")
    rules = [["model.", "llm.body."], ["lm_head.", "llm.head."]]
    moved = {map_name(n, rules): t + 0.01 for n, t in base_state.items()}
    moved["vision.patch.weight"] = torch.ones(4, 4)
    moved["llm.body.layers.2.mlp.up_proj.weight"] = torch.ones(32, 16)
    total = len(base.names)
    with pytest.raises(CheckpointError, match=f"lacks {total} of the base's {total} tensors.*prefix_map"):
        detect_name_map(base, TensorCheckpoint(moved))  # no known layout
    assert detect_name_map(base, TensorCheckpoint(moved), rules) == rules
    save_file({n: t.contiguous() for n, t in moved.items()}, tmp_path / "moved.safetensors")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved.safetensors").rename(tmp_path / "moved" / "model.safetensors")
    with pytest.raises(CheckpointError, match="'llm.body.layers.2.mlp.up_proj.weight'"):
        open_source(tmp_path / "moved", base, prefix_map=rules)
    with pytest.warns(UserWarning):
        source = open_source(tmp_path / "moved", base, prefix_map=rules, allow_extra=True)
    # a state dict in memory is a model its caller assembled (MMERPlugin): what the base lacks is private
    assert sorted(open_source(moved, base, prefix_map=rules).private_names) == sorted(source.private_names)
    assert sorted(source.private_names) == ["llm.body.layers.2.mlp.up_proj.weight", "vision.patch.weight"]
    assert extra_language_model_names(base, rules, source.private_names) == ["llm.body.layers.2.mlp.up_proj.weight"]


def test_the_known_layouts_are_distinct_rule_lists():
    assert [] in KNOWN_NAME_MAPS and [["model.", "model.text_model."]] in KNOWN_NAME_MAPS
    assert len({json.dumps(r) for r in KNOWN_NAME_MAPS}) == len(KNOWN_NAME_MAPS)
