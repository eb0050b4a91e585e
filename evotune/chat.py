"""``evotune chat MODEL_DIR``: talk to a trained model in the terminal.

Interactive by default: each line you type is a user message, the answer is
streamed as it is generated, and the conversation so far is the context of the
next answer (``/reset`` forgets it, ``/exit``, ``exit``, ``quit`` or Ctrl-D
leave). ``--prompt TEXT`` answers one message, prints the answer and exits 0,
for scripts. Decoding is greedy, as in the samples written during training,
and prompts are rendered by the same code (:class:`evotune.train.evaluate.PromptEncoder`),
so the model sees exactly the format it was trained on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import TextStreamer

from evotune.convert import merge
from evotune.errors import EvotuneError
from evotune.model.load import load_model, load_tokenizer
from evotune.train.evaluate import PromptEncoder, greedy_generate

EXIT_WORDS = ("/exit", "exit", "quit", "/quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a Hugging Face / InternLM2 directory or InternEvo checkpoint (e.g. <work_dir>/hf)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter trained on MODEL_DIR (e.g. <work_dir>/hf_adapter): merged into it "
                             "for the chat (evotune convert merge, into a temporary folder)")
    parser.add_argument("--template", default=None,
                        help="chat template: internlm2_chat, llama3, qwen2, or 'tokenizer' (the tokenizer's own "
                             "chat_template); default: the tokenizer's template if it has one, else plain text")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit (no interaction)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="longest answer (default 512)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or .model file (default: MODEL_DIR)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None,
                        help="bfloat16, float16, float32 or auto (default: the checkpoint's on CUDA, float32 on CPU)")


class Chat:
    """A conversation with a model: ``reply(text)`` streams the answer to stdout and returns it."""

    def __init__(self, model, tokenizer, *, template: str | None = None, system: str | None = None,
                 max_new_tokens: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, template, system, where="--template")
        self.max_new_tokens = max_new_tokens
        self.history: list[dict] = []

    def reply(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = greedy_generate(self.model, [self.prompts(self.history)], max_new_tokens=self.max_new_tokens,
                              stop_ids=self.prompts.stop_ids, pad_id=self.prompts.pad_id, streamer=streamer)[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.history.clear()


def load(args: argparse.Namespace):
    """(model, tokenizer) for the command's arguments."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("auto" if device.startswith("cuda") else "float32")
    if args.adapter:  # merged in the base's layout, so an InternLM2 base's adapter fits (docs/lora.md)
        with tempfile.TemporaryDirectory(prefix="evotune_chat_") as merged:
            model = load_model(merge(args.model_dir, args.adapter, Path(merged) / "model"), dtype=dtype,
                               device=device)
    else:
        model = load_model(args.model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    if tokenizer is None:
        raise EvotuneError(f"{args.tokenizer or args.model_dir} holds no tokenizer files: pass --tokenizer DIR "
                           "(the tokenizer the model was trained with)")
    return model, tokenizer


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise EvotuneError(f"--max-new-tokens {args.max_new_tokens}: must be a positive number of tokens")
    model, tokenizer = load(args)
    chat = Chat(model, tokenizer, template=args.template, system=args.system, max_new_tokens=args.max_new_tokens)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    print(f"evotune chat: {args.model_dir} (/reset forgets the conversation, /exit or Ctrl-D leaves)")
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print()
            return 0
        text = text.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        if text == "/reset":
            chat.reset()
            continue
        chat.reply(text)
