"""Would a fold split across workers be faster? A simulation on this machine, with Ray.

A fold's per-tensor work is independent across tensors (sources.py, rebuild.py): workers could each fold a
range of tensors into their own files, and one committer write the manifest. This measures what such a
split would buy before anything is built: the tensors of a synthetic Llama (perf_fold's) are dealt into
W halves of about equal bytes, each half written as its own base and fine-tunes, and the T-th fold of every
half runs as one Ray task per half (W workers, one CPU each), against the same fold of the whole model in
one process (numba's threads on every core), and the same with the fold's own `workers` threads. Needs `pip install ray`.

    python benchmarks/split_fold.py --size 1B --workers 2 --tasks 2 --out results/split_fold.md
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_fold import DTYPES, SHARD_BYTES, SIZES, llama_tensors, machine, write_model  # noqa: E402

from mmer_cl.checkpoints import Checkpoint, PlannedWriter  # noqa: E402


def deal(names_sizes, workers: int) -> list[list[str]]:
    """Tensors dealt largest first to the lightest part: W parts of about equal bytes."""
    parts, loads = [[] for _ in range(workers)], [0] * workers
    for name, numel in sorted(names_sizes, key=lambda item: -item[1]):
        lightest = loads.index(min(loads))
        parts[lightest].append(name)
        loads[lightest] += numel
    return parts


def write_part(source: Path, names: list[str], folder: Path, shard_bytes: int) -> None:
    ckpt = Checkpoint(source)
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    writer = PlannedWriter(folder, "model", shard_bytes, [(n, ckpt.info[n].dtype, ckpt.info[n].shape) for n in names])
    for name in names:
        writer.write(name, ckpt.read(name).reshape(-1))
    writer.close()
    writer.write_index()


def fold_all(state: Path, base: Path, models: list[Path], threads: int | None = None, workers: int = 0) -> float:
    """Folds models into a new state (fold's `workers` threads over tensor chunks); the seconds of the last."""
    from mmer_cl.fold import fold

    if threads:
        torch.set_num_threads(threads)
        import numba
        numba.set_num_threads(threads)
    for i, model in enumerate(models):
        start = time.perf_counter()
        fold(state, model, f"task{i}", base=base if i == 0 else None, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    return seconds


def main(argv=None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", choices=list(SIZES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmer_split_fold")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    cfg, shard, work = SIZES[args.size], SHARD_BYTES[args.size], args.work
    write_model(work / "base", cfg, DTYPES["bf16"], 0, None, shard)
    for i in range(args.tasks):
        write_model(work / f"ft{i}", cfg, DTYPES["bf16"], i + 1, work / "base", shard)
    parts = deal([(n, torch.Size(s).numel()) for n, s in llama_tensors(cfg)], args.workers)
    for p, names in enumerate(parts):
        for model in ["base"] + [f"ft{i}" for i in range(args.tasks)]:
            write_part(work / model, names, work / f"part{p}" / model, shard)
    models = [work / f"ft{i}" for i in range(args.tasks)]
    whole = fold_all(work / "state", work / "base", models)
    threaded = fold_all(work / "state-threads", work / "base", models, workers=args.workers)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(fold_all)
    start = time.perf_counter()
    split = ray.get([task.remote(work / f"part{p}" / "state", work / f"part{p}" / "base",
                                 [work / f"part{p}" / f"ft{i}" for i in range(args.tasks)], 1) for p in range(args.workers)])
    wall = time.perf_counter() - start  # every fold of every part: the last folds' own times are `split`
    ray.shutdown()
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    report = "\n".join([
        "# A fold split across Ray workers, simulated (benchmarks/split_fold.py)", "", f"Command: `{command}`", "",
        machine(), "",
        f"{args.size} bf16 synthetic Llama, fold {args.tasks} of {args.tasks} (exact mode, TIES + MMER masks); "
        f"{os.cpu_count()} cores.", "",
        "| | seconds |", "|---|---|",
        f"| the whole model, one process (every core) | {whole:.1f} |",
        f"| the whole model, one process, `workers={args.workers}` threads over tensor chunks | {threaded:.1f} |",
        f"| {args.workers} parts on {args.workers} Ray workers (1 CPU each), the slowest part's fold | {max(split):.1f} |",
        f"| each part's fold | {' / '.join(f'{s:.1f}' for s in split)} |",
        f"| the Ray run's wall time, all {args.tasks} folds of every part | {wall:.1f} |", ""])
    print(report)
    if args.out:
        args.out.write_text(report)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
