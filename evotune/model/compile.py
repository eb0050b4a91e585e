"""``torch.compile`` of a transformers model's decoder layers, one layer at a time.

Compiling each decoder layer (not the whole model) is what torchtitan does: the
layers are identical, so one compiled graph serves all of them (transformers'
modules are inlined, their parameters are graph inputs), compile time stays
that of one layer, and what lies outside the layers (embedding, the chunked
loss with its Python loop over chunks) stays eager. Inductor fuses the
elementwise work around the matrix products (RMSNorm, rotary embedding,
SiLU * up, residual adds, autocast casts), which eager transformers runs as
separate kernels.

``Module.compile`` compiles in place, so the layers keep their identity and
names: FSDP's ``fully_shard``, checkpoint loading and activation checkpointing
(transformers' switch, applied inside the layer's ``forward``) work the same
before or after.

When to compile is :func:`decide`: ``torch_compile='auto'`` (the default)
compiles where it is safe and fast, i.e. on CUDA with 16-bit compute and the
varlen kernel (or plain causal attention), and says why not elsewhere;
``True`` or a dict of options asks for it and is refused where it is not safe
(without the CUDA varlen kernel attention runs one SDPA call per document in a
Python loop, which breaks the graph and recompiles for every new number of
documents: on a GPU in fp32 10 steps of the tiny model did not finish in 200 s,
docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evotune.dtypes import dtype_name
from evotune.errors import EvotuneError
from evotune.model.layers import decoder_layers

AUTO = "auto"


@dataclass(frozen=True)
class CompileDecision:
    enabled: bool
    options: dict = field(default_factory=dict)  # torch.compile keyword arguments
    message: str | None = None  # why 'auto' did not compile (printed at start)


def decide(torch_compile, device: torch.device, dtype: torch.dtype, use_varlen_attn: bool,
           quantized: bool = False) -> CompileDecision:
    """Whether to compile the decoder layers; an unsafe explicit request is an ``EvotuneError``.

    ``quantized``: the layers hold bitsandbytes 4-bit weights (QLoRA). 'auto' leaves them eager: compiling
    bitsandbytes' dequantise-and-matmul ops through inductor has not been measured here, and QLoRA's step
    is dominated by those ops, not by the elementwise work compilation fuses; ``True`` still compiles.
    """
    if torch_compile is False or torch_compile is None:
        return CompileDecision(False)
    if not (torch_compile is True or torch_compile == AUTO or isinstance(torch_compile, dict)):
        raise EvotuneError(f"torch_compile={torch_compile!r}: use 'auto', True, False or a dict of "
                           "torch.compile options")
    if quantized and torch_compile == AUTO:
        return CompileDecision(False, message="torch_compile='auto': decoder layers not compiled (bitsandbytes "
                                              "4-bit layers run eager; torch_compile=True compiles them)")
    varlen_kernel = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    # 'auto' compiles on GPUs only; an explicit request is also honoured for plain causal attention on the CPU
    if varlen_kernel or (not use_varlen_attn and (device.type == "cuda" or torch_compile != AUTO)):
        return CompileDecision(True, dict(torch_compile) if isinstance(torch_compile, dict) else {})
    here = f"here: {device.type}, {dtype_name(dtype)}"
    why = ("without the CUDA varlen kernel attention runs one SDPA call per document, which breaks the graph "
           "and recompiles for every new number of documents" if use_varlen_attn else "'auto' compiles on GPUs")
    if torch_compile == AUTO:
        return CompileDecision(False, message=f"torch_compile='auto': decoder layers not compiled ({here}; {why})")
    raise EvotuneError(f"torch_compile={torch_compile!r} needs bf16 compute on a GPU ({here}): {why}; set "
                       "torch_compile='auto' or False, or optim_wrapper.dtype='bfloat16' on a GPU")


def compile_decoder_layers(llm: nn.Module, **compile_kwargs) -> int:
    """``layer.compile(**compile_kwargs)`` for every decoder layer; returns how many were compiled."""
    layers = decoder_layers(llm, "torch_compile compiles each one; set torch_compile=False for this model")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
