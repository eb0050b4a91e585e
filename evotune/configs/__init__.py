"""Shipped configs, found by ``evotune list-cfg`` and copied by ``evotune copy-cfg``."""

from __future__ import annotations

import argparse
import os
import shutil

from evotune.errors import EvotuneError

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_"))


def config_path(name: str) -> str | None:
    name = name[:-3] if name.endswith(".py") else name
    return os.path.join(HERE, name + ".py") if name in names() else None


def add_arguments_list_cfg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--pattern", default="", help="show only names containing this (case-insensitive)")


def main_list_cfg(args: argparse.Namespace) -> int:
    for name in names():
        if args.pattern.lower() in name.lower():
            print(name)
    return 0


def add_arguments_copy_cfg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a name printed by list-cfg")
    parser.add_argument("dir", help="destination folder")


def main_copy_cfg(args: argparse.Namespace) -> int:
    src = config_path(args.name)
    if src is None:
        import difflib

        close = difflib.get_close_matches(args.name, names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else " (see `evotune list-cfg`)"
        raise EvotuneError(f"no shipped config named '{args.name}'{hint}")
    os.makedirs(args.dir, exist_ok=True)
    dst = os.path.join(args.dir, os.path.basename(src)[:-3] + "_copy.py")
    if os.path.exists(dst):
        raise EvotuneError(f"'{dst}' already exists; remove it or copy to another folder")
    shutil.copyfile(src, dst)
    print(f"copied to {dst}")
    return 0
