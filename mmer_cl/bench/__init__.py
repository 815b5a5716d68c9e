"""The continual-learning benchmark: streams of tasks, the methods compared on them, the run folder that
resumes, the tables and plots.

    from mmer_cl.bench import Profile, Result, StreamData, method, run, stream

Submodules: profiles (sizes), registry (names), streams, methods, glue (Avalanche <-> the mini MLLMs),
runfolder (cache), loop (the run loop, `mmer-cl run`), tables and report (outputs). Importing the package costs
nothing; the names above load their modules on first use.
"""

_EXPORTS = {"Profile": "profiles", "PROFILES": "profiles", "stream": "registry", "method": "registry",
            "StreamData": "streams", "TaskSpec": "glue", "Result": "runfolder", "run": "loop"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"mmer_cl.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmer_cl.bench' has no attribute {name!r}")
