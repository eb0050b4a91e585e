"""Data parallelism with FSDP2 (``fully_shard``): the ZeRO presets and plain data parallel.

``parallelize`` first applies what ``SupervisedFinetune`` records as wanted:
fused kernels (:mod:`evotune.model.kernels`), activation checkpointing (``'auto'`` resolved here, from the free GPU memory
and the tokens of a micro-batch), then ``torch.compile`` of each decoder layer
(:func:`evotune.model.compile.decide`), then sharding; the choices are printed.
Checkpointing goes first because transformers' switch wraps the layer's call
outside the compiled ``forward``, and both go before ``fully_shard`` so that
FSDP's hooks stay outside the recomputed and the compiled regions.
It then shards every decoder layer and then the root module
(``SupervisedFinetune``), so the embedding, final norm and head, used directly
in the root's forward, are gathered by the root's own hooks. Master weights of
the trained parameters are always fp32 (the model is upcast layer by layer, just
before each layer is sharded, so a bf16 checkpoint never exists in fp32 as a
whole); on CUDA the forward/backward compute runs in bf16
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) unless the
config or DeepSpeed JSON asks for fp32; on the CPU everything is fp32. The root
does not cast its floating inputs, so the loss weights stay fp32.

Frozen parameters (a LoRA run's base, evotune/model/lora.py) are stored in the
compute dtype instead: mixed precision casts every parameter to it before each
use anyway, so rounding them once at start gives the same numbers as rounding
them at every all-gather, at half the memory of fp32. bitsandbytes 4-bit
weights (QLoRA) are never cast and never sharded: they go to ``ignored_params``
(FSDP2 leaves them in place on every rank, as packed 4-bit codes with their
quantisation state), which is what lets QLoRA run under any preset. Only the
bf16 rest of the base (embedding, norms, head) and the adapter are sharded; a
7B base in NF4 is about 3.5 GB on each rank (docs/lora.md, "Sharding"). Where
nothing is sharded (one process, or ``replicate``) and nothing offloaded, the
frozen base is left out of FSDP2 altogether: sharding over one rank would only
add an all-gathered copy of each weight (kept for the root's embedding and head,
1.5 GB at 7B), and a frozen weight needs neither gradient reduction nor a cast.

In that same case (a frozen base, one rank, no offload) FSDP2 manages only the
adapter, and :func:`strategy_for` makes the decoder layers reshard after forward
whatever the preset: with bf16 mixed precision a layer that does not keeps its
adapter's bf16 compute copy from the forward to the backward (0.28 GiB at 7B,
docs/lora.md "Sharding"), and with one rank "gathering" it again in backward is
a local cast of a small adapter, no communication. :func:`set_micro_batch`
follows the same flag, so these layers also reshard after every micro-batch's
backward. A full fine-tune keeps its preset: there the bf16 copy is the whole
model (13 GiB at 7B) and the cost of the extra cast per layer in backward is not
measured on a GPU yet, a candidate once it is.

How each setting maps (the cost table is in docs/distributed.md, "Strategies"):

=============  ========================  ==================================================
strategy       parameters                gradients
=============  ========================  ==================================================
replicate      full copy on every rank   full; all-reduced once per step (like DDP)
zero1          sharded; gathered once    full while accumulating; reduce-scattered once per
               per step                  step
zero2          sharded; gathered once    reduce-scattered after every micro-batch
               per step
zero3          gathered for each layer's reduce-scattered after every micro-batch
               forward and backward,
               resharded in between
=============  ========================  ==================================================

Optimizer state follows the parameters (sharded except for ``replicate``).
``*_offload`` adds ``CPUOffloadPolicy``: sharded parameters, gradients and the
optimizer step live on the CPU.

Plain data parallel is FSDP2 on a 2-D mesh (replicate over dp, shard over a
dimension of size 1) rather than ``DistributedDataParallel``: the same mixed
precision, gradient clipping and DCP checkpoint code serves every strategy,
and a checkpoint moves freely between strategies and world sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from evotune.dtypes import dtype_name
from evotune.model import checkpointing, kernels
from evotune.model.compile import compile_decoder_layers, decide
from evotune.model.layers import decoder_layers
from evotune.model.lora import is_4bit
from evotune.parallel.mesh import ParallelMesh
from evotune.parallel.zero import ZeroSettings


@dataclass(frozen=True)
class Strategy:
    name: str  # replicate, zero1, zero2, zero3 (+ "_offload")
    replicate: bool  # full parameters on every rank
    reshard_after_forward: bool  # free gathered layers between forward and backward (zero3; one-rank LoRA)
    sync_every_micro_batch: bool  # reduce gradients after each micro-batch, not once per step
    offload: bool = False
    pin_memory: bool = True


REPLICATE = Strategy("replicate", replicate=True, reshard_after_forward=False, sync_every_micro_batch=False)
_STAGES = {
    0: REPLICATE,
    1: Strategy("zero1", replicate=False, reshard_after_forward=False, sync_every_micro_batch=False),
    2: Strategy("zero2", replicate=False, reshard_after_forward=False, sync_every_micro_batch=True),
    3: Strategy("zero3", replicate=False, reshard_after_forward=True, sync_every_micro_batch=True),
}


def strategy_for(zero: ZeroSettings | None, pmesh: ParallelMesh, frozen_base: bool) -> Strategy:
    """The FSDP2 strategy of a ``--deepspeed`` setting (None: plain data parallel) on ``pmesh``.

    ``frozen_base`` (a LoRA run): where FSDP2 runs and the frozen base stays out of it (one rank, no
    offload) the decoder layers reshard after forward whatever the preset (module docstring). This is
    the one place that decides it: :func:`parallelize`, :func:`set_micro_batch` and :func:`state_bytes`
    read the flag. Without FSDP2 (one CPU process) nothing is gathered or resharded, so the preset stays.
    The name stays the preset's, so the printed strategy and the checkpoint's meta do not change.
    """
    strategy = REPLICATE if zero is None else _STAGES[zero.stage]
    if zero is not None and zero.offload:
        strategy = dataclasses.replace(strategy, name=strategy.name + "_offload", offload=True,
                                       pin_memory=zero.pin_memory)
    if frozen_base and uses_fsdp(pmesh) and _frozen_unsharded(pmesh, strategy):
        strategy = dataclasses.replace(strategy, reshard_after_forward=True)
    return strategy


def uses_fsdp(pmesh: ParallelMesh) -> bool:
    """FSDP2 runs whenever there is a process group (several ranks, or one CUDA rank)."""
    return pmesh.mesh is not None


def _set_dtypes_(module: nn.Module, frozen_dtype: torch.dtype) -> None:
    """In place (parameters keep their identity): trained parameters become fp32 master weights, frozen
    ones ``frozen_dtype`` (the compute dtype, see the module docstring); 4-bit weights stay as they are."""
    for p in module.parameters():
        if isinstance(p, DTensor) or is_4bit(p) or not p.is_floating_point():
            continue
        dtype = torch.float32 if p.requires_grad else frozen_dtype
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def shards(pmesh: ParallelMesh, strategy: Strategy) -> int:
    """Over how many ranks FSDP2 splits each parameter."""
    return 1 if strategy.replicate or not uses_fsdp(pmesh) else pmesh.dp_size * pmesh.sp_size


def _frozen_unsharded(pmesh: ParallelMesh, strategy: Strategy) -> bool:
    """Whether the frozen base stays out of FSDP2 (module docstring): nothing to split, nothing offloaded."""
    return shards(pmesh, strategy) == 1 and not strategy.offload


def _unmanaged_(model: nn.Module, device: torch.device, compute_dtype: torch.dtype,
                frozen_too: bool) -> set[nn.Parameter]:
    """The parameters FSDP2 leaves alone (``fully_shard(ignored_params=)``), moved to ``device`` here since
    FSDP2 moves only what it shards: bitsandbytes 4-bit weights (their module's ``.to`` carries the
    quantisation state) and, with ``frozen_too``, every other frozen one, in the compute dtype."""
    for module in model.modules():
        if any(is_4bit(p) for p in module.parameters(recurse=False)):
            module.to(device)
    ignored = {p for p in model.parameters() if is_4bit(p)}
    if frozen_too:
        for p in model.parameters():
            if not p.requires_grad and p not in ignored and not isinstance(p, DTensor):
                p.data = p.data.to(device=device, dtype=compute_dtype if p.is_floating_point() else p.dtype)
                ignored.add(p)
    return ignored


def storage_summary(model: nn.Module) -> str:
    """How the weights are stored, for the start-up lines: 'master weights float32', or with a frozen base
    'trained weights float32, frozen 4-bit + bfloat16'."""
    def kind(p):
        return "4-bit" if is_4bit(p) else dtype_name(p.dtype)
    trained = sorted({kind(p) for p in model.parameters() if p.requires_grad})
    frozen = sorted({kind(p) for p in model.parameters()
                     if not p.requires_grad and (p.is_floating_point() or is_4bit(p))})
    if not frozen:
        return "master weights " + " + ".join(trained)
    return f"trained weights {' + '.join(trained) or 'none'}, frozen {' + '.join(frozen)}"


def state_bytes(model: nn.Module, pmesh: ParallelMesh, strategy: Strategy, compute_dtype: torch.dtype,
                moment_bytes: int = 8) -> int:
    """Estimated device bytes of weights, gradients and optimizer state per rank: 8 + ``moment_bytes``
    per trained parameter (fp32 master, fp32 gradient, the optimizer's state: 8 for AdamW's two moments,
    2 for bitsandbytes' 8-bit ones, :func:`evotune.train.optim.moment_bytes`) and the stored bytes of a
    frozen one (compute dtype), over the ranks that shard them, plus the gathered 16-bit copy under mixed
    precision; 4-bit weights are whole on every rank, and so is a frozen base FSDP2 leaves alone (no
    gathered copy).

    Decoder layers that reshard after forward (``strategy.reshard_after_forward``: zero3, a one-rank LoRA
    run) count no gathered copy: they hold it only while they run, one layer (two with prefetch) of
    all of them, which the reserve of :func:`evotune.model.checkpointing.choose_mode` covers; the root's
    parameters (embedding, final norm, head) stay gathered from forward to backward and count it.
    """
    n_shards = shards(pmesh, strategy)
    mixed = compute_dtype != torch.float32
    frozen_alone = uses_fsdp(pmesh) and _frozen_unsharded(pmesh, strategy)
    resharded = set()
    if mixed and strategy.reshard_after_forward:  # model: a SupervisedFinetune, or a bare causal LM
        resharded = {id(p) for layer in decoder_layers(getattr(model, "llm", model), "state_bytes counts them")
                     for p in layer.parameters()}
    total = 0.0
    for p in model.parameters():
        copy = 2 if mixed and id(p) not in resharded else 0  # the gathered 16-bit copy
        if is_4bit(p):
            total += p.nbytes
        elif p.requires_grad:
            total += p.numel() * ((8 + moment_bytes) / n_shards + copy)
        elif frozen_alone:
            total += p.numel() * compute_dtype.itemsize
        else:
            total += p.numel() * (compute_dtype.itemsize / n_shards + copy)
    return int(total)


def apply_fast_paths(model: nn.Module, pmesh: ParallelMesh, strategy: Strategy,
                                    device: torch.device, compute_dtype: torch.dtype, tokens: int | None,
                                    log=print, moment_bytes: int = 8) -> None:
    """Resolve ``model.activation_checkpointing``, ``torch_compile`` and ``fused_kernels``; apply Liger's
    kernels (on the module instances), then checkpointing, then compilation.

    ``tokens``: tokens of one micro-batch on this rank ('auto' sizes activations
    with it); ``log``: where the choices are printed (None: nowhere); ``moment_bytes``:
    the optimizer's state per trained parameter (:func:`state_bytes`).
    """
    llm, mode = model.llm, model.activation_checkpointing
    if mode == checkpointing.AUTO:
        if device.type != "cuda":
            choice = checkpointing.Choice("full", f"on {device.type} 'auto' is 'full' (no device memory to size)")
        elif not tokens:
            choice = checkpointing.Choice("full", "the tokens of a micro-batch are not known")
        else:
            free, total = torch.cuda.mem_get_info(device)
            choice = checkpointing.choose_mode(checkpointing.measure_activation_bytes(llm, compute_dtype),
                                               len(decoder_layers(llm, "'auto' counts them")), tokens, free,
                                               total, state_bytes(model, pmesh, strategy, compute_dtype,
                                                                  moment_bytes))
        mode = choice.mode
        if log:
            log(f"evotune: activation_checkpointing='auto' -> '{mode}': {choice.reason}")
    plan = decide(model.torch_compile, device, compute_dtype, model.use_varlen_attn,
                  quantized=any(is_4bit(p) for p in llm.parameters()))
    model.fused_kernels, why = kernels.resolve(model.fused_kernels, plan.enabled, device)
    if model.fused_kernels == "liger":
        counts = kernels.apply_liger(llm)
        why += f" ({counts['rms_norm']} RMSNorm, {counts['swiglu']} SwiGLU modules)"
    if log:
        log(f"evotune: fused kernels: {model.fused_kernels} ({why})")
    model.activation_checkpointing = checkpointing.set_activation_checkpointing(llm, mode)
    if plan.enabled:
        n = compile_decoder_layers(llm, **plan.options)
        if log:
            log(f"evotune: torch_compile={model.torch_compile!r}: {n} decoder layers compiled")
    elif plan.message and log:
        log(f"evotune: {plan.message}")


def parallelize(model: nn.Module, pmesh: ParallelMesh, strategy: Strategy, device: torch.device,
                compute_dtype: torch.dtype, tokens: int | None = None, log=print, moment_bytes: int = 8) -> nn.Module:
    """Checkpointing and compilation (:func:`apply_fast_paths`), then shard ``model``
    (a ``SupervisedFinetune``) in place; one CPU process just gets fp32 weights. The decoder layers
    reshard after forward as ``strategy`` says (:func:`strategy_for` decides), the root never."""
    apply_fast_paths(model, pmesh, strategy, device, compute_dtype, tokens, log, moment_bytes)
    if not uses_fsdp(pmesh):
        _set_dtypes_(model, compute_dtype)
        return model.to(device)
    mesh = pmesh.fsdp_mesh(strategy.replicate)
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=strategy.pin_memory and device.type == "cuda") if strategy.offload \
        else OffloadPolicy()
    ignored = _unmanaged_(model, device, compute_dtype, _frozen_unsharded(pmesh, strategy)) or None
    for layer in decoder_layers(model.llm, "FSDP shards each one"):
        _set_dtypes_(layer, compute_dtype)
        fully_shard(layer, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward,
                    mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    _set_dtypes_(model, compute_dtype)
    # the root's parameters are needed again right at the start of backward: keep them gathered
    fully_shard(model, mesh=mesh, reshard_after_forward=False,
                mp_policy=dataclasses.replace(mp, cast_forward_inputs=False), offload_policy=offload,
                ignored_params=ignored)
    return model


def set_micro_batch(model: nn.Module, strategy: Strategy, last: bool) -> None:
    """Before each micro-batch's forward: reduce gradients now or keep accumulating, and keep gathered
    parameters until the step's last backward, except where the layers reshard after forward (zero3, a
    one-rank LoRA run: :func:`strategy_for`): they reshard after every backward too, else all layers'
    copies would persist between micro-batches."""
    if not isinstance(model, FSDPModule):
        return
    model.set_requires_gradient_sync(last or strategy.sync_every_micro_batch)
    if not strategy.reshard_after_forward:
        model.set_reshard_after_backward(last)


def clip_grad_norm_(parameters, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over sharded (DTensor) or plain gradients, as a tensor on the device (reading
    it is a host synchronisation, left to the caller); clips when ``max_norm``."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
