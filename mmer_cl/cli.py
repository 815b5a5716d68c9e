"""The `mmer-cl` command: fold checkpoints into an MMER state, refit, remove, export, rebase and inspect it, train an
expert, run the benchmark.

Parsing imports nothing heavy, so `--help` answers at once; a subcommand imports what it needs when it runs.
The library's errors (a bad checkpoint, a mismatched architecture, a bad option) end as one line naming the
culprit and exit status 1; `--debug` (before or after the subcommand) shows the traceback instead.
"""

import argparse
import importlib
import json
import sys

from mmer_cl.bench import profiles, registry

MODES = ("exact", "sparse", "compact")
TRIMS = ("tensor", "global")


def _settings(p: argparse.ArgumentParser, fold: bool) -> None:
    """The fold settings (mmer_cl.fold.Settings); unset ones keep the state's value (a new state's default)."""
    if fold:
        p.add_argument("--mode", choices=MODES, help="what the state keeps of each task (fixed by the first fold; "
                                                     "default exact)")
        p.add_argument("--trim", choices=TRIMS, help="TIES trim per tensor (default) or by one global threshold")
    p.add_argument("--merge", help="merge method, e.g. ties (default), task_arithmetic, dare_ties, emr, magmax, "
                                   "continual_ties, opcm")
    p.add_argument("--mask-rule", help="mask rule: mmer (default), tall, emr, sign, random, none")
    p.add_argument("--k", type=float, help="TIES trim fraction (default 0.2)")
    p.add_argument("--alpha", type=float, help="scale of the merged vector (default 1.0)")
    p.add_argument("--p", type=float, help="DARE drop probability (default 0.5)")
    p.add_argument("--energy", type=float, help="OPCM's singular-value fraction (default 0.5)")
    p.add_argument("--seed", type=int, help="seed of DARE's and random masks' draws (default 0)")
    p.add_argument("--tau-dtype", choices=("float32", "weights"),
                   help="store tau_star in float32 (default) or in the weights' dtype (half the disk for bf16)")
    p.add_argument("--workers", type=int, default=0, help="threads over tensor chunks (default 0: none)")


def build_parser() -> argparse.ArgumentParser:
    # --debug before or after the subcommand. A subparser's defaults overwrite what the top level parsed, so
    # the subcommands' --debug has no default (SUPPRESS): given after the subcommand it sets True, else the
    # top level's value (False unless given before) stands.
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="mmer-cl", description=__doc__, parents=[top],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, run, **kwargs):
        sub = subparsers.add_parser(name, parents=[common], **kwargs)
        sub.set_defaults(run=run)
        return sub

    _state_commands(add)
    _train_expert_command(add("train-expert", lambda args: importlib.import_module("mmer_cl.experts").cli_train_expert(args),
                              help="fine-tune one modality's expert from the pretrained backbone"))
    _run_command(add("run", lambda args: importlib.import_module("mmer_cl.bench.loop").cli_run(args),
                     help="run (or resume) the continual-learning benchmark",
                     description=registry.describe() + "\n\n" + profiles.describe(),
                     formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _state_commands(add) -> None:
    p = add("fold", _fold, help="fold a fine-tuned model folder or PEFT LoRA adapter into a state")
    p.add_argument("state", help="state folder (created by the first fold)")
    p.add_argument("finetuned", help="transformers folder or PEFT LoRA adapter folder")
    p.add_argument("--task", required=True, help="name of the new task")
    p.add_argument("--base", help="theta0 as a transformers folder (first fold only)")
    p.add_argument("--lam", type=float, default=1.0, help="this task's mask parameter (default 1.0)")
    p.add_argument("--prefix-map", action="append", metavar="BASE_PREFIX=TASK_PREFIX",
                   help="how the task model names the base's tensors, e.g. 'model.=language_model.model.'")
    p.add_argument("--allow-extra", action="store_true",
                   help="keep language-model tensors the base lacks (an extra layer) as private parameters")
    _settings(p, fold=True)
    p = add("refit", _refit, help="recompute tau_star and every mask with new settings (exact and sparse states)")
    p.add_argument("state")
    p.add_argument("--lam", type=float, help="every task's mask parameter")
    _settings(p, fold=False)
    p = add("remove", _remove, help="drop a task from a state and refresh the other masks")
    p.add_argument("state")
    p.add_argument("task")
    p = add("export", _export, help="write one task's decoupled model as a transformers folder")
    p.add_argument("state")
    p.add_argument("task")
    p.add_argument("out")
    p.add_argument("--force", action="store_true", help="replace `out` if it exists")
    p = add("rebase", _rebase, help="re-point a state to a moved copy of its base (same content, checked)")
    p.add_argument("state")
    p.add_argument("base", help="the base's new place: a transformers folder with the recorded content")
    p = add("inspect", _inspect, help="tasks, settings, mask densities and storage of a state")
    p.add_argument("state")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")


def _train_expert_command(p) -> None:
    p.add_argument("--modality", required=True, choices=("vision", "audio", "text"))
    p.add_argument("--mode", default="full", choices=("full", "lora"))
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float, help="passes over the training split, instead of --steps")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="private modules' learning rate (default: experts.PRIVATE_LR)")
    p.add_argument("--backbone-lr", type=float, help="backbone / LoRA learning rate (default: experts.BACKBONE_LR)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, help="train on a seeded subset of this many examples")
    p.add_argument("--eval-size", type=int, help="evaluate on seeded subsets of this many val/test examples")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="output folder (default experts/<modality>-<mode>-seed<seed>)")


def _run_command(p) -> None:
    p.add_argument("--profile", choices=sorted(profiles.PROFILES), default="default")
    p.add_argument("--stream", help="comma-separated streams: built-in names or module:function of your own "
                                    "(default: modality, split_fmnist, forgetting)")
    p.add_argument("--methods", help="comma-separated methods (default: every method that applies to each stream)")
    p.add_argument("--seed", type=int, help="one seed (default: every seed of the profile)")
    p.add_argument("--out", default="results", help="folder for tables and plots (default: results)")
    p.add_argument("--cache", help="where run folders live (default: $MMER_CL_CACHE or ~/.cache/mmer_cl/runs)")
    p.add_argument("--threads", type=int, help="torch threads per method, and with --ray the CPUs each task asks "
                                            "for (default: torch's own; with --ray 1); results depend on it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where experts, baselines and evaluations run: auto (default) is cuda when torch sees one")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run as Ray tasks: alone (or 'local') on a new local Ray instance; 'auto' joins the cluster "
                        "running on this machine; HOST:PORT joins that cluster's head")
    p.add_argument("--ray-workers", type=int, metavar="N", help="CPUs of the local Ray instance (default: every core)")


def _prefix_map(values):
    if not values:
        return None
    for value in values:
        if "=" not in value:
            raise UsageError(f"--prefix-map takes BASE_PREFIX=TASK_PREFIX (e.g. 'model.=language_model.model.'), "
                             f"got {value!r}")
    return [value.split("=", 1) for value in values]


class UsageError(ValueError):
    """An option given in a form the command cannot use."""


def _chosen(args, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


SETTINGS = ("mode", "trim", "merge", "mask_rule", "k", "alpha", "p", "energy", "seed", "tau_dtype")


def _fold(args) -> int:
    from mmer_cl import fold

    manifest = fold.fold(args.state, args.finetuned, args.task, base=args.base, lam=args.lam, workers=args.workers,
                         prefix_map=_prefix_map(args.prefix_map), allow_extra=args.allow_extra, **_chosen(args, SETTINGS))
    print(f"folded '{args.task}' into {args.state}: {len(manifest['tasks'])} tasks, generation {manifest['generation']}")
    return 0


def _refit(args) -> int:
    from mmer_cl import fold

    manifest = fold.refit(args.state, lams=args.lam, workers=args.workers, progress=True, **_chosen(args, SETTINGS))
    print(f"refit {args.state}: {manifest['settings']}, generation {manifest['generation']}")
    return 0


def _remove(args) -> int:
    from mmer_cl import fold

    manifest = fold.remove(args.state, args.task, progress=True)
    print(f"removed '{args.task}' from {args.state}: {[t['name'] for t in manifest['tasks']]} remain")
    return 0


def _export(args) -> int:
    from mmer_cl import decoupled

    print(f"exported '{args.task}' to {decoupled.export(args.state, args.task, args.out, force=args.force)}")
    return 0


def _rebase(args) -> int:
    from mmer_cl import fold

    manifest = fold.rebase(args.state, args.base)
    print(f"rebased {args.state} onto {manifest['base']['path']}: its content matches the recorded base")
    return 0


def _inspect(args) -> int:
    from mmer_cl import analysis

    report = analysis.inspect(args.state)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items())
    print(f"{report['state']}: {settings}; {report['num_params']:,} shared parameters, "
          f"tau_star density {report['tau_star_density']:.3f}")
    print(f"base: {report['base']}")
    print(f"{'task':<20} {'kind':<6} {'lam':>5} {'scale':>7} {'density':>8} {'effective':>9}")
    for task in report["tasks"]:
        print(f"{task['name']:<20} {task['kind']:<6} {task['lam']:>5.2f} {task['scale']:>7.3f} "
              f"{task['mask_density']:>8.3f} {task['mask_density_effective']:>9.3f}")
    print("storage:")
    for component, size in report["storage_bytes"].items():
        print(f"  {component:<32} {size:>16,} bytes")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"mmer-cl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if args.debug:
            raise
        kind = "" if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: "
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message
        if isinstance(error, OSError) and error.filename is None:  # e.g. ENOSPC: say where it happened
            where = [str(getattr(args, name)) for name in ("out", "state") if getattr(args, name, None)]
            message += f" (while writing {where[0]})" if where else ""
        print(f"mmer-cl {args.command}: error: {kind}{message} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
