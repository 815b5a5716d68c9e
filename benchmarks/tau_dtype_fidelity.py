"""What storing tau_star in the weights' dtype (Settings.tau_dtype="weights") costs in fidelity.

Folds the same base and fine-tunes (perf_fold's synthetic Llama, bf16) into two states that differ only in
tau_dtype, and compares every task's decoupled weights entry by entry: the fraction of entries that differ, and
that differ by more than one bfloat16 spacing (at the float32-tau value), the largest difference relative to
the task's largest delta entry, and the difference's norm relative to the task's own delta
||theta_hat_f32 - theta0||.

    python benchmarks/tau_dtype_fidelity.py --size 100M --tasks 3 --out results/tau_dtype_fidelity.md
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_fold import SHARD_BYTES, SIZES, machine, write_model  # noqa: E402

from mmer_cl import decoupled  # noqa: E402
from mmer_cl.checkpoints import Checkpoint  # noqa: E402
from mmer_cl.fold import fold  # noqa: E402


def spacing(values: torch.Tensor) -> torch.Tensor:
    """The distance from each bfloat16 value to the next one away from zero (its unit in the last place)."""
    bits = values.contiguous().view(torch.int16)
    return ((bits + 1).view(torch.bfloat16).float() - values.float()).abs()


def compare(state_f32: Path, state_w: Path, task: str, base: Checkpoint) -> dict:
    f32, w = decoupled.decoupled_state_dict(state_f32, task), decoupled.decoupled_state_dict(state_w, task)
    differ = beyond_one = total = 0
    worst, largest, diff_sq, delta_sq = 0.0, 0.0, 0.0, 0.0
    for name, reference in f32.items():
        theta0 = base.read(name).float()
        diff = (w[name].float() - reference.float()).abs()
        delta = reference.float() - theta0
        differ, total = differ + int((diff > 0).sum()), total + diff.numel()
        beyond_one += int((diff > spacing(reference)).sum())
        worst, largest = max(worst, float(diff.max())), max(largest, float(delta.abs().max()))
        diff_sq += float((diff.double() ** 2).sum())
        delta_sq += float((delta.double() ** 2).sum())
    return {"task": task, "differ": differ / total, "beyond_one_ulp": beyond_one / total, "max_relative": worst / largest,
            "relative_l2": (diff_sq / delta_sq) ** 0.5}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100M", choices=list(SIZES))
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--mode", default="exact", choices=["exact", "compact"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmer_tau_fidelity")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    cfg, shard = SIZES[args.size], SHARD_BYTES[args.size]
    write_model(args.work / "base", cfg, torch.bfloat16, 0, None, shard)
    for i in range(args.tasks):
        write_model(args.work / f"ft{i}", cfg, torch.bfloat16, i + 1, args.work / "base", shard)
        for tau_dtype in ("float32", "weights"):
            fold(args.work / tau_dtype, args.work / f"ft{i}", f"task{i}", base=args.work / "base" if i == 0 else None,
                 mode=args.mode, tau_dtype=tau_dtype, progress=False)
    base = Checkpoint(args.work / "base")
    rows = [compare(args.work / "float32", args.work / "weights", f"task{i}", base) for i in range(args.tasks)]
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    lines = ["# tau_star in the weights' dtype: fidelity (benchmarks/tau_dtype_fidelity.py)", "",
             f"Command: `{command}`", "", machine(), "",
             f"{args.size} bf16 synthetic Llama, {args.tasks} tasks, {args.mode} mode, TIES k=0.2 + MMER masks; each "
             "task's decoupled weights from a state with tau_dtype='weights' against the same with float32.", "",
             "| task | entries that differ | by more than 1 bf16 spacing | largest difference / largest delta entry "
             "| relative L2 (of the task's delta) |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['differ']:.4%} | {r['beyond_one_ulp']:.4%} | {r['max_relative']:.3g} | "
              f"{r['relative_l2']:.3g} |" for r in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
