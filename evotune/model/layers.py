"""The decoder layers of a transformers model: the unit FSDP shards and ``torch_compile`` compiles."""

from __future__ import annotations

from torch import nn

from evotune.errors import EvotuneError


def decoder_layers(llm: nn.Module, needed_for: str) -> list[nn.Module]:
    """The repeated blocks of ``llm``: its ``_no_split_modules`` classes, else its transformers
    ``GradientCheckpointingLayer`` modules, else ``base_model.layers``.

    ``needed_for`` ends the error message when there are none (what needs them, what to do).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = set(getattr(llm, "_no_split_modules", None) or ())
    layers = [m for m in llm.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        layers = list(getattr(getattr(llm, "base_model", llm), "layers", []))
    if not layers:
        raise EvotuneError(f"cannot find the decoder layers of {type(llm).__name__} (no _no_split_modules, "
                           f"no GradientCheckpointingLayer, no base_model.layers): {needed_for}")
    return layers
