"""The benchmark as Ray tasks (`mmer-cl run --ray`): one task per (stream, seed, stage) and per (stream, seed,
method), each method depending on the tasks of the stages and methods it `needs` (registry.Method), so the
experts of a (stream, seed) are trained once and every method that reuses them starts when they are there;
methods that need nothing (the Avalanche baselines, joint training) start at once.

The run folder is the shared store: a task runs loop.run_step, which reads a stored result or computes and
stores it, so the driver skips a method whose result is stored and then reads every result back as a resumed
serial run does. Each task logs to <run folder>/<stream>/logs/<name>.log. Ray is imported by this module only,
and this module only with --ray.
"""

import os
import socket
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm.auto import tqdm

from mmer_cl.bench import loop, registry
from mmer_cl.bench.runfolder import Run


class TaskFailed(RuntimeError):
    """A Ray task raised: names its (stream, seed, method) and its log."""


@dataclass
class Cluster:
    """Where the tasks run. address None or "local": a new local Ray instance of `workers` CPUs (default: every
    core); "auto": the cluster already running on this machine (RAY_ADDRESS, else the latest `ray start`);
    "HOST:PORT": that cluster's head. A task asks for `threads` CPUs and sets torch to as many threads, and for
    one GPU when the methods run on cuda."""

    address: str | None = None
    workers: int | None = None

    def __enter__(self) -> "Cluster":
        quiet = dict(log_to_driver=False, logging_level="WARNING")  # the tasks write to their own logs
        if self.address in (None, "local"):
            ray.init(address="local", num_cpus=self.workers, include_dashboard=False, **quiet)
            return self
        if self.workers is not None:
            raise ValueError("--ray-workers sizes a local Ray instance; a cluster's size is its own")
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ValueError(f"cannot join the Ray cluster at {self.address!r}: {' '.join(str(error).split())}") from None
        return self

    def __exit__(self, *exc) -> None:
        ray.shutdown()

    def run(self, steps: list[tuple], profile, cache: Path, threads: int, progress: bool, device: str) -> None:
        """Every method of `steps` (loop.plan), and what it needs, stored in the run folders under `cache`."""
        tasks, skipped = {}, 0
        for seed, stream, data, chosen in steps:
            submitted = {}
            bench = Run(profile, seed, cache, progress=False, device=device)
            for name in chosen:
                skipped += self.submit(name, bench, _portable(stream), data, threads, submitted, tasks) is None
        wait(tasks, skipped, progress)

    def submit(self, name, bench, stream, data, threads, submitted: dict, tasks: dict):
        """The task of stage or method `name` after the tasks of what it needs; None if its result is stored."""
        if name in submitted:
            return submitted[name]
        method = registry.METHODS.get(name)
        if method is None and name not in registry.STAGES:
            raise ValueError(f"a method needs '{name}', which is neither a method nor a stage")
        if method is not None and bench.stored(data, name) is not None:
            submitted[name] = None
            return None
        needs = [self.submit(need, bench, stream, data, threads, submitted, tasks)
                 for need in (method.needs if method else ())]
        log = bench.log_path(data, name)
        ref = run_step.options(num_cpus=threads, num_gpus=int(bench.device == "cuda")).remote(
            stream, name, bench.profile, bench.seed, bench.cache, bench.device, threads, log,
            *[ref for ref in needs if ref is not None])
        tasks[ref] = (f"{data.name}, seed {bench.seed}, {name}", log)
        submitted[name] = ref
        return ref


def wait(tasks: dict, skipped: int, progress: bool) -> None:
    """Until every task is done, one progress bar over all of them (stored results counted as done); the first
    failure cancels the rest and raises TaskFailed."""
    pending = list(tasks)
    with tqdm(total=len(tasks) + skipped, initial=skipped, desc="Ray tasks", disable=not progress) as bar:
        while pending:
            (done,), pending = ray.wait(pending, num_returns=1)
            label, log = tasks[done]
            try:
                ray.get(done)
            except ray.exceptions.RayError as error:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(error, "cause", None) or error
                message = " ".join(str(cause).split())[:500]
                raise TaskFailed(f"{label} failed ({type(cause).__name__}: {message}); its log: {log}") from None
            bar.set_postfix_str(label)
            bar.update()


def _check_reachable(address: str) -> None:
    """A HOST:PORT that accepts no connection is an error at once (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not HOST:PORT: Ray's own error says what it expected
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ValueError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({error.strerror or error}); "
                         f"start its head with `ray start --head` and give the address it prints") from None


def _portable(stream: str) -> str:
    """A stream's name as a worker resolves it: a user's .py file by its absolute path."""
    module, _, function = stream.rpartition(":")
    return f"{Path(module).resolve()}:{function}" if module.endswith(".py") else stream


_DATA: dict = {}  # (stream, profile, seed) -> its data, built once per worker process


@ray.remote(max_retries=0)
def run_step(stream: str, name: str, profile, seed: int, cache: Path, device: str, threads: int, log: Path,
             *needs) -> None:
    """loop.run_step in a Ray worker, its output in `log`; `needs` are the finished tasks it waited for."""
    import torch

    loop.quiet_libraries()
    registry.load_builtins()
    registry.resolve_stream(stream)  # a user's module registers its methods and merges here too
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", buffering=1) as out, redirect_stdout(out), redirect_stderr(out):
        print(f"{name} on {stream}, seed {seed}, {threads} threads, {device}, in {socket.gethostname()} pid {os.getpid()}")
        start = time.perf_counter()
        try:
            key = (stream, profile, seed)
            if key not in _DATA:
                _DATA[key] = loop.stream_data(stream, profile, seed)
            loop.run_step(Run(profile, seed, cache, device=device), _DATA[key], name)
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            raise
        print(f"done in {time.perf_counter() - start:.1f} s")
