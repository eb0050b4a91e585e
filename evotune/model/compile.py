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
"""

from __future__ import annotations

from torch import nn

from evotune.model.layers import decoder_layers


def compile_decoder_layers(llm: nn.Module, **compile_kwargs) -> int:
    """``layer.compile(**compile_kwargs)`` for every decoder layer; returns how many were compiled."""
    layers = decoder_layers(llm, "torch_compile compiles each one; set torch_compile=False for this model")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
