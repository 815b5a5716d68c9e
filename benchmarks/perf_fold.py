"""Fold performance on synthetic sharded Llama checkpoints (~100M and ~1B parameters, bf16 and fp32).

For each size, dtype and T it builds a base and T fine-tunes (base + dense noise), folds them one by one
into an exact-mode state (each fold in its own subprocess, so ru_maxrss is that fold's peak RSS) and
reports the T-th fold (T-1 stored vectors + the new model): wall time, GB/s of bytes read plus written,
peak RSS; beside it, in the same run: a plain copy of the same bytes (read every input file, write as many
bytes with fsync), mergekit's TIES over the same T models (from a separate venv), and switching a loaded
model between two tasks against one full in-memory parameter copy.

    python benchmarks/perf_fold.py --sizes 100M --dtypes bf16 fp32 --tasks 2 4 8 --out results/perf_fold.md
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from mmer_cl.checkpoints import Checkpoint, PlannedWriter

SIZES = {  # LlamaConfig fields; parameter counts as printed
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=16000),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHARD_BYTES = {"100M": 256 << 20, "1B": 1 << 30}


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], h_kv(cfg)
    names = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]


def h_kv(cfg):
    return cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"]


def write_model(folder: Path, cfg: dict, dtype, seed: int, base: Path | None, shard_bytes: int) -> None:
    """A Llama folder: the base is N(0, 0.02); a fine-tune is the base plus N(0, 0.002) noise."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], torch_dtype=str(dtype).removeprefix("torch.")).to_json_file(folder / "config.json")
    plan = [(n, dtype, s) for n, s in llama_tensors(cfg)]
    writer = PlannedWriter(folder, "model", shard_bytes, plan)
    generator = torch.Generator().manual_seed(seed)
    base_ckpt = Checkpoint(base) if base else None
    for name, _, shape in plan:
        noise = torch.randn(shape, generator=generator)
        if base_ckpt is None:
            writer.write(name, (noise * 0.02).to(dtype))
        else:
            writer.write(name, (base_ckpt.read(name).float() + noise * 0.002).to(dtype))
    writer.close()
    writer.write_index()
    if len(writer.files) == 1:
        (folder / next(iter(writer.files))).rename(folder / "model.safetensors")


def run_child(code: str, *args) -> tuple[float, int, str]:
    """Runs python code in a subprocess; (wall seconds, its peak RSS in bytes, stdout)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out, err = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"child failed: {err.decode()[-3000:]}")
    return wall, usage_maxrss(out.decode()), out.decode()


def usage_maxrss(out: str) -> int:
    """The child's VmHWM (kB): the peak RSS of its own address space. Not ru_maxrss, which on Linux also
    counts the parent's RSS at fork time."""
    for line in out.splitlines():
        if line.startswith("MAXRSS "):
            return int(line.split()[1]) * 1024
    raise RuntimeError("the child did not report its peak RSS")


PEAK_RSS = "print('MAXRSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"


CHILD_FOLD = textwrap.dedent("""
    import resource, sys, time
    from mmer_cl.fold import fold
    state, model, task, base, mode = sys.argv[1:6]
    start = time.perf_counter()
    fold(state, model, task, base=base if base != "-" else None, mode=mode, progress=False)
    print("SECONDS", time.perf_counter() - start)
""") + PEAK_RSS

CHILD_SWITCH = textwrap.dedent("""
    import resource, sys, time, torch
    from mmer_cl.checkpoints import Checkpoint
    from mmer_cl.decoupled import TaskSwitcher
    state, base = sys.argv[1:3]
    ckpt = Checkpoint(base)
    weights = {n: ckpt.read(n) for n in ckpt.names}
    class Model:  # what TaskSwitcher needs of a model: its tensors by name
        def state_dict(self, keep_vars=False):
            return weights
    switcher = TaskSwitcher(Model(), state)
    switcher.switch("task0")
    start = time.perf_counter(); switcher.switch("task1"); switch = time.perf_counter() - start
    start = time.perf_counter(); switcher.switch("task0"); switch = min(switch, time.perf_counter() - start)
    other = {n: torch.empty_like(t) for n, t in weights.items()}
    copy = []
    for _ in range(2):
        start = time.perf_counter()
        for n, t in weights.items():
            other[n].copy_(t)
        copy.append(time.perf_counter() - start)
    start = time.perf_counter()
    for n, t in weights.items():
        t.copy_(ckpt.read(n))
    reload = time.perf_counter() - start
    print("SWITCH", switch, "COPY", min(copy), "RELOAD", reload)
""") + PEAK_RSS


def child_seconds(out: str, key: str) -> float:
    for line in out.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no {key} in child output")


def files_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def model_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix == ".safetensors"]


def copy_bound(inputs: list[Path], write_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file and write `write_bytes` bytes with fsync: plain I/O, no compute."""
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    with open(scratch, "wb") as f:
        left = write_bytes
        while left > 0:
            n = min(left, len(buffer))
            f.write(memoryview(buffer)[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    scratch.unlink()
    return elapsed


def mergekit_ties(mergekit: Path | None, base: Path, models: list[Path], dtype: str, out: Path):
    """(seconds, peak RSS bytes) of mergekit's TIES merge of `models` over `base`, or None if unavailable."""
    if mergekit is None:
        return None
    config = {
        "merge_method": "ties", "base_model": str(base), "dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype],
        "parameters": {"normalize": False},
        "models": [{"model": str(m), "parameters": {"density": 0.2, "weight": 1.0}} for m in models],
    }
    cfg = out.with_suffix(".yml")
    cfg.write_text(json.dumps(config))  # JSON is YAML
    # mergekit-yaml's own entry point, run so that it reports its peak RSS (VmHWM) when it exits
    code = ("import atexit, sys; atexit.register(lambda: " + PEAK_RSS + "); "
            "from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; main()")
    start = time.perf_counter()
    process = subprocess.run([str(mergekit.parent / "python"), "-c", code, str(cfg), str(out), "--no-cuda",
                              "--lazy-unpickle", "--quiet", "--no-copy-tokenizer", "--no-write-model-card"],
                             capture_output=True, text=True)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"mergekit failed: {process.stderr[-3000:]}")
    shutil.rmtree(out)
    return wall, usage_maxrss(process.stdout)


def bench(size: str, dtype: str, tasks: list[int], work: Path, mergekit: Path | None, rows: list[dict]) -> None:
    cfg = SIZES[size]
    root = work / f"{size}-{dtype}"
    root.mkdir(parents=True, exist_ok=True)
    t_max = max(tasks)
    base = root / "base"
    if not base.exists():
        write_model(base, cfg, DTYPES[dtype], 0, None, SHARD_BYTES[size])
    models = []
    for i in range(t_max):
        models.append(root / f"ft{i}")
        if not models[-1].exists():
            write_model(models[-1], cfg, DTYPES[dtype], i + 1, base, SHARD_BYTES[size])
    params = sum(info.numel for info in Checkpoint(base).info.values())
    state = root / "state"
    shutil.rmtree(state, ignore_errors=True)
    for t in range(1, t_max + 1):
        before = json.loads((state / "manifest.json").read_text()) if t > 1 else None
        inputs = model_files(base) + model_files(models[t - 1])
        if before:
            inputs += [state / f for task in before["tasks"] for f in task["vector_files"]]
        wall, rss, out = run_child(CHILD_FOLD, state, models[t - 1], f"task{t - 1}", base if t == 1 else "-", "exact")
        if t not in tasks:
            continue
        seconds = child_seconds(out, "SECONDS")
        after = json.loads((state / "manifest.json").read_text())
        written = sum(entry["bytes"] for rel, entry in after["files"].items() if not before or rel not in before["files"])
        read = files_bytes(inputs)
        bound = copy_bound(inputs, written, root / "copy.tmp")
        merge = mergekit_ties(mergekit, base, models[:t], dtype, root / "mergekit-out")
        switch_wall, switch_rss, switch_out = run_child(CHILD_SWITCH, state, base)
        row = {
            "size": size, "params": params, "dtype": dtype, "T": t, "fold_s": seconds,
            "GB/s": (read + written) / seconds / 1e9, "read_GB": read / 1e9, "written_GB": written / 1e9,
            "peak_rss_GB": rss / 1e9, "copy_bound_s": bound, "fold/copy": bound / seconds,
            "mergekit_ties_s": merge[0] if merge else None, "mergekit_rss_GB": merge[1] / 1e9 if merge else None,
            "switch_s": child_seconds(switch_out, "SWITCH"),
            "full_copy_s": float(switch_out.split("COPY")[1].split()[0]),
            "reload_s": float(switch_out.split("RELOAD")[1].split()[0]),
        }
        row["switch/copy"] = row["switch_s"] / row["full_copy_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(state, ignore_errors=True)


def machine() -> str:
    mem = next((line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "mmer_cl", "benchmarks"], capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    return "\n".join([
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- git commit: {commit or 'none'}{' (with uncommitted changes)' if dirty else ''}",
        f"- machine: `{' '.join(platform.uname())}`, {os.cpu_count()} CPUs, {mem.split(':')[1].strip()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads",
    ])


def to_markdown(rows: list[dict], command: str, notes: list[str]) -> str:
    columns = ["size", "params", "dtype", "T", "fold_s", "GB/s", "peak_rss_GB", "copy_bound_s", "fold/copy",
               "mergekit_ties_s", "mergekit_rss_GB", "switch_s", "full_copy_s", "switch/copy", "reload_s"]
    fmt = lambda v: "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Fold performance (benchmarks/perf_fold.py)", "", f"Command: `{command}`", "", machine(), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    lines += ["", "Columns: the T-th fold of an exact-mode state (T-1 stored float32 task vectors plus the new model; "
              "TIES at k=0.2 plus T fresh masks); `GB/s` = (bytes read + written) / fold time; `fold/copy` = copy-bound "
              "time / fold time (target >= 0.3); `mergekit_ties_s` = mergekit-yaml TIES over the same T models "
              "(density 0.2, CPU, lazy unpickle), which merges but makes no masks and keeps no state; `switch/copy` = "
              "TaskSwitcher.switch time / one in-memory copy of every parameter (target <= 2); `reload_s` = reading the "
              "base's weights from its (page-cached) safetensors files into the loaded parameters, what loading a full "
              "per-task copy would cost at least.", ""]
    return "\n".join(lines + notes) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100M", "1B"], choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmer_perf_fold")
    parser.add_argument("--mergekit", type=Path, default=Path("/tmp/mkvenv/bin/mergekit-yaml"),
                        help="mergekit-yaml of a separate venv (pip install mergekit)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args(argv)
    notes = []
    mergekit = args.mergekit if args.mergekit.is_file() else None
    if mergekit is None:
        notes.append(f"mergekit: not found at {args.mergekit}; install it in its own venv "
                     "(`python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit`).")
    else:
        version = subprocess.run([str(mergekit.parent / "python"), "-c", "import importlib.metadata as m; "
                                  "print(m.version('mergekit'))"], capture_output=True, text=True).stdout.strip()
        notes.append(f"mergekit {version} from PyPI, in its own venv ({mergekit}).")
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            bench(size, dtype, sorted(args.tasks), args.work, mergekit, rows)
            if not args.keep:
                shutil.rmtree(args.work / f"{size}-{dtype}", ignore_errors=True)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    report = to_markdown(rows, command, notes)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "generated": machine(), "rows": rows},
                                                            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
