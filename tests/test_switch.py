"""TaskSwitcher gives the bits of decoupled_state_dict after any chain of switches, in every state mode, for
bfloat16 and float32 weights; a state with tau_dtype="weights" keeps tau_star rounded once to the weights'
dtype, the same masks, and decouples from the rounded values."""

import pytest
import torch
from transformers import LlamaForCausalLM

from mmer_cl import decoupled, merging, store
from mmer_cl import fold as F
from test_checkpoints import finetune, save, tiny_llama

torch.set_num_threads(1)
TASKS = ("a", "b", "c")
WIDE = dict(vocab_size=300)  # embeddings of 4800 entries: more than one kernels.CHUNK


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    base = tiny_llama(**WIDE).to(request.param)
    save(base, root / "base")
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    for i, task in enumerate(TASKS):
        save(finetune(tiny_llama(**WIDE).to(request.param), base_state, seed=20 + i), root / task)
    return root


def fold_tasks(models, state, **settings):
    for i, task in enumerate(TASKS):
        F.fold(state, models / task, task, base=models / "base" if i == 0 else None, progress=False, **settings)
    return {task: decoupled.decoupled_state_dict(state, task) for task in TASKS}


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def holds(model, expected: dict) -> bool:
    weights = model.state_dict()
    return all(same_bits(weights[n], t) for n, t in expected.items())


@pytest.mark.parametrize("settings", [dict(mode="exact"), dict(mode="compact"), dict(mode="sparse"),
                                      dict(mode="exact", mask_rule="none"), dict(mode="exact", mask_rule="emr"),
                                      dict(mode="compact", tau_dtype="weights")],
                         ids=["exact", "compact", "sparse", "no-masks", "emr-scales", "compact-tau-in-weights-dtype"])
def test_a_chain_of_switches_gives_every_task_bit_for_bit(models, tmp_path, settings):
    expected = fold_tasks(models, tmp_path / "s", **settings)
    differ = any(not same_bits(expected["a"][n], expected["b"][n]) for n in expected["a"])
    assert differ == (settings.get("mask_rule") != "none")  # without masks every task is theta0 + tau_star
    model = LlamaForCausalLM.from_pretrained(models / "base")
    pointers = {n: t.data_ptr() for n, t in model.state_dict().items()}
    switcher = decoupled.TaskSwitcher(model, tmp_path / "s")
    for task in ("a", "b", "c", "a", "a", "c"):
        switcher.switch(task)
        assert switcher.current == task and holds(model, expected[task])
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == pointers  # in place
    switcher.to_base()
    switcher.switch("b")
    assert holds(model, expected["b"])


def test_tau_star_in_the_weights_dtype_is_the_float32_one_rounded_once(models, tmp_path):
    """Exact mode recomputes tau_star from the kept float32 vectors at every fold, so each generation's
    stored tau_star is the float32 state's rounded to the weights' dtype, in its bytes; the masks, found
    before the rounding, are the same; every task decouples from the rounded tau_star."""
    fold_tasks(models, tmp_path / "f32")
    expected = fold_tasks(models, tmp_path / "w", tau_dtype="weights")
    f32, weights = store.load(tmp_path / "f32"), store.load(tmp_path / "w")
    base = F.base_path(weights.manifest, tmp_path / "w")
    theta0 = {n: t for n, t in LlamaForCausalLM.from_pretrained(base).state_dict().items()}
    dtype = next(iter(theta0.values())).dtype
    tau_f32, tau_w = f32.tau_star(), weights.tau_star()
    for name in tau_f32.names:
        assert same_bits(tau_w.read(name), tau_f32.read(name).to(dtype))
        for task in TASKS:
            assert torch.equal(f32.masks(f32.task(task)).read(name), weights.masks(weights.task(task)).read(name))
    stored = lambda state: sum(state.size(f) for f in state.manifest["tau_star_files"])  # noqa: E731
    assert stored(weights) < stored(f32) * (0.6 if dtype == torch.bfloat16 else 1.01)
    for task in TASKS:
        entry, masks = weights.task(task), weights.masks(weights.task(task))
        for name, tensor in expected[task].items():
            mask = merging.unpack_mask(masks.read(name), tensor.shape)
            want = merging.decouple(theta0[name], mask, tau_w.read(name).float(), entry["scale"])
            assert same_bits(tensor, want)


def test_an_unknown_tau_dtype_is_refused_before_anything_is_written(models, tmp_path):
    with pytest.raises(store.StateError, match="tau_dtype must be one of .*'float16'"):
        F.fold(tmp_path / "s", models / "a", "a", base=models / "base", progress=False, tau_dtype="float16")
    assert not (tmp_path / "s").exists()
