"""A real PEFT LoRA adapter, trained a few steps and saved with save_pretrained, read as dense task vectors:
scaling * B @ A (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) must equal PEFT's own
merge_and_unload() weights minus the base for every adapted weight, and zero elsewhere.

Three tiny randomly initialised transformers models cover PEFT's code paths: Linear (BERT), rsLoRA (Llama)
and fan_in_fan_out Conv1D (GPT-2), where the delta is (B @ A)^T.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mmer_cl import merging as M
from mmer_cl.checkpoints import Checkpoint
from mmer_cl.sources import LoraSource

VOCAB = 64
# merge_and_unload adds the delta to weights of magnitude <~ 1 in float32: (W + delta) - W is delta to ~1e-7.
ATOL = 1e-6


def tiny_bert():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    return BertModel(config), lambda model, ids: model(input_ids=ids).last_hidden_state[..., 0].mean()


def tiny_llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config), lambda model, ids: model(input_ids=ids, labels=ids).loss


def tiny_gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), lambda model, ids: model(input_ids=ids, labels=ids).loss


CASES = {
    "bert": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "llama-rslora": (tiny_llama, dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-fan-in-fan-out": (tiny_gpt2, dict(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn"])),
}


@dataclass
class Trained:
    base_dir: Path
    adapter_dir: Path
    base: dict[str, torch.Tensor]  # the state dict before LoRA
    merged: dict[str, torch.Tensor]  # merge_and_unload()'s state dict
    adapted: set[str]  # base names of the weights PEFT wrapped


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory) -> Trained:
    build, lora = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model, loss_of = build()
    model.save_pretrained(folder / "base")
    base = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    adapted = {
        name.removeprefix("base_model.model.") + ".weight"
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        loss_of(peft_model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder / "adapter")
    merged = {name: tensor.detach().clone() for name, tensor in peft_model.merge_and_unload().state_dict().items()}
    return Trained(folder / "base", folder / "adapter", base, merged, adapted)


def peft_scaling(config: dict) -> float:
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])


def dense_from_factors(adapter_dir: Path, scaling: float) -> dict[str, torch.Tensor]:
    """lora_delta of each A, B pair in the saved adapter, keyed by the base weight it updates."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight": M.lora_delta(
            factors[key], factors[key.replace(".lora_A.", ".lora_B.")], scaling, config["fan_in_fan_out"]
        )
        for key in factors
        if key.endswith(".lora_A.weight")
    }


def test_lora_delta_of_the_saved_factors_is_merge_and_unload_minus_base(trained):
    config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    dense = dense_from_factors(trained.adapter_dir, peft_scaling(config))
    assert set(dense) == trained.adapted
    shared, private = M.task_vectors(trained.base, trained.merged)
    assert not private and set(shared) == set(trained.base)
    for name, tau in shared.items():
        if name in dense:
            assert dense[name].abs().max() > 1e-3, f"{name}: the adapter did not train"
            torch.testing.assert_close(dense[name], tau, rtol=0, atol=ATOL, msg=name)
        else:
            assert not tau.any(), f"{name} is not adapted, yet merge_and_unload changed it"


def test_the_other_scaling_convention_would_not_match(trained):
    """Guards the test above against being blind to the scaling: lora_alpha / r and / sqrt(r) differ here."""
    config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    wrong = config["lora_alpha"] / (config["r"] if config["use_rslora"] else math.sqrt(config["r"]))
    dense = dense_from_factors(trained.adapter_dir, wrong)
    name = sorted(dense)[0]
    assert not torch.allclose(dense[name], trained.merged[name] - trained.base[name], rtol=0, atol=ATOL)


def test_checkpoints_lora_adapter_reads_the_dense_task_vectors(trained):
    base = Checkpoint(trained.base_dir)
    adapter = LoraSource(trained.adapter_dir, base)
    assert set(adapter.deltas) == trained.adapted and not adapter.private_tensors
    shared, _ = M.task_vectors(trained.base, trained.merged)
    for name in base.names:
        shape = base.info[name].shape
        tau = adapter.tau(name, 0, math.prod(shape)).reshape(shape)
        assert tau.dtype == torch.float32
        torch.testing.assert_close(tau, shared[name], rtol=0, atol=ATOL, msg=name)
    base.close()
