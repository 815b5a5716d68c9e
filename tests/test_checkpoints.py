"""Reading and writing weight files: lazy sharded reads, the shard writer, LoRA adapters as task vectors.

The tiny-model builders here are shared with test_store.py and test_fold.py.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmer_cl import merging
from mmer_cl.checkpoints import Checkpoint, CheckpointError, LoraAdapter, ShardWriter
from mmer_cl.fold import kth_largest_magnitude

torch.set_num_threads(1)

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


def tiny_llama(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def finetune(model, base_state: dict, seed: int, scale=0.01):
    """`model` with the base's weights plus seeded noise: a stand-in fine-tune with a dense task vector."""
    model.load_state_dict(base_state)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def save(model, path, shard="8KB"):
    model.save_pretrained(path, max_shard_size=shard)
    return path


def state_of(folder) -> dict:
    ckpt = Checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.names}


# ---- reading ------------------------------------------------------------------------------------------


def test_sharded_folder_reads_lazily_and_exactly(tmp_path):
    model = tiny_llama()
    save(model, tmp_path / "m")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    ckpt = Checkpoint(tmp_path / "m")
    expected = model.state_dict()
    assert set(ckpt.names) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor)
        flat = tensor.reshape(-1)
        assert torch.equal(ckpt.read(name, 3, min(11, flat.numel())), flat[3:11])
    assert ckpt.config["model_type"] == "llama"


def test_bf16_reads(tmp_path):
    tensors = {"a": torch.randn(5, 3).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


def test_missing_shard_is_named(tmp_path):
    save(tiny_llama(), tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        Checkpoint(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_file_is_named(tmp_path, damage):
    save(tiny_llama(), tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10] if damage == "truncate" else raw[:8] + b"#" + raw[9:])
    with pytest.raises(CheckpointError, match=shard.name):
        Checkpoint(tmp_path / "m")


# ---- writing ----------------------------------------------------------------------------------------


def test_planned_writer_streams_chunks_into_size_limited_shards(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 7 + i) for i in range(6)}
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, "model", 800, plan)
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), 16):
            writer.write(name, flat[start:start + 16])
    files = writer.close()
    writer.write_index()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert torch.equal(f.get_tensor(name), tensor)
    for file in files:
        header_and_data = (tmp_path / file).stat().st_size
        assert header_and_data < 800 + 400  # data within the limit, plus its header
    from mmer_cl.checkpoints import sha256_file
    assert all(sha256_file(tmp_path / f) == digest for f, digest in files.items())


def test_planned_writer_refuses_out_of_order_tensors(tmp_path):
    writer = ShardWriter(tmp_path, "x", 1 << 20, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(CheckpointError, match="plan expects 'a'"):
        writer.write("b", torch.zeros(2))


def test_unplanned_writer_round_trip(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 30, dtype=torch.int32) for i in range(1, 5)}
    writer = ShardWriter(tmp_path, "vector", 200)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.close()
    assert len(files) > 1 and all("-of-" in f for f in files)
    ckpt = Checkpoint([tmp_path / f for f in files])
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


# ---- streamed trim threshold ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_streamed_threshold_equals_magnitude_threshold(k):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=generator)
    x[:100] = 0.25  # ties in magnitude
    x[100:200] = -0.25
    x[200:300] = 0.0
    chunks = lambda: iter(x.split(777))  # noqa: E731
    assert kth_largest_magnitude(chunks, math.ceil(k * x.numel())) == merging.magnitude_threshold([x], k)


# ---- LoRA adapters -----------------------------------------------------------------------------


def _adapter(tmp_path, model, seed=0, **config):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA starts with B = 0; give it a real update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}])
def test_lora_adapter_gives_merge_and_unload_minus_base(tmp_path, config):
    base_model = tiny_llama()
    base_state = {n: t.clone() for n, t in base_model.state_dict().items()}
    save(base_model, tmp_path / "base")
    peft_model = _adapter(tmp_path, base_model, **config)
    merged = peft_model.merge_and_unload().state_dict()
    base = Checkpoint(tmp_path / "base")
    adapter = LoraAdapter(tmp_path / "adapter", base)
    assert len(adapter.deltas) == 2 * 3  # three modules in each of two layers
    for name in base.names:
        numel = base.info[name].numel
        tau = adapter.tau(name, base, 0, numel).reshape(base.info[name].shape)
        torch.testing.assert_close(tau, merged[name] - base_state[name], atol=1e-6, rtol=1e-5)


def test_lora_adapter_for_another_base_is_refused(tmp_path):
    save(tiny_llama(), tmp_path / "base")
    _adapter(tmp_path, tiny_llama(intermediate_size=48))
    with pytest.raises(CheckpointError, match="LoRA adapter for another base.*down_proj"):
        LoraAdapter(tmp_path / "adapter", Checkpoint(tmp_path / "base"))
