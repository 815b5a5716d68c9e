"""The `mmer-cl` command. Each subcommand lives beside the code it drives and registers itself."""

import argparse
import importlib

# Modules that expose `register_cli(subparsers)`; each adds its subcommands with set_defaults(func=...).
COMMAND_MODULES = ["mmer_cl.experts", "mmer_cl.benchmark", "mmer_cl.fold"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmer-cl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
