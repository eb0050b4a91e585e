"""``evotune demo``: an end-to-end run that needs nothing but this package.

It makes a tiny Llama-architecture model and a byte-level BPE tokenizer
locally (no download), tokenizes the help texts that ship with Python itself
(``pydoc_data.topics``) into an InternEvo folder, and trains the shipped
``tiny_llama_cpu`` config on it. The assets are built once and reused.
"""

from __future__ import annotations

import argparse
import os
import re
import time

ASSETS = os.path.join("work_dirs", "demo", "assets")


def _documents() -> list[str]:
    """Paragraphs of Python's own help topics, in a fixed order."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = para.strip()
            if len(para) >= 40:
                docs.append(para)
    return docs


def build_tokenizer(docs: list[str], out_dir: str, vocab_size: int = 1024):
    """Train a small byte-level BPE on ``docs`` and save it as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(out_dir)
    return hf


def build_model(vocab_size: int, out_dir: str, hidden: int = 128, layers: int = 4) -> None:
    """A randomly initialised tiny Llama saved as a HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)


def build_assets(root: str = ASSETS) -> dict:
    """Model, tokenizer and an InternEvo folder under ``root`` (built once)."""
    from evotune.data.ftdp_write import write_bin

    model_dir = os.path.join(root, "model")
    data_dir = os.path.join(root, "data", "train")
    valid_dir = os.path.join(root, "data", "valid")
    bin_path = os.path.join(data_dir, "en", "pydoc", "topics.bin")
    valid_path = os.path.join(valid_dir, "en", "pydoc", "topics.bin")
    if not os.path.exists(os.path.join(model_dir, "config.json")) or not os.path.exists(valid_path + ".meta"):
        docs = _documents()
        tok = build_tokenizer(docs, model_dir)
        build_model(len(tok), model_dir)
        encoded = [[tok.bos_token_id] + tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in docs]
        write_bin(bin_path, (d for i, d in enumerate(encoded) if i % 20))  # every 20th document is held out
        write_bin(valid_path, (d for i, d in enumerate(encoded) if i % 20 == 0))
    return {"model": model_dir, "data": data_dir, "valid": valid_dir}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "demo"))
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    from evotune.configs import config_path
    from evotune.train import run

    start = time.perf_counter()
    assets = build_assets(os.path.join(args.work_dir, "assets"))
    print(f"evotune demo: tiny Llama + BPE tokenizer in {assets['model']}, InternEvo folder in {assets['data']}")
    options = [f"pretrained_model_name_or_path={assets['model']!r}", f"dataset_folder={assets['data']!r}",
               f"valid_folder={assets['valid']!r}", *args.cfg_options]
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    code = run.main(parser.parse_args([config_path("tiny_llama_cpu"), "--work-dir", args.work_dir,
                                       "--seed", "0", "--device", "cpu", "--cfg-options", *options]))
    print(f"evotune demo: finished in {time.perf_counter() - start:.0f} s")
    return code
