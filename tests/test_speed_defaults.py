"""The fast defaults (issue 16): 'auto' checkpointing picks the documented mode for given memory numbers,
the per-token activation sizes it uses are measured exactly, compilation is decided in one place, and
``parallelize`` applies checkpointing, then compilation, with the eager path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from evotune.cli import main as cli_main
from evotune.data.collate import MODEL_INPUTS, packed_collate
from evotune.errors import EvotuneError
from evotune.model import checkpointing, kernels
from evotune.model.compile import decide
from evotune.model.finetune import SupervisedFinetune
from evotune.parallel.env import DistEnv
from evotune.parallel.fsdp import REPLICATE, parallelize
from evotune.parallel.mesh import build_mesh
from evotune.train import loop
from tests.conftest import make_tiny_llama, whole_document_pack
from tests.test_distributed import read_hf_weights, tiny_options
from tests.test_faults import strict_records

GiB = 2**30
# llama-1b-like bytes per token and layer: none 90 KB, selective 45 KB, full 4 KB
PER_TOKEN = {"none": 90_000, "selective": 45_000, "full": 4_096}


@pytest.mark.parametrize("free_gib, expected", [(80, "none"), (50, "selective"), (35, "full"), (33, "full")])
def test_auto_checkpointing_takes_the_fastest_mode_that_fits(free_gib, expected):
    # 22 layers x 16384 tokens: none 30.2 GiB, selective 15.1 GiB, full 1.4 GiB; budget = free - 16 GiB
    # reserve (20% of 80 GiB) - 16.4 GiB of state: 47.6, 17.6, 2.6 and 0.6 GiB
    choice = checkpointing.choose_mode(PER_TOKEN, layers=22, tokens=16384, free_bytes=free_gib * GiB,
                                       total_bytes=80 * GiB, state_bytes=int(17.6e9))
    assert choice.mode == expected
    assert "none 30.2 GiB, selective 15.1 GiB, full 1.4 GiB" in choice.reason
    assert ("may not fit" in choice.reason) == (free_gib == 33)
    # the boundary is exact: one byte less budget than 'none' needs gives 'selective'
    need = PER_TOKEN["none"] * 22 * 16384
    at = checkpointing.choose_mode(PER_TOKEN, 22, 16384, free_bytes=need, total_bytes=GiB, state_bytes=0,
                                   reserve_fraction=0.0)
    below = checkpointing.choose_mode(PER_TOKEN, 22, 16384, free_bytes=need - 1, total_bytes=GiB, state_bytes=0,
                                      reserve_fraction=0.0)
    assert (at.mode, below.mode) == ("none", "selective")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_activation_bytes_per_token(dtype):
    llm = make_tiny_llama()  # hidden 64, 4 heads / 2 kv heads of 16, intermediate 128
    got = checkpointing.measure_activation_bytes(llm, dtype, tokens=64)
    size = torch.empty((), dtype=dtype).element_size()
    h, q, kv, ffn, heads = 64, 64, 32, 128, 4
    # selective keeps the outputs of the 7 matrix products and of attention (+ its fp32 logsumexp per head)
    # and the layer input
    kept = size * (q + 2 * kv + h + 2 * ffn + h) + size * q + 4 * heads + size * h
    assert got["full"] == size * h
    assert got["selective"] == kept
    assert got["none"] > got["selective"] > got["full"]


def test_compile_is_decided_in_one_place():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decide("auto", cuda, torch.bfloat16, True).enabled
    fallback = decide("auto", cuda, torch.float32, True)
    assert not fallback.enabled and "here: cuda, float32" in fallback.message
    assert not decide("auto", cpu, torch.float32, True).enabled
    assert not decide(False, cuda, torch.bfloat16, True).enabled
    assert decide({"mode": "max-autotune"}, cuda, torch.bfloat16, True).options == {"mode": "max-autotune"}
    assert decide({"backend": "aot_eager"}, cpu, torch.float32, False).enabled  # plain causal compiles anywhere
    with pytest.raises(EvotuneError, match=r"torch_compile=True needs bf16 compute on a GPU \(here: cpu, float32\)"):
        decide(True, cpu, torch.float32, True)
    with pytest.raises(EvotuneError, match="torch_compile='yes'"):
        decide("yes", cpu, torch.float32, True)


def _batch(seed: int = 0, lengths=(7, 19, 1, 12)) -> dict:
    torch.manual_seed(seed)
    docs = [torch.randint(3, 128, (n,)).tolist() for n in lengths]
    b = packed_collate([whole_document_pack(docs)], "token")
    return {k: b[k] for k in MODEL_INPUTS}


def _one_cpu_process():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return build_mesh(env)


def test_supervised_finetune_only_records_and_parallelize_applies_auto_as_full_on_cpu():
    model = SupervisedFinetune(make_tiny_llama())
    assert (model.activation_checkpointing, model.torch_compile) == ("auto", "auto")
    assert not model.llm.is_activation_checkpointing  # nothing applied before parallelize
    lines = []
    parallelize(model, _one_cpu_process(), REPLICATE, torch.device("cpu"), torch.float32, tokens=64,
                log=lines.append)
    assert model.activation_checkpointing == "full" and model.llm.is_activation_checkpointing
    assert lines[0].startswith("evotune: activation_checkpointing='auto' -> 'full': on cpu")
    assert lines[1].startswith("evotune: fused kernels: none (layers not compiled, liger-kernel ")
    assert lines[2].startswith("evotune: torch_compile='auto': decoder layers not compiled (here: cpu, float32")


def test_parallelize_applies_checkpointing_then_compile_with_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    args = _batch(seed=5)
    eager = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=False, activation_checkpointing="none",
                               torch_compile=False)
    loss = eager(**args)
    loss.backward()
    fast = SupervisedFinetune(make_tiny_llama(), use_varlen_attn=False, activation_checkpointing="selective",
                              torch_compile={"backend": "aot_eager"})
    lines = []
    parallelize(fast, _one_cpu_process(), REPLICATE, torch.device("cpu"), torch.float32, log=lines.append)
    assert lines == ["evotune: fused kernels: inductor (the decoder layers are compiled)",
                     "evotune: torch_compile={'backend': 'aot_eager'}: 2 decoder layers compiled"]
    assert all(layer._compiled_call_impl is not None for layer in fast.llm.model.layers)
    fast_loss = fast(**args)
    fast_loss.backward()
    torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _reference_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True):
    assert (offset, casting_mode) == (0.0, "llama")
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_liger_goes_on_the_module_instances_only(monkeypatch):
    """With stand-ins for Liger's two functions (liger-kernel needs CUDA; the GPU suite checks the real
    kernels' losses): every RMSNorm and SwiGLU instance of this model is replaced, no class is, and
    loss and gradients are the eager ones."""
    from transformers.models.llama import modeling_llama

    calls = {"rms": 0, "swiglu": 0}

    def rms(*a, **kw):
        calls["rms"] += 1
        return _reference_rms_norm(*a, **kw)

    def swiglu(a, b):
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    monkeypatch.setattr(kernels, "liger_rms_norm", rms)
    monkeypatch.setattr(kernels, "liger_swiglu", swiglu)
    class_forwards = (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaMLP.forward)
    args = _batch(seed=9)
    eager = SupervisedFinetune(make_tiny_llama(), activation_checkpointing="none")
    eager(**args).backward()
    fused = SupervisedFinetune(make_tiny_llama(), activation_checkpointing="none")
    assert kernels.apply_liger(fused.llm) == {"rms_norm": 5, "swiglu": 2}  # 2 per layer + final norm; 2 MLPs
    assert (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaMLP.forward) == class_forwards
    assert "forward" not in vars(make_tiny_llama().model.norm)  # a model built afterwards is untouched
    loss = fused(**args)
    loss.backward()
    assert calls == {"rms": 5, "swiglu": 2}
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_kernels_setting_is_resolved_or_refused():
    cpu = torch.device("cpu")
    assert kernels.resolve("auto", True, cpu) == ("inductor", "the decoder layers are compiled")
    assert kernels.resolve("none", False, cpu) == ("none", "as set")
    with pytest.raises(EvotuneError, match="fused_kernels='liger' needs the liger-kernel package and a CUDA"):
        kernels.resolve("liger", False, cpu)
    with pytest.raises(EvotuneError, match="fused_kernels='inductor' fuses through torch.compile"):
        kernels.resolve("inductor", False, cpu)
    with pytest.raises(EvotuneError, match="fused_kernels='triton'"):
        SupervisedFinetune(make_tiny_llama(), fused_kernels="triton")


def test_reading_every_log_interval_steps_trains_and_logs_what_reading_every_step_does(
        tmp_path, tiny_llama_dir, small_folder, monkeypatch):
    """log_interval=4: the loss and gradient norm stay on the device between reads (one read per 4 steps
    instead of one per step), and the metrics lines, the weights and the checkpoint are the same."""
    reads = []
    original = loop._Stepper._read
    monkeypatch.setattr(loop._Stepper, "_read", lambda self, state: reads.append(state.step) or original(self, state))
    runs = {}
    for interval in (1, 4):
        work = tmp_path / f"w{interval}"
        opts = tiny_options(tiny_llama_dir, small_folder, max_steps=10, save_steps=5) + [f"log_interval={interval}"]
        reads.clear()
        assert cli_main(["train", "tiny_llama_cpu", "--seed", "0", "--device", "cpu", "--work-dir", str(work),
                         "--cfg-options", *opts]) == 0
        runs[interval] = (strict_records(work / "metrics.jsonl"), read_hf_weights(work), list(reads))
    (every, w1, reads1), (deferred, w4, reads4) = runs[1], runs[4]
    assert reads1 == list(range(1, 11))
    assert reads4 == [4, 5, 8, 10]  # log_interval, the checkpoint at 5, the log at 8, the last step
    keys = ("step", "loss", "grad_norm", "lr", "skipped", "skipped_steps", "tokens")
    assert [{k: r[k] for k in keys} for r in deferred] == [{k: r[k] for k in keys} for r in every]
    for name, w in w1.items():
        assert torch.equal(w4[name], w), name
    # per-type losses too, on every line: kept per step on the device, reduced at the reads
    per_type = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in every]
    assert all(per_type) and [{k: v for k, v in r.items() if k.startswith("loss/")} for r in deferred] == per_type


def test_a_nan_step_between_reads_is_not_applied_on_the_device():
    """What the loop relies on between reads: fused AdamW with found_inf=1 leaves weights, moments and step."""
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(4)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["step"].clone())
    p.grad = torch.full((4,), float("nan"))
    opt.found_inf = (~torch.isfinite(p.grad.norm())).float()
    opt.step()
    del opt.found_inf
    after = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["step"])
    for x, y in zip(before, after):
        assert torch.equal(x, y)
