"""InternLM2 weights as transformers' native ``LlamaForCausalLM``, and InternLM2's tokenizer, without remote code.

InternLM2's Hugging Face release needs remote code that no longer runs on
transformers 5. Its weights and config map exactly onto Llama's
(:mod:`evotune.checkpoint.internlm2`), so an InternLM2 folder or an InternEvo
checkpoint (:mod:`evotune.checkpoint.internevo`) becomes a native Llama here;
export writes it back in the InternLM2 layout (docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from evotune.checkpoint.hf import LazyWeights
from evotune.checkpoint.internevo import CONFIG_NAME, InternEvoCheckpoint, config_for_json
from evotune.checkpoint.internlm2 import llama_config_from_internlm2, plan_internlm2_to_llama
from evotune.checkpoint.plan import Planned
from evotune.checkpoint.source import read_config_json
from evotune.errors import EvotuneError


def build_llama(config, plan: dict[str, Planned], dtype: torch.dtype | None, where: str):
    """A ``LlamaForCausalLM`` holding exactly the planned tensors (no random init, no second copy).

    Tensors are read (and cast) one at a time and assigned to a model built on
    the meta device, so loading a 7B model costs one copy of the weights.
    """
    if dtype is None:
        floats = [p.dtype for p in plan.values() if p.dtype.is_floating_point]
        dtype = floats[0] if floats else torch.float32
    state = {}
    for k, p in plan.items():
        t = p.load()
        state[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        del t
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EvotuneError(
            f"{where}: the weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]}); "
            "check num_hidden_layers/bias/tie_word_embeddings in the config"
        )
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise EvotuneError(
                f"{where}: weight {key} has shape {tuple(t.shape)} but the config implies "
                f"{tuple(expected[key].shape)}; the config does not describe these weights"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # non-persistent buffers were on meta
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise EvotuneError(f"{where}: no weights for {left[:4]}")
    return model


def load_internlm2(path, dtype: torch.dtype | None = None):
    """A ``model_type: internlm2`` directory as a native ``LlamaForCausalLM`` (no remote code)."""
    cfg = read_config_json(path)
    config = llama_config_from_internlm2(cfg, where=f"{path}/config.json")
    plan = plan_internlm2_to_llama(LazyWeights(path).plan(), config.num_attention_heads, config.num_key_value_heads)
    return build_llama(config, plan, dtype, where=str(path))


def load_internevo(path, dtype: torch.dtype | None = None, ffn_layout: str = "auto"):
    """An InternEvo checkpoint folder (any tp/pp) as a ``LlamaForCausalLM``, and its ``model_config.pt``
    as JSON (the ``config`` of its :class:`~evotune.checkpoint.source.ModelSource`)."""
    ckpt = InternEvoCheckpoint(path, ffn_layout)
    config = llama_config_from_internlm2(ckpt.internlm2_config(dtype=dtype), where=str(Path(path) / CONFIG_NAME))
    plan = plan_internlm2_to_llama(ckpt.plan(), ckpt.heads, ckpt.kv_heads)
    model = build_llama(config, plan, dtype, where=str(path))
    ckpt.release()
    return model, config_for_json(ckpt.config)


class InternLM2Tokenizer(SentencePieceBackend):
    """InternLM2's tokenizer without its remote code: sentencepiece as is, BOS first.

    Encoding is what the published ``InternLM2Tokenizer`` does: text is split on
    added/special tokens, every other piece of text is ``sp.encode``-d (with
    sentencepiece's own dummy prefix), and ``<s>`` is prepended
    (``add_bos_token``; ``add_eos_token`` appends ``</s>``). Decoding writes
    special tokens literally and the runs between them with ``sp.decode``.
    ``save_pretrained`` writes ``tokenizer_class: InternLM2Tokenizer``, the
    published layout, which :func:`evotune.load_tokenizer` reads back.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)
        kwargs.pop("auto_map", None)
        super().__init__(
            vocab_file=vocab_file,
            legacy=True,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        out = ([self.bos_token_id] if self.add_bos_token else []) + list(token_ids_0)
        if token_ids_1 is not None:
            out += list(token_ids_1)
        return out + ([self.eos_token_id] if self.add_eos_token else [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 is not None else 0))
        return ([1] if self.add_bos_token else []) + body + ([1] if self.add_eos_token else [])

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        special = set(self.all_special_tokens) | set(self._added_tokens_encoder)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)
