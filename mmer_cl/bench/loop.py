"""The benchmark's run loop and `mmer-cl run`: every stream, every method that applies to it, resumable,
then the tables and plots (tables.py) and the summary printed."""

import contextlib
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmer_cl.bench import registry, report, tables
from mmer_cl.bench.profiles import PROFILES, Profile
from mmer_cl.bench.runfolder import Run, digest, source_digest

DEFAULT_STREAMS = ("modality", "split_fmnist", "split_fmnist_ci", "forgetting")  # aligned: on its own (--stream aligned)
# The order of the tables; a method registered elsewhere follows these.
METHOD_ORDER = ("individual", "mmer_exact", "mmer_sparse", "mmer_compact", "mmer_routed", "mmer_routed_entropy",
                "mmer_controls",
                "task_arithmetic", "ties", "dare_ties", "tall", "emr", "magmax", "continual_ties", "opcm", "naive",
                "ewc", "lwf", "replay", "lora", "mmer_lora", "joint", "forgetting", "expansion")


def methods_for(data, profile: Profile, asked=None, first_seed: bool = True) -> list[str]:
    """The methods to run on a stream: those asked for, else every registered one that applies to it (and that
    the stream names, if it names some) less the profile's skip list; on a later seed of the profile, only those
    of them that the profile runs on every seed."""
    names = sorted(registry.METHODS, key=lambda n: (METHOD_ORDER.index(n) if n in METHOD_ORDER else len(METHOD_ORDER), n))
    if asked is not None:
        unknown = [m for m in asked if m not in registry.METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(names)}")
        chosen = [m for m in asked if _applies(m, data)]
    else:
        chosen = [m for m in names if _applies(m, data) and (data.methods is None or m in data.methods)
                  and not {m, f"{data.name}/{m}"} & set(profile.skip)]
    if first_seed or profile.every_seed is None:
        return chosen
    return [m for m in chosen if {m, f"{data.name}/{m}"} & set(profile.every_seed)]


def _applies(name: str, data) -> bool:
    applies = registry.METHODS[name].applies
    return applies is None or bool(applies(data))


def stream_data(name: str, profile: Profile, seed: int):
    """Stream `name`'s data for `seed`, checked, with the fingerprint that keys its results; seeded first, so
that a stream drawing from torch's global generator gets the same data whichever process builds it."""
    torch.manual_seed(seed)
    fn = registry.STREAMS[name]
    data = fn(profile, seed).check()
    data.fingerprint = digest(source_digest(fn), data.settings) if data.settings else source_digest(fn)
    return data


def run_step(bench: Run, data, name: str):
    """Stage or method `name` on `data`, from the run folder if stored there; a method starts from its own seed,
    so that what ran before it (in this process or not) cannot change its numbers."""
    if name in registry.STAGES:
        return registry.STAGES[name](bench, data)
    torch.manual_seed(bench.seed)
    return bench.cached(data, name, lambda: registry.METHODS[name].fn(bench, data))


def plan(profile: Profile, streams, methods, seeds) -> list[tuple]:
    """[(seed, stream name, its data, the methods to run on it)] in the order the tables list them."""
    steps = []
    for s in seeds:
        for name in streams:
            data = stream_data(name, profile, s)
            chosen = methods_for(data, profile, methods, first_seed=s == seeds[0])
            if not chosen and s == seeds[0]:
                raise ValueError(f"no method applies to stream '{name}'" + (f" among {methods}" if methods else ""))
            if chosen:  # a later seed may have nothing left to run on a stream
                steps.append((s, name, data, chosen))
    return steps


def run(profile: Profile, streams=None, methods=None, seed: int | None = None, out="results", cache=None,
        command: str | None = None, progress: bool = True, threads: int | None = None, cluster=None,
        device: str = "cpu") -> dict:
    """Runs (or resumes) the methods on every stream, for `seed` or else every seed of the profile, and writes
    the tables and plots to `out` (the first seed's, and the spread over seeds); returns {stream: {method:
    result}} of the first seed. threads: torch's threads per method (its default when None); results depend
    on it (floating-point sums), so compare runs at one count. cluster: an on_ray.Cluster to run on as Ray tasks.
    device: where experts, baselines and evaluations run (folds and switches stay on the CPU)."""
    prov = report.provenance(command)  # the code as the run starts
    start = time.perf_counter()
    cache = Path(cache or os.environ.get("MMER_CL_CACHE") or Path.home() / ".cache" / "mmer_cl" / "runs")
    with cluster or contextlib.nullcontext():  # a cluster that cannot be reached fails before anything is built
        registry.load_builtins()
        names = [registry.resolve_stream(name) for name in (streams or DEFAULT_STREAMS)]
        steps = plan(profile, names, methods, [seed] if seed is not None else list(profile.seeds))
        if cluster is not None:
            cluster.run(steps, profile, cache, threads or 1, progress, device)
    by_seed, streams_data = {}, {}
    estimates = tables.read_estimates(Path(out), profile)
    if progress:
        print(plan_estimate(steps, estimates, Path(out) / "timings.csv"))
    with torch_threads(threads if cluster is None else None):
        for s, _, data, chosen in steps:
            bench = Run(profile, s, cache, progress=progress, device=device)
            streams_data[data.name] = data
            for method in tqdm(chosen, desc=f"{data.name}, seed {s}: methods", disable=not progress or cluster is not None):
                by_seed.setdefault(s, {}).setdefault(data.name, {})[method] = run_step(bench, data, method)
    first = next(iter(by_seed))
    if progress:
        print("time per method, summed over seeds:\n" + tables.time_table(estimates, by_seed).to_string(
            index=False, float_format=lambda v: f"{v:.0f}"))
    tables.write_outputs(Path(out), prov, profile, by_seed, streams_data, time.perf_counter() - start,
                         Run(profile, first, cache, progress=False, device=device))
    return by_seed[first]


def plan_estimate(steps, estimates: dict, source: Path) -> str:
    """What the run will compute and, where an earlier run of the profile timed it, how long that took."""
    known = [estimates[(data.name, m)] for _, _, data, chosen in steps for m in chosen if (data.name, m) in estimates]
    total = sum(len(chosen) for *_, chosen in steps)
    if not known:
        return f"{total} methods to run or reuse; no estimate ({source} holds no earlier run of this profile)"
    return (f"{total} methods to run or reuse; {len(known)} timed by an earlier run of this profile ({source}): "
            f"about {sum(known) / 60:.0f} min if none is stored yet")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads for the block (its own count when None), restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_libraries() -> None:
    """Avalanche's own notices (deprecations inside its replay buffer, "no loggers"), not the user's concern."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="No loggers specified")


def resolve_device(name: str) -> str:
    """auto: cuda when torch sees a CUDA device, else cpu; cuda without one is an error that says so."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() "
                         f"is False); use --device cpu or auto")
    return name


def cli_run(args) -> int:
    """`mmer-cl run`."""
    quiet_libraries()
    profile = PROFILES[args.profile]
    streams = None if args.stream is None else args.stream.split(",")
    methods = None if args.methods is None else args.methods.split(",")
    if args.ray_workers is not None and args.ray is None:
        raise ValueError("--ray-workers needs --ray")
    cluster = None
    if args.ray is not None:
        from mmer_cl.bench import on_ray

        cluster = on_ray.Cluster(args.ray, args.ray_workers)
    results = run(profile, streams=streams, methods=methods, seed=args.seed, out=args.out, cache=args.cache,
                  threads=args.threads, cluster=cluster, device=resolve_device(args.device))
    print(tables.console_summary(results))
    print(f"results written to {args.out}/ (start with SUMMARY.md)")
    return 0
