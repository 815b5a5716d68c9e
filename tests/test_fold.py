"""Streaming folds against the in-memory algebra, on real transformers folders (Llama, LLaVA, Qwen2-Audio)
built from tiny configs; export, live switching, inspect, the CLI, and bad input."""

import argparse
import json
import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
)

from mmer_cl import analysis, cli, decoupled
from mmer_cl import fold as F
from mmer_cl import merging, rebuild, store
from mmer_cl.checkpoints import Checkpoint
from test_checkpoints import TINY, _adapter, finetune, save, state_of, tiny_llama
from test_store import snapshot

torch.set_num_threads(1)
T = 3


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = tiny_llama()
    save(base, root / "base")
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    for i in range(T):
        save(finetune(tiny_llama(), base_state, seed=10 + i), root / f"ft{i}")
    return root


def fold_all(state, llamas, mode="exact", **kwargs):
    for i in range(T):
        manifest = F.fold(state, llamas / f"ft{i}", f"task{i}", base=llamas / "base" if i == 0 else None, mode=mode,
                          progress=False, **kwargs)
    return manifest


def reference(llamas, mode, k=0.2, alpha=1.0, lams=(1.0, 1.0, 1.0), trim="tensor"):
    """The same folds done in memory with merging.py, one task at a time as the state sees them."""
    base = state_of(llamas / "base")
    taus = [{n: v.float() - base[n].float() for n, v in state_of(llamas / f"ft{i}").items()} for i in range(T)]
    kept = []  # what each mode keeps of each old task
    for t in range(T):
        current = kept + [taus[t]]
        thresholds = None
        if trim == "global":
            thresholds = [merging.magnitude_threshold(list(v.values()), k) for v in current]
        tau_star, masks = {}, {}
        for n in base:
            stacked = torch.stack([v[n] for v in current])
            thr = thresholds or [merging.magnitude_threshold([x], k) for x in stacked]
            tau_star[n], masks[n] = merging.mmer(stacked, k, alpha, list(lams[: t + 1]), thr)
        if mode == "exact":
            kept = taus[: t + 1]
        elif mode == "sparse":
            kept = kept + [{n: merging.trim(taus[t][n], k, (thresholds or [None] * T)[-1] if trim == "global" else None)
                            for n in base}]
        else:
            kept = [{n: masks[n][i] * tau_star[n] / alpha for n in base} for i in range(t + 1)]
    return tau_star, masks


def read_state(state_dir):
    state = store.load(state_dir)
    tau_star_ckpt = state.tau_star()
    tau_star = {n: tau_star_ckpt.read(n) for n in tau_star_ckpt.names}
    masks = {n: torch.stack([merging.unpack_mask(state.masks(t).read(n), tau_star[n].shape) for t in state.tasks])
             for n in tau_star}
    return tau_star, masks


@pytest.mark.parametrize("mode", ["exact", "sparse", "compact"])
def test_fold_equals_the_in_memory_algebra(llamas, tmp_path, mode):
    fold_all(tmp_path / "s", llamas, mode, alpha=1.5)
    tau_star, masks = read_state(tmp_path / "s")
    ref_tau_star, ref_masks = reference(llamas, mode, alpha=1.5)
    for n in ref_tau_star:
        assert torch.equal(tau_star[n], ref_tau_star[n]), n
        assert torch.equal(masks[n], ref_masks[n]), n


def test_global_trim_equals_the_in_memory_algebra(llamas, tmp_path):
    fold_all(tmp_path / "s", llamas, "exact", trim="global", k=0.3)
    tau_star, masks = read_state(tmp_path / "s")
    ref_tau_star, ref_masks = reference(llamas, "exact", k=0.3, trim="global")
    assert all(torch.equal(tau_star[n], ref_tau_star[n]) and torch.equal(masks[n], ref_masks[n]) for n in tau_star)


def test_chunks_and_threads_change_no_bit(llamas, tmp_path, monkeypatch):
    whole = fold_all(tmp_path / "whole", llamas, "sparse")
    monkeypatch.setattr(rebuild, "CHUNK_ELEMENTS", 48)  # every matrix in several chunks
    monkeypatch.setattr(rebuild, "WHOLE_THRESHOLD_ELEMENTS", 600)  # the larger ones trimmed by the streamed histogram
    chunked = fold_all(tmp_path / "chunked", llamas, "sparse", workers=2)
    assert chunked["files"] == whole["files"]


def test_refit_equals_folding_with_the_new_settings(llamas, tmp_path):
    fold_all(tmp_path / "a", llamas, "exact")
    refit = F.refit(tmp_path / "a", alpha=1.5, lams={"task1": 0.5})
    direct = fold_all(tmp_path / "b", llamas, "exact", alpha=1.5)
    F.refit(tmp_path / "b", lams=[1.0, 0.5, 1.0])
    assert store.read_manifest(tmp_path / "b")["files"] == refit["files"]
    assert direct["settings"]["alpha"] == refit["settings"]["alpha"] == 1.5
    with pytest.raises(store.StateError, match="compact"):
        fold_all(tmp_path / "c", llamas, "compact")
        F.refit(tmp_path / "c", alpha=2.0)


def test_refit_with_a_new_k_trims_afresh(llamas, tmp_path):
    fold_all(tmp_path / "a", llamas, "exact")  # the manifest keeps each task's thresholds at k = 0.2
    assert store.read_manifest(tmp_path / "a")["tasks"][0]["thresholds"]["k"] == 0.2
    F.refit(tmp_path / "a", k=0.3)
    fold_all(tmp_path / "b", llamas, "exact", k=0.3)
    (tau_star_a, masks_a), (tau_star_b, masks_b) = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    assert all(torch.equal(tau_star_a[n], tau_star_b[n]) and torch.equal(masks_a[n], masks_b[n]) for n in tau_star_a)


def test_export_loads_and_switching_is_in_place(llamas, tmp_path):
    fold_all(tmp_path / "s", llamas, "compact")
    expected = {t: decoupled.decoupled_state_dict(tmp_path / "s", f"task{t}") for t in range(T)}
    base = state_of(llamas / "base")
    for n, theta0 in base.items():  # each is theta0 + m * tau_star, and the tasks differ
        assert expected[0][n].dtype == theta0.dtype
    assert any(not torch.equal(expected[0][n], expected[1][n]) for n in base)
    decoupled.export(tmp_path / "s", "task1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded like the input
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    weights = model.state_dict()
    assert all(torch.equal(weights[n], expected[1][n]) for n in base)
    pointers = {n: t.data_ptr() for n, t in weights.items()}
    switcher = decoupled.TaskSwitcher(model, tmp_path / "s")
    for task in (2, 0, 1, 0):
        switcher.switch(f"task{task}")
        weights = model.state_dict()
        assert all(torch.equal(weights[n], expected[task][n]) for n in base)
        assert {n: t.data_ptr() for n, t in weights.items()} == pointers
    with pytest.raises(store.StateError, match="not empty"):
        decoupled.export(tmp_path / "s", "task1", tmp_path / "out")


def test_lora_adapter_folds_as_its_dense_delta(llamas, tmp_path):
    base_model = LlamaForCausalLM.from_pretrained(llamas / "base")
    peft_model = _adapter(tmp_path, base_model)
    F.fold(tmp_path / "s", llamas / "ft0", "full", base=llamas / "base", progress=False)
    manifest = F.fold(tmp_path / "s", tmp_path / "adapter", "lora", progress=False)
    assert manifest["tasks"][1]["kind"] == "lora"
    merged = peft_model.merge_and_unload().state_dict()
    base = state_of(llamas / "base")
    taus = [{n: v.float() - base[n].float() for n, v in state_of(llamas / "ft0").items()},
            {n: merged[n].float() - base[n].float() for n in base}]
    tau_star, _ = read_state(tmp_path / "s")
    for n in base:
        ref, _ = merging.mmer(torch.stack([t[n] for t in taus]), 0.2, 1.0, 1.0)
        torch.testing.assert_close(tau_star[n], ref, atol=1e-6, rtol=1e-5)


# ---- multimodal models: the language model is shared, towers and projectors private ----------------


def _multimodal(tmp_path, kind):
    if kind == "llava":
        text = LlamaConfig(**TINY)
        base_model = LlamaForCausalLM(text)
        torch.manual_seed(1)
        model = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4),
            text_config=text, image_token_index=63))
        cls = LlavaForConditionalGeneration
        plain = LlamaForCausalLM(text)
    else:
        text = Qwen2Config(**TINY)
        base_model = Qwen2ForCausalLM(text)
        torch.manual_seed(1)
        model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(
            audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                              num_mel_bins=8, max_source_positions=16), text_config=text))
        cls = Qwen2AudioForConditionalGeneration
        plain = Qwen2ForCausalLM(text)
    save(base_model, tmp_path / "base")
    base_state = base_model.state_dict()
    # the multimodal model starts from the same language model, then everything moves
    model.model.language_model.load_state_dict({n[6:]: t for n, t in base_state.items() if n.startswith("model.")})
    model.lm_head.load_state_dict({"weight": base_state["lm_head.weight"]})
    finetune(model, model.state_dict(), seed=3)
    save(model, tmp_path / "mm", shard="16KB")
    save(finetune(plain, base_state, seed=4), tmp_path / "text")
    return cls


@pytest.mark.parametrize("kind", ["llava", "qwen2_audio"])
def test_multimodal_language_model_is_merged_and_towers_stay_private(tmp_path, kind):
    cls = _multimodal(tmp_path, kind)
    F.fold(tmp_path / "s", tmp_path / "mm", kind, base=tmp_path / "base", progress=False)
    manifest = F.fold(tmp_path / "s", tmp_path / "text", "text", progress=False)
    task = manifest["tasks"][0]
    assert task["name_map"] == [["", "language_model."]]
    original = state_of(tmp_path / "mm")
    tower = "vision_tower" if kind == "llava" else "audio_tower"
    private = Checkpoint([tmp_path / "s" / f for f in task["private_files"]])
    assert {n.split(".")[0] for n in private.names} == {tower, "multi_modal_projector"}
    assert all(torch.equal(private.read(n), original[n]) for n in private.names)

    expected = decoupled.decoupled_state_dict(tmp_path / "s", kind)
    assert set(expected) == set(original)
    decoupled.export(tmp_path / "s", kind, tmp_path / "out")
    loaded = cls.from_pretrained(tmp_path / "out")
    loaded.save_pretrained(tmp_path / "again")  # what it loaded, in the file layout it came from
    again = state_of(tmp_path / "again")
    assert set(again) == set(expected) and all(torch.equal(again[n], expected[n]) for n in expected)
    shared = [n for n in expected if n.startswith("language_model.")]
    assert any(not torch.equal(expected[n], original[n]) for n in shared)  # merged and masked


# ---- inspect and the CLI -----------------------------------------------------------------------------


def test_inspect_reports_densities_and_storage(llamas, tmp_path):
    fold_all(tmp_path / "s", llamas, "sparse")
    report = analysis.inspect(tmp_path / "s")
    tau_star, masks = read_state(tmp_path / "s")
    total = sum(t.numel() for t in tau_star.values())
    nonzero = {n: t != 0 for n, t in tau_star.items()}
    for i, task in enumerate(report["tasks"]):
        ones = sum(int(m[i].sum()) for m in masks.values())
        effective = sum(int((m[i] & nonzero[n]).sum()) for n, m in masks.items())
        assert task["mask_density"] == pytest.approx(ones / total)
        assert task["mask_density_effective"] == pytest.approx(effective / sum(int(z.sum()) for z in nonzero.values()))
        assert set(task["per_layer"]) == {"model.layers.0", "model.layers.1", "model.embed_tokens", "model.norm", "lm_head"}
    storage = report["storage_bytes"]
    assert storage["masks"] == sum(math.ceil(t.numel() / 8) for t in tau_star.values()) * T + _headers(tmp_path / "s", "mask")
    assert 0 < storage["kept vectors"] < T * 4 * total  # sparse: below the dense vectors
    assert storage["tau_star"] > 4 * total


def _headers(state_dir, prefix):
    manifest = store.read_manifest(state_dir)
    return sum(8 + int.from_bytes((state_dir / f).read_bytes()[:8], "little")
               for t in manifest["tasks"] for f in t["mask_files"])


def test_cli_fold_export_inspect(llamas, tmp_path, capsys):
    def run(*argv):
        return cli.main([str(a) for a in argv])

    assert run("fold", tmp_path / "s", llamas / "ft0", "--task", "a", "--base", llamas / "base", "--mode", "sparse") == 0
    assert run("fold", tmp_path / "s", llamas / "ft1", "--task", "b", "--mode", "sparse", "--lam", "0.5") == 0
    assert run("inspect", tmp_path / "s", "--json") == 0
    report = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert [t["name"] for t in report["tasks"]] == ["a", "b"] and report["tasks"][1]["lam"] == 0.5
    assert run("inspect", tmp_path / "s") == 0
    assert "mask" in capsys.readouterr().out
    assert run("export", tmp_path / "s", "b", tmp_path / "b") == 0
    LlamaForCausalLM.from_pretrained(tmp_path / "b")


# ---- bad input: a clear error and an unchanged state --------------------------------------------


def _break(kind, llamas, tmp_path):
    """A fine-tuned folder (or adapter) broken in one way, and the message the fold must give."""
    bad = tmp_path / "bad"
    base_state = state_of(llamas / "base")
    if kind in ("missing shard", "truncated", "corrupt"):
        save(finetune(tiny_llama(), base_state, seed=20), bad)
        shard = sorted(bad.glob("model-*.safetensors"))[1]
        if kind == "missing shard":
            shard.unlink()
        else:
            raw = shard.read_bytes()
            shard.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else raw[:8] + b"\xff" * 20 + raw[28:])
        return bad, shard.name
    if kind == "architecture":
        save(Qwen2ForCausalLM(Qwen2Config(**TINY)), bad)  # Llama's shapes, plus biases on q, k, v
        return bad, "language-model tensors the base .* lacks, e.g. 'model.layers.0.self_attn.k_proj.bias'"
    if kind == "shape":
        save(tiny_llama(intermediate_size=48), bad)
        return bad, r"different architecture: the language model of .* has intermediate_size 48 \(base 32\)"
    if kind == "dtype":
        save(finetune(tiny_llama(), base_state, seed=21).to(torch.bfloat16), bad)
        return bad, r"tensor '[\w.]+': torch.bfloat16 .* torch.float32"
    if kind == "nan":
        model = finetune(tiny_llama(), base_state, seed=22)
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
        save(model, bad)
        return bad, "model.layers.1.mlp.up_proj.weight.*NaN or Inf.*model-0000"
    if kind == "duplicate":
        return llamas / "ft2", "duplicate task name: 'task0'"
    if kind == "base itself":
        return llamas / "base", "task vector .* is zero .* the base itself"
    if kind == "lora other base":
        _adapter(tmp_path, tiny_llama(hidden_size=32))
        return tmp_path / "adapter", "LoRA adapter for another base"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "truncated", "corrupt", "architecture", "shape", "dtype", "nan",
                                  "duplicate", "base itself", "lora other base"])
def test_bad_input_is_named_and_leaves_the_state_unchanged(llamas, tmp_path, kind):
    state = tmp_path / "s"
    F.fold(state, llamas / "ft0", "task0", base=llamas / "base", progress=False)
    before = snapshot(state), sorted(p.relative_to(state) for p in state.rglob("*"))
    bad, message = _break(kind, llamas, tmp_path)
    name = "task0" if kind == "duplicate" else "new"
    with pytest.raises(ValueError, match=message):  # CheckpointError and StateError are ValueErrors
        F.fold(state, bad, name, progress=False)
    assert (snapshot(state), sorted(p.relative_to(state) for p in state.rglob("*"))) == before
