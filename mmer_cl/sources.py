"""Where a fold's new task vector comes from: a transformers folder, a model's state dict in memory, or a
PEFT LoRA adapter folder, each over the base theta0.

    model      tau = theta_T - theta0 for every base tensor; the model's other tensors are private
    adapter    tau = scaling * B @ A for every adapted base weight (zero elsewhere), scaling = lora_alpha / r
               (lora_alpha / sqrt(r) with rsLoRA); a `modules_to_save` copy of a base weight gives w - theta0

Shared parameters are the base's names; a task's model may name them differently (LLaVA, LLaVA-NeXT and
Qwen2-Audio folders store the language model as `language_model.model.*`, Idefics3 and SmolVLM as
`model.text_model.*`, a transformers 5 state dict as `model.language_model.*`, Qwen2-VL folders and a plain
Llama/Qwen2 base as `model.*`): the name map is a list of (base prefix, task prefix) rules, detected among the
known layouts (KNOWN_NAME_MAPS) or given. The language models must agree in their config (hidden size, layers,
heads, vocabulary ...), whatever their model types. Everything else in the task's model (vision or audio tower,
projector, heads) is that task's private parameters, except tensors that belong to the language model but that
the base lacks (an extra layer): those are refused unless allowed, since they would silently stay private.
"""

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mmer_cl import kernels, merging
from mmer_cl.checkpoints import Checkpoint, CheckpointError, TensorCheckpoint, is_lora_adapter, read_adapter

# The layouts a transformers model stores its language model in, over a `model.*` + `lm_head.*` base (each a
# rule list, first match per name; a name no rule matches keeps its name). Tried in order, the first under which
# every base tensor is found wins:
#   []                                    the base's own names: Qwen2-VL and Qwen2.5-VL folders (`model.*`,
#                                         `lm_head.*`, tower `visual.*`), a plain Llama/Qwen2 fine-tune
#   [["", "language_model."]]             LLaVA, LLaVA-NeXT, Qwen2-Audio folders (`language_model.model.*`,
#                                         `language_model.lm_head.*`; towers, projector, `image_newline` at the top)
#   [["model.", "model.language_model."]] the same models' state dicts in memory (transformers 5), and folders
#                                         saved that way (`model.language_model.*`, `lm_head.*`, `model.visual.*` ...)
#   [["model.", "model.text_model."]]     Idefics2, Idefics3, SmolVLM folders and state dicts (`model.text_model.*`,
#                                         `lm_head.*`; `model.vision_model.*`, `model.connector.*`)
KNOWN_NAME_MAPS = ([], [["", "language_model."]], [["model.", "model.language_model."]],
                   [["model.", "model.text_model."]])
# What makes two language models the same architecture: the shapes their weights take.
ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size")
LM_CONFIG_KEYS = ("text_config", "llm_config", "language_config", "text_model_config")


# ---- names ------------------------------------------------------------------------------------------


def map_name(name: str, rules: list[list[str]]) -> str:
    """The task-model name of base tensor `name`: the first rule whose base prefix matches rewrites it."""
    for base_prefix, task_prefix in rules:
        if name.startswith(base_prefix):
            return task_prefix + name[len(base_prefix):]
    return name


def detect_name_map(base: Checkpoint, finetuned: Checkpoint, given: list[list[str]] | None = None) -> list[list[str]]:
    """The first rule list (the given one, else each known layout) under which every base tensor is in the model."""
    candidates = [given] if given is not None else KNOWN_NAME_MAPS
    for rules in candidates:
        if all(map_name(name, rules) in finetuned for name in base.names):
            return rules
    rules = candidates[0]
    missing = [name for name in base.names if map_name(name, rules) not in finetuned]
    raise CheckpointError(
        f"{finetuned.folder} lacks {len(missing)} of the base's {len(base.names)} tensors "
        f"(e.g. '{map_name(missing[0], rules)}'). Tried name maps {list(candidates)}; give "
        f"prefix_map [[BASE_PREFIX, TASK_PREFIX]] (--prefix-map BASE_PREFIX=TASK_PREFIX) if the names differ."
    )


def language_model_config(config: dict) -> dict:
    """The language model's part of a (multimodal) config: its text_config or the like, else the config."""
    for key in LM_CONFIG_KEYS:
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def check_architecture(base: Checkpoint, finetuned: Checkpoint) -> None:
    """The two language models must agree in every shape-deciding field both configs state (hidden size,
    layers, heads, vocabulary ...); model types may differ (a qwen2_vl_text model on a qwen2 base is fine)."""
    ours, theirs = language_model_config(base.config), language_model_config(finetuned.config)
    differ = [f"{field} {theirs[field]} (base {ours[field]})" for field in ARCHITECTURE_FIELDS
              if field in ours and field in theirs and ours[field] != theirs[field]]
    if differ:
        raise CheckpointError(f"different architecture: the language model of {finetuned.folder} has "
                              f"{', '.join(differ)}; the base is {base.folder}")


def extra_language_model_names(base: Checkpoint, rules: list[list[str]], private: list[str]) -> list[str]:
    """Private tensors that are the image of a base-like name under the map (e.g. `model.layers.2.*` when the
    base has layers 0-1): language-model weights the base lacks, not a tower or a projector."""
    roots = {name.split(".")[0] for name in base.names}
    extra = []
    for name in private:
        preimages = [base_prefix + name[len(task_prefix):] for base_prefix, task_prefix in rules
                     if name.startswith(task_prefix)] + [name]
        if any(map_name(x, rules) == name and x.split(".")[0] in roots for x in preimages):
            extra.append(name)
    return extra


# ---- sources ------------------------------------------------------------------------------------------


class ModelSource:
    """tau = theta_T - theta0 from a transformers folder or an in-memory state dict."""

    kind = "model"

    def __init__(self, model: Checkpoint, base: Checkpoint, prefix_map=None, allow_extra: bool = False):
        self.model, self.base = model, base
        self.folder = model.folder
        check_architecture(base, model)
        self.name_map = detect_name_map(base, model, prefix_map)
        for name in base.names:
            mine, theirs = model.info[map_name(name, self.name_map)], base.info[name]
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise CheckpointError(f"tensor '{name}': {mine.dtype} {mine.shape} in {mine.file}, "
                                      f"{theirs.dtype} {theirs.shape} in the base {theirs.file}")
        shared = {map_name(name, self.name_map) for name in base.names}
        self.private_names = [name for name in model.names if name not in shared]
        # a state dict in memory is a model its caller assembled (MMERPlugin): what the base lacks is private
        extra = extra_language_model_names(base, self.name_map, self.private_names) if model.folder else []
        if extra:
            message = (f"{self.folder}: {len(extra)} language-model tensors the base {base.folder} lacks, e.g. "
                       f"'{extra[0]}' (a deeper or wider model than the base?)")
            if not allow_extra:
                raise CheckpointError(message + "; allow_extra=True (--allow-extra) keeps them as private parameters")
            warnings.warn(message + "; kept as this task's private parameters", stacklevel=2)

    def tau(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        mine = map_name(name, self.name_map)
        if not self.base.info[name].dtype.is_floating_point:  # an integer buffer is never merged: kept exactly
            if not torch.equal(self.base.read(name, start, stop), self.model.read(mine, start, stop)):
                raise CheckpointError(f"tensor '{name}' ({self.base.info[name].dtype}, not floating point, so never "
                                      f"merged) differs from the base's (fine-tuned file {self.model.info[mine].file})")
            return torch.zeros(stop - start) if out is None else out.zero_()
        try:
            return kernels.task_vector(self.base.read(name, start, stop), self.model.read(mine, start, stop), name, out)
        except ValueError as error:
            raise CheckpointError(f"{error} (fine-tuned file {self.model.info[mine].file})") from None

    def private(self, name: str, start: int, stop: int) -> Tensor:
        return self.model.read(name, start, stop)

    def private_info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.model.info[name].dtype, self.model.info[name].shape

    def fingerprint(self) -> dict:
        return self.model.fingerprint()


_FACTOR = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module patterns win."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("rank_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            rank = value
    for key, value in (config.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class LoraSource:
    """A PEFT LoRA adapter folder as a dense task vector over the base (module docstring). PEFT names a
    factor `base_model.model.<module>.lora_A.weight`; its base weight is `<module>.weight`."""

    kind = "lora"

    def __init__(self, folder, base: Checkpoint):
        self.folder, self.base, self.name_map = Path(folder), base, []
        self.config, weights = read_adapter(self.folder)
        if self.config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self.folder}: a {self.config.get('peft_type')} adapter, only LoRA is supported")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.folder}: DoRA adapters have no plain B @ A delta; not supported")
        factors: dict[str, dict[str, Tensor]] = {}
        self.full: dict[str, Tensor] = {}  # base weights replaced whole (modules_to_save), by base name
        self.private_tensors: dict[str, Tensor] = {}
        for name, tensor in weights.items():
            merging.check_finite(tensor, name, f"in {self.folder / 'adapter_model.safetensors'}")
            match = _FACTOR.match(name)
            if match:
                module, kind = match.groups()
                factors.setdefault(module, {})[kind] = tensor
                continue
            plain = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            (self.full if plain in base else self.private_tensors)[plain] = tensor
        self.deltas = {target: value for module, pair in factors.items()
                       for target, value in [self._delta_of(module, pair)]}
        for name, tensor in self.full.items():
            if tensor.shape != base.info[name].shape:
                raise CheckpointError(f"{self.folder}: LoRA adapter for another base: '{name}' has shape "
                                      f"{tuple(tensor.shape)}, the base's is {base.info[name].shape}")
        if not self.deltas and not self.full:
            raise CheckpointError(f"{self.folder}: the adapter changes no weight of the base")
        self.private_names = list(self.private_tensors)
        self._cache: tuple[str, Tensor] | None = None

    def _delta_of(self, module: str, pair: dict) -> tuple[str, tuple]:
        embedding = "lora_embedding_A" in pair
        a = pair.get("lora_embedding_A" if embedding else "lora_A")
        b = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise CheckpointError(f"{self.folder}: module '{module}' has only one of its LoRA factors")
        target = f"{module}.weight"
        if target not in self.base:
            raise CheckpointError(f"{self.folder}: LoRA adapter for another base: it adapts '{target}', "
                                  f"which the base {self.base.folder} does not have")
        # PEFT's Embedding layer computes (B @ A)^T, as a fan_in_fan_out Linear does.
        fan_in_fan_out = embedding or bool(self.config.get("fan_in_fan_out"))
        shape = tuple(a.shape[1:2]) + tuple(b.shape[:1]) if fan_in_fan_out else (b.shape[0], a.shape[1])
        if shape != self.base.info[target].shape:
            raise CheckpointError(f"{self.folder}: LoRA adapter for another base: '{target}' gets a delta of shape "
                                  f"{shape}, the base's is {self.base.info[target].shape}")
        return target, (a, b, lora_scaling(self.config, module, a.shape[0]), fan_in_fan_out)

    def tau(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        if name in self.deltas:
            cached = self._cache  # one local reference: worker threads may replace the cache meanwhile
            if cached is None or cached[0] != name:
                a, b, scaling, fan_in_fan_out = self.deltas[name]
                cached = self._cache = (name, merging.lora_delta(a, b, scaling, fan_in_fan_out).contiguous().view(-1))
            tau = cached[1][start:stop]
        elif name in self.full:
            theta0 = self.base.read(name, start, stop)
            tau = merging.task_vector(theta0, self.full[name].reshape(-1)[start:stop].to(theta0.dtype), name)
        else:
            tau = torch.zeros(stop - start)
        return tau if out is None else out.copy_(tau)

    def private(self, name: str, start: int, stop: int) -> Tensor:
        return self.private_tensors[name].reshape(-1)[start:stop]

    def private_info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.private_tensors[name].dtype, tuple(self.private_tensors[name].shape)

    def fingerprint(self) -> dict:
        return Checkpoint([self.folder / "adapter_model.safetensors"]).fingerprint()


def open_source(finetuned, base: Checkpoint, prefix_map=None, allow_extra: bool = False):
    """The source of a fine-tuned model: a PEFT adapter folder, a transformers folder, or a state dict."""
    if isinstance(finetuned, Mapping):
        return ModelSource(TensorCheckpoint(finetuned), base, prefix_map, allow_extra)
    if is_lora_adapter(finetuned):
        return LoraSource(finetuned, base)
    return ModelSource(Checkpoint(finetuned), base, prefix_map, allow_extra)
