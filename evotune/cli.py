"""The ``evotune`` command: one entry point whose subcommands call functions.

Each subcommand lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only
when their subcommand runs, so ``evotune version`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from evotune.errors import EvotuneError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("evotune.demo", "train a tiny model on built-in data (CPU, a few minutes)"),
    "train": ("evotune.train.run", "train a model from a config file"),
    "list-cfg": ("evotune.configs", "list the shipped configs"),
    "copy-cfg": ("evotune.configs", "copy a shipped config to a folder"),
    "batches": ("evotune.data.batches", "write the micro-batches a rank would train on"),
    "data-order": ("evotune.data.ftdp", "write a data_order_path file for a folder"),
    "tokenize": ("evotune.data.tokenize", "tokenize jsonl text/chat data into an InternEvo folder"),
    "inspect": ("evotune.data.inspect", "show counts and the loss mask of an InternEvo folder"),
    "convert": ("evotune.convert", "convert checkpoints (internevo2hf, hf2internevo, pth_to_hf)"),
    "migrate": ("evotune.migrate", "translate an InternEvo config into an evotune config"),
    "chat": ("evotune.chat", "chat with a trained model"),
    "plot": ("evotune.train.plot", "plot the metrics of a work dir"),
    "version": ("evotune.cli", "print the evotune version"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``evotune version`` takes no arguments."""


def main_version(args: argparse.Namespace) -> int:
    from evotune import __version__

    print(__version__)
    return 0


def _entry(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    if name == "version":
        return add_arguments, main_version
    suffix = name.replace("-", "_")
    add = getattr(module, f"add_arguments_{suffix}", None) or module.add_arguments
    run = getattr(module, f"main_{suffix}", None) or module.main
    return add, run


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only the chosen command's module is imported
            add, _ = _entry(name)
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        _, run = _entry(args.command)
        return int(run(args) or 0)
    except EvotuneError as e:
        print(f"evotune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
