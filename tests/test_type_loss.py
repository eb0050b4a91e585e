"""Per-type loss: group sums from the chunked loss, and ``loss/<type>`` over micro-batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from evotune.data.collate import packed_collate
from evotune.model.loss import chunked_cross_entropy
from evotune.train.type_loss import TypeLoss


def test_group_sums_are_plain_ce_per_group_and_leave_the_loss_and_grads_unchanged():
    torch.manual_seed(0)
    n, h, v = 300, 16, 50
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels, token_weight, groups = torch.randint(0, v, (n,)), torch.rand(n), torch.randint(0, 3, (n,))

    plain = chunked_cross_entropy(hidden, weight, labels, token_weight, chunk_tokens=64, label_smoothing=0.1)
    plain.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, sums = chunked_cross_entropy(hidden, weight, labels, token_weight, chunk_tokens=64, label_smoothing=0.1,
                                       group_ids=groups, num_groups=4)
    loss.backward()
    assert torch.equal(loss, plain)
    assert torch.equal(hidden.grad, grads[0]) and torch.equal(weight.grad, grads[1])
    assert not sums.requires_grad and sums.shape == (4,)
    ce = F.cross_entropy(hidden.detach() @ weight.detach().T, labels, reduction="none")  # no label smoothing
    want = torch.stack([ce[groups == g].sum() for g in range(4)])
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-4)
    assert sums[3] == 0
    with torch.no_grad():  # the evaluation path (no autograd function) sums the same
        loss_ng, sums_ng = chunked_cross_entropy(hidden, weight, labels, token_weight, chunk_tokens=64,
                                                 label_smoothing=0.1, group_ids=groups, num_groups=4)
    torch.testing.assert_close(sums_ng, sums, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss_ng, loss, rtol=1e-6, atol=1e-5)


def _pack(rng, n: int, type_id: int, vocab: int = 128) -> dict:
    ids = rng.randint(3, vocab, size=n)
    labels = np.append(ids[1:], -100)
    labels[rng.rand(n) < 0.3] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": np.arange(n), "cu_seqlens": np.array([0, n]),
            "type_ids": np.full(n, type_id)}


def test_loss_per_type_is_token_mean_over_micro_batches():
    rng = np.random.RandomState(0)
    model = make_tiny_llama()
    batches = [packed_collate([_pack(rng, 40, 0), _pack(rng, 30, 2)]), packed_collate([_pack(rng, 50, 2)])]
    meter = TypeLoss(["cn", "code", "en"])
    per_type: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    for mb in batches:
        extra = meter.model_inputs(mb)
        hidden = model.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).last_hidden_state[0]
        hidden = hidden.index_select(0, mb["loss_index"])
        head = model.get_output_embeddings()
        _, sums = chunked_cross_entropy(hidden, head.weight, mb["loss_labels"], mb["loss_weight"],
                                        group_ids=extra["loss_group_ids"], num_groups=extra["num_groups"])
        meter.add(sums, mb)
        with torch.no_grad():  # reference: full logits, per position
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits[0]
        labels, types = mb["labels"][0], mb["type_ids"][0]
        for t in per_type:
            keep = (labels != -100) & (types == t)
            per_type[t].append(F.cross_entropy(logits[keep], labels[keep], reduction="none"))
    got = meter.reduce(distributed=False)
    assert set(got) == {"loss/cn", "loss/en"}  # no 'code' token: left out, not 0/0
    for t, name in ((0, "loss/cn"), (2, "loss/en")):
        assert abs(got[name] - float(torch.cat(per_type[t]).mean())) < 1e-5
    assert meter.reduce(distributed=False) == {}  # reset after reduce
