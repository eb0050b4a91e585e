"""Varlen attention and chunked loss are exact (evotune/model/attention.py, evotune/model/loss.py; issue 2 a/d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evotune.data.collate import MODEL_INPUTS, packed_collate
from evotune.model.checkpointing import set_activation_checkpointing
from evotune.model.finetune import SupervisedFinetune
from evotune.model.loss import chunked_cross_entropy
from tests.conftest import make_tiny_llama, whole_document_pack


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_packed_varlen_equals_documents_one_by_one():
    torch.manual_seed(0)
    docs = [torch.randint(3, 128, (n,)).tolist() for n in (7, 19, 1, 12)]
    model = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=True)
    set_activation_checkpointing(model.llm, "full")  # parallelize applies it in training
    batch = packed_collate([whole_document_pack(docs)], "token")
    loss = model(**{k: batch[k] for k in MODEL_INPUTS})
    loss.backward()
    packed_grads = _grads(model)

    reference = make_tiny_llama()
    reference.set_attn_implementation("eager")
    reference.zero_grad()
    total = 0.0
    for d in docs:
        if len(d) < 2:
            continue
        ids = torch.tensor([d])
        logits = reference(ids).logits[0, :-1]
        doc_loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        doc_loss.backward()
        total += doc_loss.item()
    assert abs(loss.item() - total) < 1e-4 * max(1.0, abs(total))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(packed_grads["llm." + name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_differs_from_plain_causal_over_the_pack():
    """The test above can fail: attention across documents changes the loss."""
    torch.manual_seed(1)
    docs = [torch.randint(3, 128, (n,)).tolist() for n in (9, 14)]
    batch = packed_collate([whole_document_pack(docs)], "token")
    args = {k: batch[k] for k in MODEL_INPUTS}
    varlen = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=True)(**args)
    plain = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=False)(**args)
    assert abs(varlen.item() - plain.item()) > 1e-3


def test_pack_reduction_is_mean_per_pack():
    torch.manual_seed(2)
    packs = [whole_document_pack([torch.randint(3, 128, (n,)).tolist()]) for n in (10, 30)]
    model = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=True, activation_checkpointing=False)
    means = []
    for p in packs:
        b = packed_collate([p], "token")
        means.append(model(**{k: b[k] for k in MODEL_INPUTS}).item() / b["num_loss_tokens"])
    both = packed_collate(packs, "pack")
    assert abs(model(**{k: both[k] for k in MODEL_INPUTS}).item() - sum(means) / 2) < 1e-5


def test_chunked_loss_equals_full_logits_loss():
    torch.manual_seed(0)
    n, h, v = 300, 32, 97
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    token_weight = torch.rand(n, dtype=torch.float64)
    chunked = chunked_cross_entropy(hidden, weight, labels, token_weight, chunk_tokens=64)
    chunked.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = (F.cross_entropy(hidden @ weight.T, labels, reduction="none") * token_weight).sum()
    full.backward()
    torch.testing.assert_close(chunked.double(), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-6, atol=1e-9)


def test_chunked_loss_keeps_one_chunk_of_logits():
    """Saved activations between forward and backward hold no [N, V] logits tensor."""
    n, h, v = 512, 16, 4096
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, torch.randint(0, v, (n,)), torch.ones(n), chunk_tokens=64)
    assert max(saved) < n * v / 4
