"""The benchmark's run loop and `mmer-cl run`: every stream, every method that applies to it, resumable,
then the tables and plots (tables.py) and the summary printed."""

import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmer_cl.bench import registry, report, tables
from mmer_cl.bench.profiles import PROFILES, Profile
from mmer_cl.bench.runfolder import Run, digest, source_digest

DEFAULT_STREAMS = ("modality", "split_fmnist", "forgetting", "aligned")
# The order of the tables; a method registered elsewhere follows these.
METHOD_ORDER = ("individual", "mmer_exact", "mmer_sparse", "mmer_compact", "mmer_routed", "mmer_routed_entropy",
                "mmer_controls",
                "task_arithmetic", "ties", "dare_ties", "tall", "emr", "magmax", "continual_ties", "opcm", "naive",
                "ewc", "lwf", "replay", "lora", "mmer_lora", "joint", "forgetting", "expansion")


def methods_for(data, profile: Profile, asked=None) -> list[str]:
    """The methods to run on a stream: those asked for, else every registered one that applies to it (and that
    the stream names, if it names some), less the profile's skip list."""
    names = sorted(registry.METHODS, key=lambda n: (METHOD_ORDER.index(n) if n in METHOD_ORDER else len(METHOD_ORDER), n))
    if asked is not None:
        unknown = [m for m in asked if m not in registry.METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(names)}")
        return [m for m in asked if _applies(m, data)]
    return [m for m in names if _applies(m, data) and (data.methods is None or m in data.methods)
            and f"{data.name}/{m}" not in profile.skip]


def _applies(name: str, data) -> bool:
    applies = registry.METHODS[name].applies
    return applies is None or bool(applies(data))


def run(profile: Profile, streams=None, methods=None, seed: int | None = None, out="results", cache=None,
        command: str | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) the methods on every stream, for `seed` or else every seed of the profile, and writes
    the tables and plots to `out` (the first seed's, and the spread over seeds); returns {stream: {method:
    result}} of the first seed."""
    prov = report.provenance(command)  # the code as the run starts
    registry.load_builtins()
    names = [registry.resolve_stream(name) for name in (streams or DEFAULT_STREAMS)]
    start = time.perf_counter()
    cache = Path(cache or os.environ.get("MMER_CL_CACHE") or Path.home() / ".cache" / "mmer_cl" / "runs")
    by_seed, streams_data = {}, {}
    for s in ([seed] if seed is not None else list(profile.seeds)):
        torch.manual_seed(s)
        bench, results = Run(profile, s, cache, progress=progress), {}
        for name in names:
            fn = registry.STREAMS[name]
            data = fn(profile, s).check()
            data.fingerprint = digest(source_digest(fn), data.settings) if data.settings else source_digest(fn)
            chosen = methods_for(data, profile, methods)
            if not chosen:
                raise ValueError(f"no method applies to stream '{name}'" + (f" among {methods}" if methods else ""))
            streams_data[data.name], results[data.name] = data, {}
            for method in tqdm(chosen, desc=f"{data.name}, seed {s}: methods", disable=not progress):
                results[data.name][method] = bench.cached(data, method, lambda m=method: registry.METHODS[m].fn(bench, data))
        by_seed[s] = results
    first = next(iter(by_seed))
    tables.write_outputs(Path(out), prov, profile, by_seed, streams_data, time.perf_counter() - start,
                         Run(profile, first, cache, progress=False))
    return by_seed[first]


def cli_run(args) -> int:
    """`mmer-cl run`."""
    import warnings

    # Avalanche's own notices (deprecations inside its replay buffer, "no loggers"), not the user's concern
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="No loggers specified")
    profile = PROFILES[args.profile]
    streams = None if args.stream is None else args.stream.split(",")
    methods = None if args.methods is None else args.methods.split(",")
    results = run(profile, streams=streams, methods=methods, seed=args.seed, out=args.out, cache=args.cache)
    print(tables.console_summary(results))
    print(f"results written to {args.out}/ (start with SUMMARY.md)")
    return 0
