"""``evotune check-custom-dataset CFG`` and ``evotune log-dataset CFG``: XTuner's two data commands.

Both build the training data exactly as ``evotune train CFG`` does (the
config's ``train_dataset``, or XTuner's ``train_dataloader.dataset``), so every
record is read and checked: a bad record is one line naming the file, the
record and the field (evotune/data/hf_dataset.py). ``check-custom-dataset``
then prints what training will see (packs, tokens, supervised tokens) and the
first pack decoded with its loss mask; ``log-dataset`` prints the first pack as
XTuner's ``--show`` styles do (``text``, ``masked_text``, ``input_ids``,
``labels``, ``all``); ``masked_text`` marks the tokens without loss as
``[[...]]`` (evotune/data/inspect.py), where XTuner prints ``[-100]`` per token.
"""

from __future__ import annotations

import argparse

import numpy as np

from evotune.config import build
from evotune.data.inspect import pack_tokens, render_document
from evotune.errors import EvotuneError
from evotune.settings import load_settings
from evotune.train.run import resolve_config_path

SHOW = ("text", "masked_text", "input_ids", "labels", "all")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file, or the name of a shipped config (see list-cfg)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides, as for evotune train")


def _data(args: argparse.Namespace):
    """(dataset, tokenizer) of the config, built as training builds them."""
    settings = load_settings(resolve_config_path(args.config), args.cfg_options)
    if settings.data.dataset is None:
        raise EvotuneError(f"{args.config}: the config has no train_dataset (or train_dataloader.dataset)")
    dataset = build(settings.data.dataset)
    if len(dataset) == 0:
        raise EvotuneError(f"{args.config}: the data makes no pack of max_length={dataset.packed_length} tokens")
    tokenizer = build(settings.model.tokenizer) if settings.model.tokenizer else None
    return dataset, tokenizer


def _decode(tokenizer):
    return tokenizer.decode if tokenizer is not None else None


def add_arguments_check(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)


def main_check(args: argparse.Namespace) -> int:
    dataset, tokenizer = _data(args)
    first = dataset[0]
    supervised = sum(int((dataset[i]["labels"] != -100).sum()) for i in range(len(dataset)))
    print(f"evotune: {args.config}: the data is valid: {len(dataset)} packs of {dataset.packed_length} tokens, "
          f"{supervised:,} tokens with loss ({supervised / (len(dataset) * dataset.packed_length):.1%})")
    print("evotune: the first pack, decoded ([[...]]: no loss)")
    print(render_document(pack_tokens(first), _decode(tokenizer), plain=True))
    return 0


def add_arguments_log(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--show", choices=SHOW, default="text", help="how to show the first pack (XTuner's styles)")


def main_log(args: argparse.Namespace) -> int:
    dataset, tokenizer = _data(args)
    pack = dataset[0]
    ids = np.asarray(pack["input_ids"]).tolist()
    decode = _decode(tokenizer) or (lambda tokens: " ".join(map(str, tokens)))
    styles = {
        "text": lambda: decode(ids),
        "masked_text": lambda: render_document(pack_tokens(pack), _decode(tokenizer), plain=True),
        "input_ids": lambda: str(ids),
        "labels": lambda: str(np.asarray(pack["labels"]).tolist()),
    }
    for name in (styles if args.show == "all" else [args.show]):
        print("#" * 20 + f"   {name}   " + "#" * 20)
        print(styles[name]())
    return 0
