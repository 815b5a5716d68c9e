"""The benchmark's registries of streams and methods, by name.

A stream is fn(profile, seed) -> StreamData; a method is fn(run, data) -> Result; a stage is fn(run, data), work
that several methods share (the experts), which they name in `needs` so that a scheduler (Ray) builds it once,
before them. Each registers itself with `@stream(name)`, `@method(name)` or `@stage(name)`;
`mmer-cl run --stream my_module:my_stream` imports a stream of the user's own. Built-in ones are listed here
with one line each, so that `mmer-cl run --help` names them without importing what defines them.
"""

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

BUILTIN_MODULES = ("mmer_cl.bench.streams", "mmer_cl.bench.methods", "mmer_cl.bench.expansion")
BUILTIN_STREAMS = {
    "modality": "vision (Fashion-MNIST) -> audio (espeak-ng words) -> text (WordNet glosses), one expert each",
    "split_fmnist": "Fashion-MNIST as 5 two-class tasks with task labels (task-incremental)",
    "split_fmnist_ci": "the same 5 tasks class-incremental: one 10-way label space, no task label at test",
    "forgetting": "the vision expert fine-tuned further on audio: old and new task, before and after MMER",
    "aligned": "Fashion-MNIST classes as images, spoken names and glosses: experts combined on mixed inputs",
}
BUILTIN_METHODS = {
    "individual": "each task's own expert given its task label (upper bound; an oracle on split_fmnist_ci)",
    "mmer_exact": "MMER through MMERPlugin, exact state (every task vector kept)",
    "mmer_sparse": "MMER, sparse state (trimmed task vectors kept)",
    "mmer_compact": "MMER, compact state (tau_star and bit-packed masks only)",
    "mmer_routed": "MMER without task labels at test: each sample routed by Gaussians in theta0's features",
    "mmer_routed_entropy": "MMER without task labels at test: each sample routed by lowest predictive entropy",
    "mmer_controls": "MMER's masks against a random mask of the same density and a sign-agreement mask",
    "task_arithmetic": "theta0 + alpha * sum of task vectors",
    "ties": "TIES: trim, elect sign, disjoint mean",
    "dare_ties": "DARE drop, then TIES",
    "tall": "TALL masks on the task-arithmetic vector",
    "emr": "EMR-merging: elected vector, sign masks, per-task rescalers",
    "magmax": "MagMax over the sequential fine-tunes",
    "continual_ties": "each new model TIES-merged into the running merged model",
    "opcm": "OPCM: orthogonal projections onto the running merged vector",
    "naive": "Avalanche Naive (sequential fine-tuning)",
    "ewc": "Avalanche EWC",
    "lwf": "Avalanche LwF",
    "replay": "Avalanche Replay",
    "lora": "one PEFT LoRA adapter per task on a frozen base",
    "mmer_lora": "MMER over the LoRA adapters (compact state)",
    "joint": "one model trained on all tasks at once (upper bound)",
    "forgetting": "the forgetting scenario's own runner (stream forgetting)",
    "expansion": "mixed inputs: MMER's union, merged (= TIES) and routed weights against NaiveMC, TA, single "
                 "experts, late fusion",
}

STREAMS: dict[str, Callable] = {}
METHODS: dict[str, "Method"] = {}
STAGES: dict[str, Callable] = {}


@dataclass(frozen=True)
class Method:
    """fn(run, data) -> Result; applies(data) says whether it runs on a stream (default: on every one); needs:
    the stages and methods whose work it reuses (a method that forgets one still runs, only later)."""

    fn: Callable
    applies: Callable | None = None
    needs: tuple[str, ...] = ()


def stream(name: str):
    """Registers fn(profile, seed) -> StreamData as stream `name`."""
    def register(fn):
        STREAMS[name] = fn
        return fn
    return register


def method(name: str, applies: Callable | None = None, needs: tuple[str, ...] = ()):
    """Registers fn(run, data) -> Result as method `name`; `applies(data) -> bool` limits it to some streams;
    `needs` names the stages and methods it reuses."""
    def register(fn):
        METHODS[name] = Method(fn, applies, tuple(needs))
        return fn
    return register


def stage(name: str):
    """Registers fn(run, data) as stage `name` (it stores what it builds in the run folder)."""
    def register(fn):
        STAGES[name] = fn
        return fn
    return register


def load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def resolve_stream(name: str) -> str:
    """A stream's registered name; `module:function` (a dotted module, found from the current folder too, or a
    path to a .py file) imports the user's module, whose methods register themselves, and registers the
    function under that name."""
    if name in STREAMS:
        return name
    if ":" not in name:
        raise ValueError(f"unknown stream {name!r}; known: {', '.join(sorted(STREAMS))}, or module:function")
    module, _, function = name.rpartition(":")
    try:
        fn = getattr(_import(module), function)
    except (ImportError, AttributeError, FileNotFoundError) as error:
        raise ValueError(f"stream {name!r}: cannot import {function} from {module} ({error})") from None
    STREAMS.setdefault(name, fn)
    return name


def _import(module: str):
    import sys
    from pathlib import Path

    if module.endswith(".py"):
        path = Path(module).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = loaded
        spec.loader.exec_module(loaded)
        return loaded
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(module)


def describe() -> str:
    width = max(map(len, [*BUILTIN_STREAMS, *BUILTIN_METHODS]))
    lines = ["streams:"] + [f"  {n:<{width}}  {d}" for n, d in BUILTIN_STREAMS.items()]
    lines += ["  MODULE:FUNCTION" + " " * max(0, width - 15) + "  a stream of your own, fn(profile, seed) -> StreamData"]
    lines += ["methods:"] + [f"  {n:<{width}}  {d}" for n, d in BUILTIN_METHODS.items()]
    return "\n".join(lines)
