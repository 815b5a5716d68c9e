"""Fold performance on synthetic sharded Llama checkpoints (~100M, ~1B and Llama-2-7B-shaped, bf16 and fp32).

For each size, dtype, tau_star dtype and T it builds a base and T fine-tunes (base + dense noise), folds
them one by one into a state (each fold in its own subprocess, so its peak RSS is that fold's) and reports
the T-th fold: the fold function's time, GB/s of bytes read plus written, peak RSS; beside it, in the same
run: the same fold as a user times it (the whole `mmer-cl fold` process, interpreter start and imports
included, on a copy of the state before that fold), a plain copy of the same bytes (read every input file,
write as many bytes with fsync), mergekit's TIES over the same T models (from a separate venv), and a switch
of a loaded model between two tasks against one full in-memory parameter copy. With several sizes it also
plots time and peak RSS against parameters (`--out`'s name, .png).

    python benchmarks/perf_fold.py --sizes 100M --dtypes bf16 fp32 --tasks 2 4 8 --out results/perf_fold.md
    python benchmarks/perf_fold.py --sizes 100M 1B 7B --dtypes bf16 --tasks 2 --mode compact --tau-dtypes weights \
        --no-cli --lean-disk --out results/perf_fold_scaling.md
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmer_cl.checkpoints import Checkpoint, PlannedWriter

SIZES = {  # LlamaConfig fields; parameter counts as printed
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=16000),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # Llama-2-7B's shapes
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHARD_BYTES = {"100M": 256 << 20, "1B": 1 << 30, "7B": 10 * 10**9}  # 7B: two shards, as Llama-2-7b-hf has


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
    state, model, task, base, mode, tau_dtype = sys.argv[1:7]
    start = time.perf_counter()
    fold(state, model, task, base=base if base != "-" else None, mode=mode, tau_dtype=tau_dtype, progress=False)
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
    def timed(task):
        start = time.perf_counter(); switcher.switch(task); return time.perf_counter() - start
    switch = min(timed(t) for t in ("task1", "task0", "task1"))
    other = {n: torch.empty_like(t) for n, t in weights.items()}
    copy = []
    for _ in range(3):
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


def switch_figures(out: str) -> dict[str, float]:
    """The switch child's figures: its line `SWITCH s COPY s RELOAD s`."""
    words = next(line for line in out.splitlines() if line.startswith("SWITCH ")).split()
    return {key: float(value) for key, value in zip(words[::2], words[1::2])}


def link_copy(state: Path, copy: Path) -> Path:
    """A copy of a state folder made of hard links: a fold never modifies a state file in place (it writes new
    ones, renames a new manifest in, unlinks old generations), so the copy can be folded on its own. The lock
    file, which a fold writes its pid into, is a real copy."""
    shutil.copytree(state, copy, copy_function=os.link)
    lock = copy / ".lock"
    if lock.exists():
        lock.unlink()
        shutil.copyfile(state / ".lock", lock)
    return copy


def cli_fold(state: Path, model: Path, task: str, base: Path | None, mode: str, tau_dtype: str) -> float:
    """Wall seconds of the whole `mmer-cl fold` process, as a user runs it (progress bar included, on a pipe)."""
    script = Path(sys.executable).parent / "mmer-cl"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mmer_cl.cli"]
    command += ["fold", str(state), str(model), "--task", task, "--mode", mode, "--tau-dtype", tau_dtype]
    command += ["--base", str(base)] if base else []
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"mmer-cl fold failed: {process.stderr[-3000:]}")
    return wall


def files_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def model_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix == ".safetensors"]


def copy_bound(inputs: list[Path], write_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file and write `write_bytes` bytes with fsync: plain I/O, no compute. The
    bytes go to files of at most 1 GiB, each removed once synced, so that a 7B run needs no room for them."""
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    left = write_bytes
    while left > 0:
        with open(scratch, "wb") as f:
            for _ in range(64):  # 64 x 16 MiB
                n = min(left, len(buffer))
                f.write(memoryview(buffer)[:n])
                left -= n
                if not left:
                    break
            f.flush()
            os.fsync(f.fileno())
        scratch.unlink()
    return time.perf_counter() - start


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


@dataclass(frozen=True)
class Case:
    size: str
    dtype: str
    tau_dtype: str
    mode: str = "exact"
    cli: bool = True
    lean_disk: bool = False  # delete each fine-tune once folded, regenerate them for mergekit (a 7B run)


def fine_tune(case: Case, root: Path, i: int) -> Path:
    """Fine-tune i of the case (seed i + 1), written if absent; the same bytes every time it is written."""
    folder = root / f"ft{i}"
    if not folder.exists():
        write_model(folder, SIZES[case.size], DTYPES[case.dtype], i + 1, root / "base", SHARD_BYTES[case.size])
    return folder


def bench(case: Case, tasks: list[int], work: Path, mergekit: Path | None, rows: list[dict]) -> None:
    root = work / f"{case.size}-{case.dtype}"
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not base.exists():
        write_model(base, SIZES[case.size], DTYPES[case.dtype], 0, None, SHARD_BYTES[case.size])
    params = sum(info.numel for info in Checkpoint(base).info.values())
    state = root / "state"
    shutil.rmtree(state, ignore_errors=True)
    for t in range(1, max(tasks) + 1):
        model = fine_tune(case, root, t - 1)
        before = json.loads((state / "manifest.json").read_text()) if t > 1 else None
        inputs = model_files(base) + model_files(model)
        if before:
            inputs += [state / f for f in before["tau_star_files"] + [m for task in before["tasks"]
                       for m in task["mask_files"]]] if case.mode == "compact" else \
                      [state / f for task in before["tasks"] for f in task["vector_files"]]
        if before and case.mode == "compact":  # the fold removes the old generation: keep links for copy_bound
            kept = root / "inputs-kept"
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir()
            inputs = [link for i, path in enumerate(inputs) if not os.link(path, link := kept / f"{i}-{path.name}")]
        if case.cli and t in tasks:  # the user's fold of the same model, on a copy of the state before this fold
            shutil.rmtree(root / "cli-state", ignore_errors=True)
            cli_state = link_copy(state, root / "cli-state") if before else root / "cli-state"
        load_fold = os.getloadavg()[0]
        _, rss, out = run_child(CHILD_FOLD, state, model, f"task{t - 1}", base if t == 1 else "-", case.mode,
                                case.tau_dtype)
        if t in tasks:
            row = {"size": case.size, "params": params, "dtype": case.dtype, "mode": case.mode,
                   "tau_dtype": case.tau_dtype, "T": t, "fold_s": child_seconds(out, "SECONDS"),
                   "peak_rss_GB": rss / 1e9, "load_fold": load_fold}
            if case.cli:
                row["cli_fold_s"] = cli_fold(cli_state, model, f"task{t - 1}", None if before else base, case.mode,
                                             case.tau_dtype)
                row["cli_overhead_s"] = row["cli_fold_s"] - row["fold_s"]
                shutil.rmtree(cli_state)
            after = json.loads((state / "manifest.json").read_text())
            written = sum(e["bytes"] for rel, e in after["files"].items() if not before or rel not in before["files"])
            read = files_bytes(inputs)
            row.update({"GB/s": (read + written) / row["fold_s"] / 1e9, "read_GB": read / 1e9,
                        "written_GB": written / 1e9, "copy_bound_s": copy_bound(inputs, written, root / "copy.tmp")})
            row["fold/copy"] = row["copy_bound_s"] / row["fold_s"]
            shutil.rmtree(root / "inputs-kept", ignore_errors=True)
            row.update(switch_row(state, base, params * DTYPES[case.dtype].itemsize))
            if case.lean_disk:  # the state's space, for mergekit's output; the fine-tunes it needs, back
                shutil.rmtree(state)
            merge = mergekit_ties(mergekit, base, [fine_tune(case, root, i) for i in range(t)], case.dtype,
                                  root / "mergekit-out")
            row.update({"mergekit_ties_s": merge[0] if merge else None,
                        "mergekit_rss_GB": merge[1] / 1e9 if merge else None})
            rows.append(row)
            print(json.dumps(row), flush=True)
        if case.lean_disk:
            shutil.rmtree(model)
    shutil.rmtree(state, ignore_errors=True)


def switch_row(state: Path, base: Path, weight_bytes: int) -> dict:
    """The switch figures, or none for weights of more than a quarter of the RAM (they are loaded whole)."""
    if weight_bytes > total_memory() / 4:
        return {}
    load = os.getloadavg()[0]
    _, _, out = run_child(CHILD_SWITCH, state, base)
    figures = switch_figures(out)
    return {"load_switch": load, "switch_s": figures["SWITCH"], "full_copy_s": figures["COPY"],
            "reload_s": figures["RELOAD"], "switch/copy": figures["SWITCH"] / figures["COPY"]}


def total_memory() -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return int(line.split()[1]) * 1024


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


COLUMNS = ["size", "params", "dtype", "mode", "tau_dtype", "T", "load_fold", "fold_s", "cli_fold_s", "cli_overhead_s",
           "GB/s", "peak_rss_GB", "copy_bound_s", "fold/copy", "mergekit_ties_s", "mergekit_rss_GB", "load_switch",
           "switch_s", "full_copy_s", "switch/copy", "reload_s"]


def to_markdown(rows: list[dict], command: str, notes: list[str]) -> str:
    fmt = lambda v: "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Fold performance (benchmarks/perf_fold.py)", "", f"Command: `{command}`", "", machine(), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "Columns: the T-th fold of a state in `mode` (exact: T-1 stored float32 task vectors plus the new "
              "model; compact: tau_star and T-1 masks plus the new model), TIES at k=0.2 plus T fresh masks, tau_star "
              "stored in `tau_dtype` (float32, or the weights' dtype); `load_fold`, `load_switch` = the 1-minute load "
              "average before the fold and the switch were timed (2 cores); `fold_s` = the fold function's time; "
              "`cli_fold_s` = the same fold as one whole `mmer-cl fold` process (interpreter start, imports, progress "
              "bar, exit), on a hard-linked copy of the state before that fold; `cli_overhead_s` = their difference "
              "(target <= 1); `GB/s` = (bytes read + written) / fold time; `fold/copy` = copy-bound time (read every "
              "input file, write as many bytes as the fold, with fsync) / fold time; `mergekit_ties_s` = mergekit-yaml "
              "TIES over the same T models (density 0.2, CPU, lazy unpickle), which merges but makes no masks and keeps "
              "no state; `switch_s` = TaskSwitcher.switch between the two first tasks, best of 3; `switch/copy` = that "
              "/ one in-memory copy of every parameter (best of 3; target <= 2); `reload_s` = reading the base's "
              "weights from its (page-cached) safetensors files into the loaded parameters, what loading a full "
              "per-task copy would cost at least. n/a: not measured (switch: weights above a quarter of the RAM).", ""]
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Fold, copy-bound and mergekit seconds, and peak RSS, against parameters (log-log), per dtype and T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["dtype"], r["mode"], r["tau_dtype"], r["T"]) for r in rows}):
        mine = sorted((r for r in rows if (r["dtype"], r["mode"], r["tau_dtype"], r["T"]) == key), key=lambda r: r["params"])
        label = "{} {} tau {} T={}".format(*key)
        for column, style in (("fold_s", "o-"), ("copy_bound_s", "s:"), ("mergekit_ties_s", "^--")):
            points = [(r["params"], r[column]) for r in mine if r.get(column) is not None]
            if points:
                left.plot(*zip(*points), style, label=f"{column.removesuffix('_s')} ({label})")
        right.plot([r["params"] for r in mine], [r["peak_rss_GB"] for r in mine], "o-", label=f"fold ({label})")
        points = [(r["params"], r["mergekit_rss_GB"]) for r in mine if r.get("mergekit_rss_GB") is not None]
        if points:
            right.plot(*zip(*points), "^--", label=f"mergekit ({label})")
    for axis, title in ((left, "seconds"), (right, "peak RSS (GB)")):
        axis.set_xscale("log"), axis.set_yscale("log"), axis.set_xlabel("parameters"), axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3), axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_disk(work: Path, args) -> None:
    """Refuses to start a run whose checkpoints and state would not fit on the work folder's disk."""
    work.mkdir(parents=True, exist_ok=True)
    free, T = shutil.disk_usage(work).free, max(args.tasks)
    for size in args.sizes:
        for dtype in args.dtypes:
            weights = sum(math.prod(shape) for _, shape in llama_tensors(SIZES[size])) * DTYPES[dtype].itemsize
            tau = weights * (4 // DTYPES[dtype].itemsize if "float32" in args.tau_dtypes else 1)
            # a fold: the models on disk, the old and the new generation (tau_star, masks); exact mode keeps a
            # float32 vector per task, the new one written beside the old ones
            state = 2 * tau + (T * weights * 4 // DTYPES[dtype].itemsize if args.mode == "exact" else 0)
            models = (2 if args.lean_disk else 1 + T) * weights
            merge = (2 + T) * weights + (0 if args.lean_disk else state)  # mergekit writes one more model
            need = max(models + state, merge)
            if need > free:
                raise SystemExit(f"{size} {dtype}: about {need / 1e9:.0f} GB needed in {work}, {free / 1e9:.0f} GB free"
                                 + ("" if args.lean_disk else "; --lean-disk needs less"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100M", "1B"], choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--tau-dtypes", nargs="+", default=["float32"], choices=["float32", "weights"])
    parser.add_argument("--mode", default="exact", choices=["exact", "compact"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmer_perf_fold")
    parser.add_argument("--mergekit", type=Path, default=Path("/tmp/mkvenv/bin/mergekit-yaml"),
                        help="mergekit-yaml of a separate venv (pip install mergekit)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--no-cli", action="store_true",
                        help="skip the whole-process `mmer-cl fold` (it needs disk for a second state)")
    parser.add_argument("--lean-disk", action="store_true",
                        help="keep at most base + two fine-tunes on disk (fine-tunes are regenerated for mergekit)")
    args = parser.parse_args(argv)
    if args.lean_disk and len(args.tasks) > 1:
        parser.error("--lean-disk deletes the state after its one measured fold: give one --tasks value")
    check_disk(args.work, args)
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
            for tau_dtype in args.tau_dtypes:
                case = Case(size, dtype, tau_dtype, args.mode, cli=not args.no_cli, lean_disk=args.lean_disk)
                bench(case, sorted(args.tasks), args.work, mergekit, rows)
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
        if len(args.sizes) > 1:
            plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
