"""Expert fine-tuning: one task's model trained from the pretrained backbone theta_0, fully or with LoRA.

An expert is theta_i = theta_0 + tau_i on the shared backbone plus its task's private modules (encoder,
projector, head). Full fine-tuning trains every backbone weight; LoRA trains rank-r factors on the backbone's
attention and dense matrices (tau_i = (alpha/r) B A there, zero elsewhere). Private modules always train fully.

Two learning rates: the new private modules start from random and need a large one; the pretrained backbone
needs a small one so that its task vector stays a small step from theta_0 (which merging relies on).
AdamW without weight decay (decay would add a pull towards zero to every task vector that no task asked for),
fused (one kernel over all parameters: on a CPU the per-tensor update otherwise costs as much as a backward
pass of the 22M-parameter backbone), linear warm-up then linear decay, gradient norm clipped at 1. The data
order and the new modules' initialisation follow `seed`; a time budget stops training after the step that crosses it.
"""

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmer_cl import models

# Chosen on the validation splits (see `mmer-cl train-expert`); backbone = the backbone's weights (full) or the
# LoRA factors (lora).
PRIVATE_LR = 1e-3
BACKBONE_LR = {"full": 5e-5, "lora": 1e-3}
WARMUP_FRACTION = 0.06
MAX_GRAD_NORM = 1.0


def _parts(splits):
    """(train, val) from a data.Splits or a (train, val[, test]) tuple."""
    if hasattr(splits, "train"):
        return splits.train, getattr(splits, "val", None)
    return splits[0], splits[1] if len(splits) > 1 else None


def _num_classes(splits, train) -> int:
    classes = getattr(splits, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(int(y) for y in train.targets)) + 1


def _start_model(task: str, modality: str, num_classes: int, input_shape, seed: int, init) -> models.MiniMLLM:
    if init is None:
        return models.build_model([(task, modality, num_classes, input_shape)], seed=seed)
    model = models.load_model(init)
    if not isinstance(model, models.MiniMLLM):
        raise ValueError(f"init {init} is a LoRA adapter; start full fine-tuning from a full model folder")
    if task not in model.config.tasks:
        torch.manual_seed(seed)
        model.add_task(task, models.task_spec(modality, num_classes, input_shape))
    return model


def _loader(dataset, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=shuffle and len(dataset) >= batch_size)


def param_groups(model: nn.Module, lr: float, backbone_lr: float) -> list[dict]:
    private, shared = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # PEFT prefixes base_model.model. and wraps private modules in modules_to_save
            plain = name.removeprefix("base_model.model.")
            (shared if plain.startswith(models.SHARED_PREFIX) else private).append(param)
    return [{"params": shared, "lr": backbone_lr}, {"params": private, "lr": lr}]


def schedule(step: int, total: int) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps, then linear decay to 0 at `total`."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_expert(task: str, modality: str, splits, *, mode: str = "full", steps: int | None = None,
                 epochs: float | None = None, batch_size: int = 64, lr: float | None = None,
                 backbone_lr: float | None = None, seed: int = 0, time_budget: float | None = None,
                 lora_r: int = 8, lora_alpha: int = 16, num_classes: int | None = None, init=None,
                 progress: bool = True, device: str = "cpu"):
    """Fine-tunes `task`'s expert from theta_0 (or from the full model folder `init`, adding `task`'s private
    modules if it lacks them) on the training split of `splits` (a data.Splits or a (train, val) tuple).

    Length: `steps` optimizer steps, or `epochs` passes over the training data (one epoch if neither), cut short
    by `time_budget` seconds. lr: the private modules' learning rate; backbone_lr: the backbone's (full) or the
    LoRA factors' (lora). Returns (model, info): a MiniMLLM (full) or a LoraExpert (lora) in eval mode, and
    info = {train_time_s, steps, epochs, final_loss, stopped_by, ...}.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if mode == "lora" and init is not None:
        raise ValueError("a LoRA expert adapts theta_0; `init` (start from another model) is for full fine-tuning")
    train, _ = _parts(splits)
    if len(train) == 0:
        raise ValueError(f"task '{task}': the training split is empty")
    num_classes = num_classes or _num_classes(splits, train)
    input_shape = tuple(torch.as_tensor(train[0][0]).shape)
    lr = PRIVATE_LR if lr is None else lr
    backbone_lr = BACKBONE_LR[mode] if backbone_lr is None else backbone_lr

    torch.manual_seed(seed)
    model = _start_model(task, modality, num_classes, input_shape, seed, init)
    if mode == "lora":
        model = models.lora_model(model, r=lora_r, lora_alpha=lora_alpha)
    model.to(device)
    loader = _loader(train, batch_size, seed, shuffle=True)
    total = steps if steps is not None else max(1, math.ceil((epochs or 1.0) * len(loader)))
    optimizer = torch.optim.AdamW(param_groups(model, lr, backbone_lr), weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    model.train()
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    losses, stopped_by = _fit(model, task, loader, optimizer, scheduler, total, time_budget,
                              progress=f"{task} ({mode})" if progress else None)
    stopped_by = stopped_by or ("steps" if steps is not None else "epochs")
    step = len(losses)
    train_time = time.perf_counter() - start
    model.eval()
    tail = losses[-min(20, len(losses)):]
    info = {
        "task": task, "modality": modality, "mode": mode, "steps": step, "planned_steps": total,
        "epochs": step * batch_size / len(train), "batch_size": batch_size, "train_examples": len(train),
        "train_time_s": train_time, "s_per_step": train_time / max(step, 1), "stopped_by": stopped_by,
        "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "lr": lr, "backbone_lr": backbone_lr,
        "seed": seed, "num_classes": num_classes, "input_shape": list(input_shape),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    if mode == "lora":
        info.update(lora_r=lora_r, lora_alpha=lora_alpha)
    return model, info


def _fit(model, task: str, loader, optimizer, scheduler, total: int, time_budget: float | None, progress: str | None):
    """`total` AdamW steps over the loader, epoch after epoch, gradient norm clipped; stops early once
    `time_budget` seconds have passed. Returns (the loss of every step, "time_budget" or None)."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    losses, start = [], time.perf_counter()
    with tqdm(total=total, desc=progress, unit="step", disable=progress is None) as bar:
        while len(losses) < total:
            for batch in loader:
                x, y = to_device(batch, model)
                loss = nn.functional.cross_entropy(model(x, task=task), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) >= total:
                    break
                if time_budget is not None and time.perf_counter() - start >= time_budget:
                    return losses, "time_budget"
    return losses, None


@torch.no_grad()
def to_device(batch, model: nn.Module) -> tuple[Tensor, Tensor]:
    """A batch's inputs and labels on the device of the model's parameters."""
    device = next(model.parameters()).device
    return torch.as_tensor(batch[0]).to(device), torch.as_tensor(batch[1]).to(device)


def evaluate(model: nn.Module, dataset, task: str, batch_size: int = 256, progress: bool = False) -> float:
    """Top-1 accuracy of model(x, task) on `dataset`; the model's train/eval mode is restored afterwards."""
    if len(dataset) == 0:
        raise ValueError(f"task '{task}': cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct = 0
    for batch in tqdm(_loader(dataset, batch_size, 0, shuffle=False), desc=f"eval {task}", disable=not progress):
        x, y = to_device(batch, model)
        correct += int((model(x, task=task).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(dataset)


def save_expert(model, folder, merged_folder=None) -> Path:
    """A full expert as a transformers folder; a LoRA expert as a PEFT adapter folder (plus config.json) and,
    given `merged_folder`, also as the merged dense model theta_0 + (alpha/r) B A."""
    model.save_pretrained(folder)
    if merged_folder is not None:
        if not isinstance(model, models.LoraExpert):
            raise ValueError("merged_folder is for LoRA experts; a full expert is already dense")
        models.merge_lora(model).save_pretrained(merged_folder)
    return Path(folder)


# ---- CLI ------------------------------------------------------------------------------------------------


def cli_train_expert(args) -> int:
    """`mmer-cl train-expert`: train, evaluate on the whole val and test splits, save."""
    from mmer_cl import data

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = data.load(args.modality, args.seed)
    train, val, test = splits.train, splits.val, splits.test
    if args.train_size:
        train = data.subset(train, args.train_size, args.seed)
    if args.eval_size:
        val, test = data.subset(val, args.eval_size, args.seed), data.subset(test, args.eval_size, args.seed)
    model, info = train_expert(args.modality, args.modality, (train, val), mode=args.mode, steps=args.steps,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                               seed=args.seed, time_budget=args.time_budget, lora_r=args.lora_r,
                               lora_alpha=args.lora_alpha, num_classes=len(splits.classes))
    info["val_accuracy"] = evaluate(model, val, args.modality, progress=True)
    info["test_accuracy"] = evaluate(model, test, args.modality, progress=True)
    info.update(val_examples=len(val), test_examples=len(test), classes=list(map(str, splits.classes)))
    out = Path(args.out or f"experts/{args.modality}-{args.mode}-seed{args.seed}")
    save_expert(model, out, merged_folder=out.with_name(out.name + "-merged") if args.mode == "lora" else None)
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    print(f"{args.modality} ({args.mode}): val accuracy {info['val_accuracy']:.4f} ({len(val)}), "
          f"test accuracy {info['test_accuracy']:.4f} ({len(test)}), {info['steps']} steps "
          f"of batch {args.batch_size} in {info['train_time_s']:.1f} s ({info['s_per_step']:.3f} s/step, "
          f"stopped by {info['stopped_by']}); saved to {out}")
    return 0
