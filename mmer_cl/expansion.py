"""Expansion: one decoupled model answers an input that carries several modalities (SPEC, "Decoupled model").

A mixed input is the concatenation of each modality's tokens, each through its own task's private encoder
(MiniMLLM.mixed_inputs); the shared backbone then runs on one of three weightings of the same MMER state:
- `union`:  theta0 + (m_1 | ... | m_K) * tau_star, the masks of the input's modalities OR-ed;
- `merged`: theta0 + tau_star;
- `routed`: each token through its own modality's decoupled weights theta0 + m_k * tau_star, in every Linear,
  LayerNorm and Embedding of the backbone (`RoutedBackbone`); attention still mixes all tokens. The answers'
  encodings, text the model reads rather than an input modality, go through the merged weights.
The first two are plain state dicts (decoupled.combined_state_dict); the third keeps one backbone per
modality. Nothing here is trained on mixed inputs.
"""

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmer_cl import models

PER_TOKEN_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding)


class Route:
    """Which weight set each token uses: index [B, N] (or broadcastable), and the sets it names."""

    def __init__(self):
        self.index: Tensor | None = None
        self.present: tuple[int, ...] = ()

    def set(self, index: Tensor) -> None:
        self.index, self.present = index, tuple(int(k) for k in torch.unique(index))


class PerToken(nn.Module):
    """out[..., i, :] = copies[route.index[..., i]](x)[..., i, :]: a module whose weights depend on the token.
    Each weight set runs on its own tokens only, so a routed forward costs about one plain forward."""

    def __init__(self, copies: Sequence[nn.Module], route: Route):
        super().__init__()
        self.copies, self.route = nn.ModuleList(copies), route

    def forward(self, x: Tensor) -> Tensor:
        present = self.route.present
        if len(present) == 1:
            return self.copies[present[0]](x)
        ids = isinstance(self.copies[0], nn.Embedding)  # x: ids [..., N], not features [..., N, d]
        lead = torch.broadcast_shapes(x.shape if ids else x.shape[:-1], self.route.index.shape)  # position ids [1, N]
        which = self.route.index.expand(lead).reshape(-1)
        flat = x.expand(lead).reshape(-1) if ids else x.expand(*lead, x.shape[-1]).reshape(-1, x.shape[-1])
        out = None
        for k in present:
            rows = torch.nonzero(which == k).squeeze(1)
            y = self.copies[k](flat[rows])
            if out is None:
                out = y.new_empty(len(which), *y.shape[1:])
            out[rows] = y
        return out.reshape(*lead, *out.shape[1:])


class RoutedBackbone(nn.Module):
    """A backbone with one weight set per entry of `weight_sets` (state dicts of `template`'s parameters),
    chosen per token: forward(route [B, N], **backbone inputs)."""

    def __init__(self, template: nn.Module, weight_sets: Sequence[dict[str, Tensor]]):
        super().__init__()
        copies = []
        for weights in weight_sets:
            backbone = copy.deepcopy(template)
            backbone.load_state_dict(weights)
            copies.append(backbone.eval())
        self.route, self.backbone = Route(), copies[0]
        leaves = [name for name, module in copies[0].named_modules() if isinstance(module, PER_TOKEN_MODULES)]
        for name in leaves:
            parent, _, attribute = name.rpartition(".")
            owner = copies[0].get_submodule(parent) if parent else copies[0]
            setattr(owner, attribute, PerToken([c.get_submodule(name) for c in copies], self.route))

    def word_embeddings(self, k: int) -> nn.Module:
        return self.backbone.embeddings.word_embeddings.copies[k]

    def forward(self, route: Tensor, **inputs):
        self.route.set(route)
        return self.backbone(**inputs)


class RoutedModel:
    """A MiniMLLM's private modules with a RoutedBackbone: `tasks` name the weight sets 0..K-1, one per
    modality's task, and set K is the merged weights for the answers."""

    def __init__(self, model: models.MiniMLLM, tasks: Sequence[str], per_task: Sequence[dict[str, Tensor]],
                 merged: dict[str, Tensor]):
        self.model, self.tasks = model, list(tasks)
        self.backbone = RoutedBackbone(model.backbone, [*per_task, merged])

    def features(self, parts: dict[str, Tensor]) -> Tensor:
        sets = torch.tensor([self.tasks.index(task) for task in parts])
        text = [task for task in parts if self.model.config.tasks[task]["modality"] == "text"]
        embed = self.backbone.word_embeddings(self.tasks.index(text[0])) if text else None
        inputs = self.model.mixed_inputs(parts, word_embeddings=embed)
        route = sets[inputs.pop("segments")]
        return models.pooled(lambda **kw: self.backbone(route, **kw), **inputs)

    def answers(self, task: str) -> Tensor:
        merged = len(self.tasks)
        return self.model.answer_embeddings(task, lambda **kw: self.backbone(torch.tensor([[merged]]), **kw))


def mixed_features(model: models.MiniMLLM, parts: dict[str, Tensor]) -> Tensor:
    """Pooled features of a mixed input with the weights the model holds (union, merged, or any merge)."""
    inputs = model.mixed_inputs(parts)
    inputs.pop("segments")
    return models.pooled(model.backbone, **inputs)


@torch.no_grad()
def mixed_logits(model, batches, answer_task: str) -> Tensor:
    """Logits [N, classes] of mixed inputs, batch after batch of {task: inputs}: cosine to the answers'
    encodings (the scale changes no argmax, so none is applied). `model` is a MiniMLLM holding the weights
    to use, or a RoutedModel."""
    routed = isinstance(model, RoutedModel)
    answers = model.answers(answer_task) if routed else model.answer_embeddings(answer_task)
    answers = nn.functional.normalize(answers, dim=-1)
    out = []
    for parts in batches:
        features = model.features(parts) if routed else mixed_features(model, parts)
        out.append(nn.functional.normalize(features, dim=-1) @ answers.T)
    return torch.cat(out)
