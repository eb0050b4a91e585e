"""Sample answers during training: watch what the model learns (XTuner's ``evaluation_inputs``).

Settings (:class:`evotune.settings.EvalSettings`, from the config keys):
``evaluation_inputs`` (list of user messages), ``evaluation_freq``
(steps; None: only at the start and the end), ``SYSTEM`` (system message),
``prompt_template`` (a template name from :mod:`evotune.data.templates`,
``'tokenizer'`` for the tokenizer's own ``chat_template``, or None: the
tokenizer's template when it has one, else the input as plain text after BOS)
and ``max_new_tokens``. The model answers every input greedily at the start,
every ``evaluation_freq`` steps and at the end; rank 0 prints the answers and
appends ``{"step", "input", "output"}`` lines to ``<work_dir>/eval_samples.jsonl``.

Prompts are tokenized by the same code as chat training data
(:class:`evotune.data.tokenize.RecordEncoder`), so the prompt is exactly the
prefix that precedes an assistant reply in training, and generation stops at
the template's end-of-turn token as well as at EOS.

Sharded models: every rank runs the generation with the same inputs, so each
forward all-gathers the same FSDP parameters on all ranks in lockstep; the
stop decision is all-reduced every token (``synced_gpus``), so a rank that
finished keeps running forwards until all have. The outermost FSDP module (the
``SupervisedFinetune`` wrapper, which owns the embedding, final norm and head)
gets ``generate`` registered as an FSDP forward method, so its parameters are
gathered, and it is initialised as the FSDP root even when generation runs
before the first training step. During generation the attention is plain SDPA
with a padding mask (all inputs go in one left-padded batch, one forward per
new token for all of them); the training attention is restored afterwards.
Sequence parallel: generation does not split the sequence; every rank of a
sequence-parallel group runs the full prompt, so a sequence-parallel attention
or input split must not be active while this runs (it is registered under its
own attention name, which the switch to SDPA replaces).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from evotune.errors import EvotuneError
from evotune.settings import EvalSettings

DEFAULT_MAX_NEW_TOKENS = EvalSettings.max_new_tokens  # XTuner's EvaluateChatHook default
SAMPLES_FILE = "eval_samples.jsonl"
_PLACEHOLDER = "x"  # stands for the reply when a template renders a generation prompt


class PromptEncoder:
    """Token ids of generation prompts for a tokenizer and a chat template.

    ``template``: a name in :data:`evotune.data.templates.TEMPLATES`,
    ``'tokenizer'`` (the tokenizer's ``chat_template``), an XTuner
    ``PROMPT_TEMPLATE`` entry (a dict: the prompt is what XTuner's
    ``template_map_fn`` makes of the question, as in training on
    ``process_hf_dataset`` data), or None (the tokenizer's template if it has
    one, else plain text: BOS + the input).
    ``stop_ids``: EOS and the template's end-of-turn token (an XTuner template's ``STOP_WORDS``).
    """

    def __init__(self, tokenizer, template: str | dict | None = None, system: str | None = None,
                 where: str = "prompt_template"):
        from evotune.data import templates as T
        from evotune.data.hf_dataset import Encoder
        from evotune.data.tokenize import HFCodec, Options, RecordEncoder, SentencePieceCodec

        self.xtuner = template if isinstance(template, dict) else None
        if self.xtuner is not None:
            self.tokenizer, self.system, self.plain = tokenizer, system or None, False
            self.xtuner_encoder = Encoder.of(tokenizer)
            stops = self.xtuner_encoder.encode(list(self.xtuner.get("STOP_WORDS", ())))
            self.stop_ids = sorted({*self.xtuner_encoder.eos, *(ids[0] for ids in stops if len(ids) == 1)})
            return
        if template is not None and (not isinstance(template, str)
                                     or template not in (*T.TEMPLATES, T.TOKENIZER_TEMPLATE)):
            raise EvotuneError(f"{where} {template!r}: unknown template; use one of "
                               f"{', '.join([*T.TEMPLATES, T.TOKENIZER_TEMPLATE])} or None")
        if system is not None and not isinstance(system, str):
            raise EvotuneError(f"SYSTEM: expected a string, got {type(system).__name__}")
        self.tokenizer = tokenizer
        self.system = system or None
        self.codec = HFCodec(tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        vocab_file = str(getattr(tokenizer, "vocab_file", None) or "")
        if template in T.TEMPLATES and vocab_file.endswith(".model") and any(
                self.codec.token_id(t) is None for t in T.TEMPLATES[template].special_tokens):
            # a bare sentencepiece model (InternLM2's names its chat tokens [UNUSED_TOKEN_*]):
            # encode as `evotune tokenize --tokenizer x.model` did
            self.codec = SentencePieceCodec(vocab_file)
        self.plain = template is None and not self.codec.chat_template
        stops = [self.codec.eos_id] if self.codec.eos_id is not None else []
        if not self.plain:
            if template == T.TOKENIZER_TEMPLATE and not self.codec.chat_template:
                raise EvotuneError(f"{where} 'tokenizer': {self.codec.path} has no chat_template; "
                                   f"use one of {', '.join(T.TEMPLATES)}")
            try:
                self.encoder = RecordEncoder(self.codec, Options(fmt="chat", template=template))
            except EvotuneError as e:
                raise EvotuneError(f"{where}: {str(e).removeprefix('--template ')}") from None
            stops.append(self._split([{"role": "user", "content": _PLACEHOLDER}])[1])
        self.stop_ids = sorted(set(stops))

    @property
    def pad_id(self) -> int:
        """Left padding of a batch of prompts: the tokenizer's pad token, else the first stop id, else 0."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.stop_ids or [0])[0]

    def _split(self, messages: list[dict]) -> tuple[list[int], int]:
        """(prompt ids, end-of-turn id): render with a placeholder reply, cut before the reply."""
        from evotune.data.templates import RecordError

        try:
            tokens = self.encoder.encode({"messages": [*messages, {"role": "assistant", "content": _PLACEHOLDER}]})
        except RecordError as e:
            raise EvotuneError(f"cannot render the conversation with the chat template: {e}") from None
        ids = tokens.tokens
        end = max(i for i, t in enumerate(ids) if t > 0)  # the reply's end-of-turn token: the last trained one
        start = end
        while start > 0 and ids[start - 1] > 0:
            start -= 1
        return [abs(t) for t in ids[:start]], ids[end]

    def __call__(self, messages: str | Sequence[dict]) -> list[int]:
        """Prompt ids for a user message, or a conversation that ends with a user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if self.xtuner is not None:
            return self._xtuner_prompt(messages)
        if self.plain:
            text = "\n".join(m["content"] for m in messages if m["role"] != "system")
            bos = [self.codec.bos_id] if self.codec.bos_id is not None else []
            return bos + self.codec.encode_text([text])[0]
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return self._split(messages)[0]


    def _xtuner_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation's tokens as XTuner's template and encoding give them, up to the last user
        message's answer (evotune/data/xtuner_maps.py)."""
        from evotune.data.xtuner_maps import encode_conversation, template_map_fn

        system = next((m["content"] for m in messages if m["role"] == "system"), self.system) or ""
        turns, pending = [], None
        for m in messages:
            if m["role"] == "user":
                pending = m["content"]
            elif m["role"] == "assistant" and pending is not None:
                turns.append({"input": pending, "output": m["content"]})
                pending = None
        if pending is None:
            raise EvotuneError("a prompt must end with a user message")
        turns.append({"input": pending, "output": ""})
        turns[0]["system"] = system
        rendered = template_map_fn({"conversation": turns}, self.xtuner)["conversation"]
        enc = self.xtuner_encoder
        ids = [abs(t) for t in encode_conversation(rendered[:-1], enc.encode, enc.bos, enc.eos, None)]
        if len(rendered) == 1 or rendered[-2]["need_eos_token"]:
            ids += enc.bos
        return ids + enc.encode([rendered[-1]["input"]])[0]


def _fsdp_root(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    llm = getattr(model, "llm", model)
    return next((m for m in (model, llm) if isinstance(m, FSDPModule)), None)


def _generate_fn(model: torch.nn.Module) -> Callable:
    """``llm.generate``, run as a forward of the outermost FSDP module when there is one."""
    llm = getattr(model, "llm", model)
    root = _fsdp_root(model)
    if root is None or root is llm:
        return llm.generate
    if "evotune_generate" not in root.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        root.evotune_generate = llm.generate
        register_fsdp_forward_method(root, "evotune_generate")
    return root.evotune_generate


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module):
    """Eval mode (no activation checkpointing, KV cache allowed) and SDPA attention; restored after."""
    llm = getattr(model, "llm", model)
    training = model.training
    attn = llm.config._attn_implementation
    model.eval()
    if attn != "sdpa":
        llm.set_attn_implementation("sdpa")
    try:
        yield llm
    finally:
        if attn != "sdpa":
            llm.set_attn_implementation(attn)
        model.train(training)
        root = _fsdp_root(model)
        if root is not None:
            root.reshard()  # the root keeps its parameters gathered after a forward; free them


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, device: torch.device | str | None = None,
                    streamer=None) -> list[list[int]]:
    """Greedy continuations of token-id prompts (one left-padded batch), each cut after its first stop id.

    ``model``: a causal LM or a module holding one as ``.llm`` (``SupervisedFinetune``),
    possibly FSDP-sharded; then all ranks must call this with the same prompts.
    ``device``: where the inputs go; default the parameters' device (pass the
    compute device when FSDP offloads parameters to the CPU).
    """
    from transformers import GenerationConfig

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    with generation_mode(model) as llm:
        if device is None:
            device = next(llm.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                  eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        out = _generate_fn(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  generation_config=config, synced_gpus=synced, streamer=streamer)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


def generate_samples(model: torch.nn.Module, tokenizer, inputs: Sequence[str], *, system: str | None = None,
                     template: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     device: torch.device | str | None = None) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to each input, rendered with the chat template.

    With an FSDP-sharded model every rank must call this with the same inputs.
    """
    return _answers(model, PromptEncoder(tokenizer, template, system), inputs, max_new_tokens, device)


def _answers(model: torch.nn.Module, prompts: PromptEncoder, inputs: Sequence[str], max_new_tokens: int,
             device: torch.device | str | None) -> list[str]:
    outputs = greedy_generate(model, [prompts(text) for text in inputs], max_new_tokens=max_new_tokens,
                              stop_ids=prompts.stop_ids, pad_id=prompts.pad_id, device=device)
    return [prompts.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]


def is_due(step: int, n_steps: int, freq: int | None) -> bool:
    """After optimizer step ``step`` (1-based): every ``freq`` steps (None: never) and at the last step."""
    return step == n_steps or bool(freq) and step % freq == 0


class SampleEvaluator:
    """Generates the evaluation answers when due and records them (rank 0 writes and prints)."""

    def __init__(self, tokenizer, inputs: Sequence[str], work_dir: str, *, system: str | None = None,
                 template: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 freq: int | None = None, is_main: bool = True, append: bool = False,
                 print_fn: Callable[[str], None] = print, device: torch.device | str | None = None):
        self.prompts = PromptEncoder(tokenizer, template, system)  # checks the template now, not at step 0
        self.inputs = list(inputs)
        self.max_new_tokens = max_new_tokens
        self.freq = freq
        self.is_main = is_main
        self.print_fn = print_fn
        self.device = device
        self.path = os.path.join(work_dir, SAMPLES_FILE)
        if is_main and not append:
            os.makedirs(work_dir, exist_ok=True)
            open(self.path, "w", encoding="utf-8").close()

    def due(self, step: int, n_steps: int) -> bool:
        return is_due(step, n_steps, self.freq)

    def run(self, model: torch.nn.Module, step: int) -> list[str]:
        """Answer every input now (all ranks); rank 0 prints and appends them to eval_samples.jsonl."""
        outputs = _answers(model, self.prompts, self.inputs, self.max_new_tokens, self.device)
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                for text, out in zip(self.inputs, outputs):
                    f.write(json.dumps({"step": step, "input": text, "output": out}, ensure_ascii=False) + "\n")
            lines = [f"evotune: samples at step {step}"]
            for text, out in zip(self.inputs, outputs):
                lines += [f"  > {text}", f"  {out}"]
            self.print_fn("\n".join(lines))
        return outputs


def build_sample_evaluator(evaluation: EvalSettings, work_dir: str, tokenizer, *, is_main: bool = True,
                           append: bool = False, print_fn: Callable[[str], None] = print,
                           device: torch.device | str | None = None) -> SampleEvaluator | None:
    """The evaluator the settings ask for, or None without ``evaluation_inputs``."""
    if not evaluation.inputs:
        return None
    if tokenizer is None:
        raise EvotuneError("evaluation_inputs needs a tokenizer: set tokenizer = dict(type=load_tokenizer, path=...) "
                           "to a folder with tokenizer files")
    return SampleEvaluator(tokenizer, evaluation.inputs, work_dir, system=evaluation.system,
                           template=evaluation.prompt_template, max_new_tokens=evaluation.max_new_tokens,
                           freq=evaluation.freq, is_main=is_main, append=append, print_fn=print_fn, device=device)
