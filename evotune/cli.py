"""The ``evotune`` command: one entry point whose subcommands call functions.

Each subcommand lives in the module that does the work; :data:`COMMANDS` names
that module and its two functions, ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their subcommand runs, so
``evotune version`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import evotune
from evotune.errors import EvotuneError

# name -> (module, add_arguments function, main function, one-line help). The module is imported
# only when its command runs, so ``evotune version`` does not import torch.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("evotune.demo", "add_arguments", "main", "train a tiny model on built-in data (CPU, a few minutes)"),
    "train": ("evotune.train.run", "add_arguments", "main", "train a model from a config file"),
    "list-cfg": ("evotune.configs", "add_arguments_list_cfg", "main_list_cfg", "list the shipped configs"),
    "copy-cfg": ("evotune.configs", "add_arguments_copy_cfg", "main_copy_cfg", "copy a shipped config to a folder"),
    "batches": ("evotune.data.batches", "add_arguments", "main", "write the micro-batches a rank would train on"),
    "data-order": ("evotune.data.ftdp", "add_arguments_data_order", "main_data_order", "write a data_order_path file for a folder"),
    "tokenize": ("evotune.data.tokenize", "add_arguments", "main",
                 "tokenize jsonl text/chat data into an InternEvo folder"),
    "inspect": ("evotune.data.inspect", "add_arguments", "main",
                "show counts and the loss mask of an InternEvo folder"),
    "check-custom-dataset": ("evotune.dataset_check", "add_arguments_check", "main_check",
                             "build a config's training data, checking every record (XTuner's command)"),
    "log-dataset": ("evotune.dataset_check", "add_arguments_log", "main_log",
                    "print the first pack of a config's training data, decoded (XTuner's command)"),
    "convert": ("evotune.convert", "add_arguments", "main",
                "convert checkpoints (internevo2hf, hf2internevo, pth_to_hf)"),
    "migrate": ("evotune.migrate", "add_arguments", "main", "translate an InternEvo config into an evotune config"),
    "chat": ("evotune.chat", "add_arguments", "main", "chat with a trained model"),
    "plot": ("evotune.train.plot", "add_arguments", "main", "plot the metrics of a work dir"),
    "version": ("evotune.cli", "add_arguments_version", "main_version", "print the evotune version"),
}


def add_arguments_version(parser: argparse.ArgumentParser) -> None:
    """``evotune version`` takes no arguments."""


def main_version(args: argparse.Namespace) -> int:
    print(evotune.__version__)
    return 0


def _entry(name: str):
    """``(add_arguments, main)`` of a command, importing its module now."""
    module_name, add, run, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, add), getattr(module, run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (*_, help_text) in COMMANDS.items():
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
        if not getattr(e, "explained_by_another_rank", False):  # set by evotune/parallel/env.py
            print(f"evotune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
