"""bench/cpu_matmul.py: bf16 products computed in fp32 blocks give the products, and every one a step runs is
routed (forward, autograd's backward, bitsandbytes' 4-bit layers), nothing else."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture()
def cpu_matmul(monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        module = importlib.import_module("cpu_matmul")
        monkeypatch.setattr(module, "BLOCK", 16)  # blocks cross every dimension of the small tensors below
        yield module
    finally:
        sys.path.remove(str(REPO / "bench"))


def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (40, 33, 17), (16, 48, 32)])
def test_blocked_mm_is_the_fp32_product_rounded_to_bf16(cpu_matmul, m, k, n):
    a, b = _bf16(m, k, seed=1), _bf16(k, n, seed=2)
    got = cpu_matmul.blocked_mm(a, b)
    exact = a.double() @ b.double()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # one bf16 rounding of an fp32-accumulated sum: within half a bf16 ulp (2^-8 relative) + fp32 sums' error
    assert torch.allclose(got.double(), exact, rtol=2**-8, atol=1e-5)
    assert torch.allclose(got.float(), (a @ b).float(), rtol=2**-7, atol=1e-2)  # and what torch's bf16 GEMM gives


def test_the_ops_of_a_linear_layers_forward_and_backward_are_routed_and_equal_native(cpu_matmul):
    x = _bf16(2, 20, 40, seed=3).requires_grad_()
    w = _bf16(36, 40, seed=4).requires_grad_()
    bias = _bf16(36, seed=5).requires_grad_()
    g = _bf16(2, 20, 36, seed=6)
    torch.nn.functional.linear(x, w, bias).backward(g)
    native = [t.grad.float() for t in (x, w, bias)]
    for t in (x, w, bias):
        t.grad = None
    with cpu_matmul.Fp32Matmul() as routing:
        out = torch.nn.functional.linear(x, w, bias)
        out.backward(g)
        batched = torch.baddbmm(_bf16(2, 20, 20, seed=7), x, x.transpose(1, 2), beta=0.5, alpha=2.0)
    assert out.dtype == torch.bfloat16
    for t, ref in zip((x, w, bias), native):
        assert torch.allclose(t.grad.float(), ref, rtol=2**-6, atol=0.05)
    ref = torch.baddbmm(_bf16(2, 20, 20, seed=7).float(), x.float(), x.float().transpose(1, 2), beta=0.5, alpha=2.0)
    assert torch.allclose(batched.float(), ref, rtol=2**-6, atol=0.1)
    assert sum(routing.routed.values()) >= 4  # forward, two backward products, baddbmm
    assert "aten.baddbmm.default" in routing.routed


def test_a_parameter_is_routed_as_the_loss_passes_the_frozen_head(cpu_matmul):
    head = torch.nn.Parameter(_bf16(40, 24, seed=11), requires_grad=False)
    g = _bf16(8, 40, seed=12)
    with cpu_matmul.Fp32Matmul() as routing:
        got = torch.matmul(g, head)  # the fused loss's dL/dh = g @ W
    assert routing.routed == {"aten.mm.default": 1}
    assert torch.allclose(got.float(), g.float() @ head.float(), rtol=2**-7, atol=1e-2)


def test_fp32_products_are_left_alone(cpu_matmul):
    with cpu_matmul.Fp32Matmul() as routing:
        torch.randn(4, 4) @ torch.randn(4, 4)
    assert routing.routed == {}


def test_bitsandbytes_4bit_layers_forward_and_backward_are_routed(cpu_matmul):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(_bf16(32, 64, seed=8), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantises
    x = _bf16(24, 64, seed=9).requires_grad_()
    g = _bf16(24, 32, seed=10)
    native = layer(x)
    native.backward(g)
    native_grad, x.grad = x.grad.clone(), None
    with cpu_matmul.Fp32Matmul() as routing:
        routed = layer(x)
        routed.backward(g)
    assert torch.allclose(routed.float(), native.float(), rtol=2**-6, atol=0.05)
    assert torch.allclose(x.grad.float(), native_grad.float(), rtol=2**-6, atol=0.05)
    assert routing.routed.get("bitsandbytes.gemm_4bit.default") == 1
    assert routing.routed.get("aten.linear.default") == 1  # the dequantised forward product
    assert routing.routed.get("aten.mm.default") == 1  # the backward's
