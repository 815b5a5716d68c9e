"""What a state holds, read from the state itself: tasks and settings, mask densities, pairwise mask overlap,
reconstruction errors and bytes by component (SPEC, "What is reported"). Every figure streams one tensor at
a time, so it works on states of any size.

    raw density        ones / entries
    effective density  ones / entries where tau_star != 0 (with lam <= 1 every entry where tau_star = 0
                       passes MMER's mask, so the raw density flatters)
    overlap            Jaccard |a & b| / |a | b| over the entries where tau_star != 0
    reconstruction     ||theta_hat_t - theta_t|| / ||tau_t|| = ||r_t m_t tau_star - tau_t||_2 / ||tau_t||_2
"""

import math
from collections import defaultdict
from pathlib import Path

import torch

from mmer_cl import merging, store


def layer_of(name: str) -> str:
    """'backbone.encoder.layer.3.attention.self.query.weight' -> 'backbone.encoder.layer.3'; others: the module."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _masks(state: store.State, task: dict, name: str, numel: int):
    masks = state.masks(task)
    return torch.ones(numel, dtype=torch.bool) if masks is None else merging.unpack_mask(masks.read(name), (numel,))


def densities(state: store.State) -> list[dict]:
    """Per task: raw and effective mask density, overall and per layer."""
    tau_star = state.tau_star()
    counts = [defaultdict(lambda: [0, 0, 0, 0]) for _ in state.tasks]  # layer -> entries, ones, nonzero, ones there
    for name, info in tau_star.info.items():
        nonzero = tau_star.read(name).reshape(-1) != 0
        for task, by_layer in zip(state.tasks, counts):
            mask = _masks(state, task, name, info.numel)
            acc = by_layer[layer_of(name)]
            acc[0] += info.numel
            acc[1] += int(mask.sum())
            acc[2] += int(nonzero.sum())
            acc[3] += int((mask & nonzero).sum())
    out = []
    for task, by_layer in zip(state.tasks, counts):
        total = [sum(a[i] for a in by_layer.values()) for i in range(4)]
        out.append({"task": task["name"], "raw": total[1] / max(total[0], 1), "effective": total[3] / max(total[2], 1),
                    "per_layer": {layer: {"raw": a[1] / max(a[0], 1), "effective": a[3] / max(a[2], 1)}
                                  for layer, a in by_layer.items()}})
    return out


def overlaps(state: store.State) -> dict[str, float]:
    """Jaccard overlap of every pair of task masks where tau_star != 0, as {"a|b": overlap}."""
    tau_star, tasks = state.tau_star(), state.tasks
    inter, union = defaultdict(int), defaultdict(int)
    for name, info in tau_star.info.items():
        nonzero = tau_star.read(name).reshape(-1) != 0
        masks = [_masks(state, task, name, info.numel) & nonzero for task in tasks]
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                inter[i, j] += int((masks[i] & masks[j]).sum())
                union[i, j] += int((masks[i] | masks[j]).sum())
    return {f"{tasks[i]['name']}|{tasks[j]['name']}": inter[i, j] / union[i, j] if union[i, j] else 1.0
            for i in range(len(tasks)) for j in range(i + 1, len(tasks))}


def reconstruction_errors(state: store.State, vectors: store.State | None = None) -> dict[str, float]:
    """||r_t m_t tau_star - tau_t|| / ||tau_t|| per task, tau_t read from `vectors` (an exact state holding the
    same tasks; by default this state, which must then be exact)."""
    vectors = vectors or state
    if vectors.manifest["settings"]["mode"] != "exact":
        raise store.StateError(f"{vectors.dir} is a {vectors.manifest['settings']['mode']} state: the task vectors "
                               f"to compare against are kept only in an exact one")
    tau_star = state.tau_star()
    out = {}
    for task in state.tasks:
        kept = vectors.vectors(vectors.task(task["name"]))
        num = den = 0.0
        for name, info in tau_star.info.items():
            tau = kept.read(name).reshape(-1)
            approx = _masks(state, task, name, info.numel) * tau_star.read(name).reshape(-1).float() * task["scale"]
            num += float((approx - tau).double().square().sum())
            den += float(tau.double().square().sum())
        out[task["name"]] = math.sqrt(num / den) if den > 0 else 0.0
    return out


def storage_bytes(state: store.State) -> dict[str, int]:
    """Bytes on disk by component: tau_star, masks, kept vectors, private parameters, config files, manifest;
    and the base, which the state references but does not store."""
    files, manifest = state.manifest["files"], state.manifest
    out = {"tau_star": sum(files[f]["bytes"] for f in manifest["tau_star_files"])}
    for component, key in (("masks", "mask_files"), ("kept vectors", "vector_files"), ("private", "private_files"),
                           ("config files", "config_files")):
        out[component] = sum(files[f]["bytes"] for task in state.tasks for f in task[key])
    out["manifest"] = (state.dir / store.MANIFEST).stat().st_size
    out["base (referenced, not stored)"] = manifest["base"]["bytes"]
    return out


def inspect(state_dir) -> dict:
    """Tasks, settings, each task's mask density overall and per layer, and the state's bytes by component."""
    state = store.load(state_dir)
    manifest, tau_star = state.manifest, state.tau_star()
    total = sum(info.numel for info in tau_star.info.values())
    nonzero = sum(int((tau_star.read(name) != 0).sum()) for name in tau_star.names)
    tasks = [{"name": t["name"], "kind": t["kind"], "source": t["source"], "lam": t["lam"], "scale": t["scale"],
              "mask_density": d["raw"], "mask_density_effective": d["effective"], "per_layer": d["per_layer"]}
             for t, d in zip(state.tasks, densities(state))]
    return {"state": str(Path(state.dir)), "settings": manifest["settings"], "generation": manifest["generation"],
            "base": manifest["base"]["path"], "num_params": total, "tau_star_density": nonzero / max(total, 1),
            "tasks": tasks, "storage_bytes": storage_bytes(state)}
