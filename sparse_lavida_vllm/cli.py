"""The `sparse-lavida` command: each room adds its subcommands through a `register(subparsers)` function."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands; each defines register(subparsers) and sets `func` defaults.
COMMAND_MODULES = (
    "sparse_lavida_vllm.drivers.check",  # check consistency
    "sparse_lavida_vllm.drivers.demo",  # demo (reference sampler, no vLLM)
    "sparse_lavida_vllm.training.cli",  # train, eval, tables
    "sparse_lavida_vllm.entrypoints.cli",  # serve, generate
    "sparse_lavida_vllm.entrypoints.image_cli",  # generate-image
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-lavida", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a room that has not landed yet
            if e.name and name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
