"""Reading and writing weight files: lazy sharded reads, the shard writer, LoRA adapters as task vectors.

The tiny-model builders here are shared with test_store.py and test_fold.py.
"""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmer_cl import merging
from mmer_cl.checkpoints import BufferedWriter, Checkpoint, CheckpointError, PlannedWriter
from mmer_cl.kernels import kth_largest_magnitude
from mmer_cl.sources import LoraSource

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
    writer = PlannedWriter(tmp_path, "model", 800, plan)
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
    writer = PlannedWriter(tmp_path, "x", 1 << 20, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(CheckpointError, match="plan expects 'a'"):
        writer.write("b", torch.zeros(2))


def test_buffered_writer_round_trip(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 30, dtype=torch.int32) for i in range(1, 5)}
    writer = BufferedWriter(tmp_path, "vector", 200)
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
    adapter = LoraSource(tmp_path / "adapter", base)
    assert len(adapter.deltas) == 2 * 3  # three modules in each of two layers
    for name in base.names:
        numel = base.info[name].numel
        tau = adapter.tau(name, 0, numel).reshape(base.info[name].shape)
        torch.testing.assert_close(tau, merged[name] - base_state[name], atol=1e-6, rtol=1e-5)


def test_lora_adapter_for_another_base_is_refused(tmp_path):
    save(tiny_llama(), tmp_path / "base")
    _adapter(tmp_path, tiny_llama(intermediate_size=48))
    with pytest.raises(CheckpointError, match="LoRA adapter for another base.*down_proj"):
        LoraSource(tmp_path / "adapter", Checkpoint(tmp_path / "base"))


# ---- strict safetensors headers (issue 12, item 5) --------------------------------------------------


def _entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _craft(path, header, data_bytes: int, text: str | None = None):
    """A safetensors file with the given header (a dict, or raw JSON `text`) and `data_bytes` of data."""
    import struct

    raw = (text if text is not None else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_bytes // 256)
                     + bytes(data_bytes % 256))
    return path


F32_2 = ("F32", [2])  # 8 bytes
# name: (header, data bytes, the tensor the message must name, what it must say, whether the safetensors library
# refuses it too)
CRAFTED = {
    "negative-offsets": ({"a": _entry(*F32_2, [-8, 0]), "b": _entry(*F32_2, [0, 8])}, 8, "a", 'non-negative', True),
    "begin-after-end": ({"a": _entry(*F32_2, [0, 8]), "b": _entry("F32", [0], [8, 0])}, 8, "b", 'end before they begin', True),
    "two-tensors-share-bytes": ({"a": _entry(*F32_2, [0, 8]), "b": _entry(*F32_2, [0, 8])}, 8, "b", 'share bytes', True),
    "partial-overlap": ({"a": _entry(*F32_2, [0, 8]), "b": _entry(*F32_2, [4, 12])}, 12, "b", "overlaps tensor 'a'", True),
    "empty-tensor-inside-another": ({"a": _entry("F32", [4], [0, 16]), "z": _entry("F32", [0], [8, 8])}, 16, "z", "overlaps tensor 'a'", True),
    "gap-between-tensors": ({"a": _entry(*F32_2, [0, 8]), "b": _entry(*F32_2, [16, 24])}, 24, "b", 'gap of 8 bytes', True),
    "data-not-from-zero": ({"a": _entry(*F32_2, [8, 16])}, 16, "a", 'gap of 8 bytes', True),
    "bytes-after-the-last-tensor": ({"a": _entry(*F32_2, [0, 8]), "b": _entry(*F32_2, [8, 16])}, 24, "b", '8 bytes that no tensor owns', True),
    "offsets-beyond-the-file": ({"a": _entry(*F32_2, [0, 8]), "b": _entry(*F32_2, [8, 16])}, 8, "b", 'truncated', True),
    "negative-shape": ({"a": _entry("F32", [-2, -1], [0, 8])}, 8, "a", 'shape must be', True),
    "float-shape": ({"a": _entry("F32", [2.0], [0, 8])}, 8, "a", 'shape must be', True),
    "bool-shape": ({"a": _entry("F32", [True, 2], [0, 8])}, 8, "a", 'shape must be', True),
    "float-offsets": ({"a": _entry(*F32_2, [0, 8.0])}, 8, "a", 'data_offsets must be', True),
    "three-offsets": ({"a": _entry(*F32_2, [0, 8, 8])}, 8, "a", 'data_offsets must be', True),
    "unknown-dtype": ({"a": _entry("Q7", [2], [0, 8])}, 8, "a", "unknown or unsupported dtype 'Q7'", True),
    "span-not-shape": ({"a": _entry("F32", [3], [0, 8])}, 8, "a", 'spans 8 bytes, its shape \\[3\\] of F32 needs 12', True),
    "metadata-not-strings": ({"__metadata__": {"format": 1}, "a": _entry(*F32_2, [0, 8])}, 8, "__metadata__", 'must map strings to strings', True),
    "metadata-not-a-map": ({"__metadata__": ["pt"], "a": _entry(*F32_2, [0, 8])}, 8, "__metadata__", 'must map strings to strings', True),
    "entry-not-a-map": ({"a": [0, 8]}, 8, "a", 'not a JSON object', True),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_header_is_refused_naming_file_and_tensor(tmp_path, case):
    from mmer_cl.checkpoints import read_header

    header, data_bytes, tensor, says, library_refuses = CRAFTED[case]
    path = _craft(tmp_path / "model.safetensors", header, data_bytes)
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    message = str(caught.value)
    assert str(path) in message and f"'{tensor}'" in message, message
    assert re.search(says, message), message
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)
    if library_refuses:  # as strict as the safetensors library, which refuses each of these too
        with pytest.raises(Exception):
            with safe_open(path, "pt") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_duplicate_tensor_name_in_header_is_refused(tmp_path):
    """Stricter than the safetensors library (which keeps the last of two equal keys): ambiguous, refused."""
    from mmer_cl.checkpoints import read_header

    text = '{"a": %s, "a": %s}' % (json.dumps(_entry(*F32_2, [0, 8])), json.dumps(_entry(*F32_2, [0, 8])))
    path = _craft(tmp_path / "x.safetensors", None, 8, text=text)
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*'a'.*twice"):
        read_header(path)


def test_negative_offsets_would_have_read_header_bytes_as_weights(tmp_path):
    """The exploit of issue 12 item 5: offsets pointing before the data section are refused, not read."""
    header = {"w": _entry("F32", [6], [-16, 8])}
    path = _craft(tmp_path / "model.safetensors", header, 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'w'"):
        Checkpoint(tmp_path)


def test_valid_files_written_by_safetensors_still_read(tmp_path):
    from mmer_cl.checkpoints import read_header

    tensors = {"w": torch.randn(3, 4), "empty": torch.zeros(0, 5), "ids": torch.arange(5, dtype=torch.int64),
               "h": torch.randn(7).to(torch.bfloat16), "scalar": torch.tensor(2.5), "flag": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "kept"})
    header, data_start = read_header(tmp_path / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt", "note": "kept"}
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.names) == set(tensors)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())
    save_file({}, tmp_path / "nothing.safetensors")
    assert Checkpoint([tmp_path / "nothing.safetensors"]).names == []
    # leading whitespace and space padding after the JSON are valid, as the library reads them
    path = _craft(tmp_path / "padded.safetensors", None, 8, text=" " + json.dumps({"a": _entry(*F32_2, [0, 8])}) + "   ")
    assert Checkpoint([path]).read("a").shape == (2,)
