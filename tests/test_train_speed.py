"""The fast-path building blocks are exact: fused chunked loss, checkpointing modes,
compiled layers, fused AdamW, and position resets read once per forward (issue 9)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evotune.data.collate import MODEL_INPUTS, packed_collate
from evotune.errors import EvotuneError
from evotune.model import attention
from evotune.model.checkpointing import set_activation_checkpointing
from evotune.model.compile import compile_decoder_layers
from evotune.model.finetune import SupervisedFinetune
from evotune.model.loss import chunked_cross_entropy
from evotune.train.optim import build_optimizer
from tests.conftest import make_tiny_llama, whole_document_pack


def _batch(seed: int = 0, lengths=(7, 19, 1, 12)) -> dict:
    torch.manual_seed(seed)
    docs = [torch.randint(3, 128, (n,)).tolist() for n in lengths]
    b = packed_collate([whole_document_pack(docs)], "token")
    return {k: b[k] for k in MODEL_INPUTS}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_chunked_loss_matches_full_logits_with_bias_ignore_and_scale(label_smoothing):
    torch.manual_seed(3)
    n, h, v = 200, 24, 61
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[::9] = -100
    token_weight = torch.rand(n, dtype=torch.float64)
    loss = chunked_cross_entropy(hidden, weight, labels, token_weight, bias=bias, chunk_tokens=48,
                                 label_smoothing=label_smoothing)
    (loss * 2.5).backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    full = (F.cross_entropy(hidden @ weight.T + bias, labels, reduction="none",
                            label_smoothing=label_smoothing) * token_weight).sum()
    (full * 2.5).backward()
    torch.testing.assert_close(loss, full, rtol=1e-10, atol=1e-10)
    for g, t in zip(got, (hidden, weight, bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-9, atol=1e-12)


def test_fused_chunked_loss_frozen_head_and_second_backward():
    torch.manual_seed(4)
    hidden = torch.randn(50, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen head: no gradient is computed for it
    loss = chunked_cross_entropy(hidden, weight, torch.randint(0, 30, (50,)), torch.ones(50), chunk_tokens=16)
    loss.backward(retain_graph=True)
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # would otherwise scale the stored gradients twice


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_checkpointing_modes_same_gradients_and_recompute_what_they_should():
    args = _batch()
    grads, backward_ops = {}, {}
    for mode in ("none", "selective", "full"):
        model = SupervisedFinetune(make_tiny_llama(), activation_checkpointing=False)
        set_activation_checkpointing(model.llm, mode)
        loss = model(**args)
        with _OpCounter() as counter:
            loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        backward_ops[mode] = counter.counts
    for mode in ("selective", "full"):
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
    # selective keeps matrix products (no mm recomputed) but recomputes the norms; full recomputes both
    assert backward_ops["selective"]["aten.mm"] == backward_ops["none"]["aten.mm"]
    assert backward_ops["full"]["aten.mm"] > backward_ops["none"]["aten.mm"]
    assert backward_ops["none"]["aten.rsqrt"] == 0 < backward_ops["selective"]["aten.rsqrt"]


def test_checkpointing_mode_is_checked():
    with pytest.raises(EvotuneError, match="activation_checkpointing='partial'"):
        set_activation_checkpointing(make_tiny_llama(), "partial")


def test_compiled_decoder_layers_give_the_eager_gradients():
    args = _batch(seed=5)
    eager = SupervisedFinetune(make_tiny_llama(), activation_checkpointing=False)
    eager(**args).backward()
    compiled = SupervisedFinetune(make_tiny_llama(), activation_checkpointing=False)
    set_activation_checkpointing(compiled.llm, "selective")
    assert compile_decoder_layers(compiled.llm, backend="aot_eager") == 2
    compiled(**args).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_build_optimizer_uses_fused_adamw_with_the_same_update():
    torch.manual_seed(6)
    results = []
    for spec in ({"type": torch.optim.AdamW, "lr": 1e-2, "weight_decay": 0.1},
                 {"type": torch.optim.AdamW, "lr": 1e-2, "weight_decay": 0.1, "foreach": True}):
        p = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
        opt = build_optimizer(spec, [p], "cpu")
        for step in range(3):
            p.grad = torch.cos(p.detach() * (step + 1))
            opt.step()
        results.append((opt.defaults.get("fused"), p.detach().clone()))
    assert results[0][0] is True and not results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_position_resets_are_read_once_per_forward(monkeypatch):
    """Without cu_seqlens the boundaries come from position resets: once per forward, not per layer."""
    calls = []
    original = attention._bounds_from_positions
    monkeypatch.setattr(attention, "_bounds_from_positions", lambda pos: calls.append(1) or original(pos))
    torch.manual_seed(7)
    docs = [torch.randint(3, 128, (n,)).tolist() for n in (6, 11)]
    llm = make_tiny_llama(num_hidden_layers=3)
    llm.set_attn_implementation(attention.register())
    ids = torch.tensor([docs[0] + docs[1]])
    positions = torch.tensor([list(range(6)) + list(range(11))])
    logits = llm(input_ids=ids, position_ids=positions).logits
    assert len(calls) == 1
    second = llm(input_ids=torch.tensor([docs[1]])).logits
    torch.testing.assert_close(logits[:, 6:], second, rtol=1e-5, atol=1e-6)


def test_varlen_kernel_inputs_share_the_autocast_dtype():
    """Under autocast, rotary leaves q/k in fp32 and v in bf16: the flash kernels get one 16-bit dtype."""
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)
    v = torch.randn(1, 2, 10, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel_q, kernel_k, kernel_v = attention._kernel_inputs(q, k, v)
    assert kernel_q.dtype == kernel_k.dtype == kernel_v.dtype == torch.bfloat16
    assert kernel_q.shape == (10, 4, 16) and kernel_k.shape == (10, 2, 16)
    torch.testing.assert_close(kernel_q.float(), q[0].transpose(0, 1), rtol=1e-2, atol=1e-2)
    assert attention._kernel_inputs(q, k, v) is None  # mixed dtypes without autocast: no flash kernel
    assert attention._kernel_inputs(q, k, v.float()) is None  # fp32: no flash kernel
