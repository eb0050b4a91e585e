"""The trained module: a causal LM plus InternEvo's loss on packed rows.

``SupervisedFinetune`` (XTuner's name) wraps a transformers model. Its forward
runs the decoder on one packed row with the document boundaries as keyword
arguments, keeps the hidden states of supervised tokens only, and returns the
weighted chunked cross-entropy sum. Being the outermost module, it is also the
FSDP root, so the embedding, final norm and head are gathered by its own hook.

It only records how activation checkpointing and compilation are wanted:
they are applied next to FSDP, in :func:`evotune.parallel.fsdp.parallelize`,
which knows the device, the compute dtype, the tokens of a micro-batch and the
free memory that ``'auto'`` decides from, and applies checkpointing, then
compilation, then sharding, in that order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from evotune.config import build
from evotune.model.attention import register as register_varlen
from evotune.errors import EvotuneError
from evotune.model.checkpointing import normalize_mode
from evotune.model.kernels import FUSED_KERNELS
from evotune.model.lora import apply_lora
from evotune.model.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy


class SupervisedFinetune(nn.Module):
    """Causal LM + chunked loss. ``llm`` is a model or a ``type=`` dict building one.

    ``use_varlen_attn=True``: attention stays inside each document (cu_seqlens)
    and positions restart per document; ``False`` (XTuner's meaning): plain
    causal attention over the whole packed row with positions 0..P-1, so
    documents see each other.
    ``activation_checkpointing``: ``'auto'`` (the default), ``'full'`` (or True),
    ``'selective'`` or ``'none'`` (or False), see :mod:`evotune.model.checkpointing`.
    ``torch_compile``: ``'auto'`` (the default), False, True or a dict of
    ``torch.compile`` options; compiles each decoder layer (:mod:`evotune.model.compile`).
    ``fused_kernels``: ``'auto'`` (the default), ``'liger'``, ``'inductor'`` or ``'none'``
    (:mod:`evotune.model.kernels`). All three are stored here and applied by ``parallelize``.
    ``lora``: ``dict(type=LoraConfig, r=..., ...)`` trains a LoRA adapter on the frozen ``llm``
    (:mod:`evotune.model.lora`, docs/lora.md); ``self.lora_config`` is the LoraConfig applied.
    """

    def __init__(
        self,
        llm,
        use_varlen_attn: bool = True,
        activation_checkpointing: bool | str = "auto",
        torch_compile: bool | str | dict = "auto",
        fused_kernels: str = "auto",
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        label_smoothing: float = 0.0,
        lora=None,
    ):
        super().__init__()
        self.llm = build(llm)
        self.lora_config = apply_lora(self.llm, lora) if lora is not None else None
        self.use_varlen_attn = use_varlen_attn
        self.loss_chunk_tokens = loss_chunk_tokens
        self.label_smoothing = label_smoothing
        self.llm.set_attn_implementation(register_varlen())
        self.llm.config.use_cache = False
        self.activation_checkpointing = normalize_mode(activation_checkpointing)
        self.torch_compile = torch_compile
        if fused_kernels not in FUSED_KERNELS:
            raise EvotuneError(f"fused_kernels={fused_kernels!r}: use one of {', '.join(FUSED_KERNELS)}")
        self.fused_kernels = fused_kernels

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        loss_index: torch.Tensor,
        loss_labels: torch.Tensor,
        loss_weight: torch.Tensor,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        sp_group: dist.ProcessGroup | None = None,
        loss_group_ids: torch.Tensor | None = None,
        num_groups: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum of per-token CE over the supervised tokens of the row.

        ``sp_group`` (sequence parallel): the inputs are this rank's chunk of the
        row (:func:`evotune.parallel.ulysses.shard_row`); the result is this
        chunk's share of the row's loss, and the group's shares sum to it.
        ``loss_group_ids`` (the data type of each supervised token,
        :meth:`evotune.train.type_loss.TypeLoss.model_inputs`): the result is
        ``(loss, per-type plain CE sums)``.
        """
        varlen = {}
        if self.use_varlen_attn:
            varlen = dict(position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                          max_length_q=max_length_q, max_length_k=max_length_k)
        if sp_group is not None and dist.get_world_size(sp_group) > 1:
            varlen["sp_group"] = sp_group
            if not self.use_varlen_attn:  # positions run over the whole row: this chunk's are offset
                local = input_ids.shape[1]
                start = dist.get_rank(sp_group) * local
                varlen["position_ids"] = torch.arange(start, start + local, device=input_ids.device).unsqueeze(0)
        hidden = self.llm.base_model(input_ids=input_ids, use_cache=False, **varlen).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
        head = self.llm.get_output_embeddings()
        return chunked_cross_entropy(
            hidden, head.weight, loss_labels, loss_weight, bias=head.bias,
            chunk_tokens=self.loss_chunk_tokens, label_smoothing=self.label_smoothing,
            group_ids=loss_group_ids, num_groups=num_groups,
        )
