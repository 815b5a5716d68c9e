"""mmer_cl: continual learning by training-free merging and decoupling masks (MMER).

`from mmer_cl import MMERPlugin` gives the Avalanche plugin (imported on first use, so that the command line
and the merge algebra do not pay for Avalanche's import).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MMERPlugin":
        from mmer_cl.plugin import MMERPlugin

        return MMERPlugin
    raise AttributeError(f"module 'mmer_cl' has no attribute {name!r}")
