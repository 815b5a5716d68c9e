"""What the training baselines need beyond Avalanche's own strategies: their settings, what each keeps
between experiences (measured as the tensors it really holds), and joint multi-task training."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmer_cl import experts
from mmer_cl.bench.glue import TaskSpec, optimizer_for

# Avalanche baselines' settings: common defaults from the Avalanche examples and papers, used as they are
# where a profile gives no grid (settings_grid).
EWC_LAMBDA = 100.0
LWF_ALPHA, LWF_TEMPERATURE = 1.0, 2.0
REPLAY_MEM_PER_TASK = 100  # the storage budget: 100 examples per task, fixed rather than tuned


def settings_grid(name: str, profile) -> list[dict]:
    """The strategy options to choose among on validation: the profile's grid, or the one default point."""
    if name == "ewc":
        return [{"ewc_lambda": float(v)} for v in (profile.ewc_lambdas or (EWC_LAMBDA,))]
    if name == "lwf":
        return [{"alpha": float(a), "temperature": float(t)}
                for a, t in (profile.lwf_settings or ((LWF_ALPHA, LWF_TEMPERATURE),))]
    return [{}]


def kept_state(strategy) -> dict:
    """What a strategy keeps between experiences besides its model: EWC's saved parameters and importances,
    LwF's copy of the previous model, Replay's buffer of examples (their input tensors)."""
    from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin

    vectors, buffer = [], None
    for plugin in strategy.plugins:
        if isinstance(plugin, EWCPlugin):
            for stored in (plugin.saved_params, plugin.importances):
                vectors += [p.data for by_name in stored.values() for p in by_name.values()]
        elif isinstance(plugin, LwFPlugin) and plugin.lwf.prev_model is not None:
            vectors += list(plugin.lwf.prev_model.state_dict().values())
        elif isinstance(plugin, ReplayPlugin):
            buffer = plugin.storage_policy.buffer
    return {"vectors": vectors, "buffer": buffer}


def train_joint(model: nn.Module, specs: Sequence[TaskSpec], train_sets: Mapping[str, object], *, steps: int,
                batch_size: int, seed: int, shared, progress=None) -> nn.Module:
    """Joint multi-task training (an upper bound: it needs every task's data at once): `steps` AdamW steps,
    task t = step mod T, each on a batch of that task's data through its own modules, with the experts' recipe
    over the whole run (warm-up, linear decay, gradient norm clipped), so that it is not a weaker trainer."""
    generator = torch.Generator().manual_seed(seed)
    loaders = {spec.name: _cycle(torch.utils.data.DataLoader(train_sets[spec.name], batch_size=batch_size, shuffle=True,
                                                             generator=generator)) for spec in specs}
    optimizer = optimizer_for(model, shared)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: experts.schedule(step, steps))
    model.train()
    for step in range(steps):
        spec = specs[step % len(specs)]
        x, y = experts.to_device(next(loaders[spec.name]), model)
        loss = nn.functional.cross_entropy(model(x, task=spec.name), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), experts.MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


def _cycle(loader):
    while True:
        yield from loader
