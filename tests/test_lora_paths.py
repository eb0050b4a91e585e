"""LoRA through the rest of training: activation checkpointing, sequence parallel, torch.compile, an InternEvo
checkpoint source. Each is an equivalence with a reference run (whole CLI runs of 3 steps, or one step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evotune.cli import main as cli_main
from evotune.errors import EvotuneError
from evotune.model.finetune import SupervisedFinetune
from evotune.model.load import load_model
from evotune.model.lora import shares_qkv_a
from evotune.model.checkpointing import set_activation_checkpointing
from evotune.model.compile import compile_decoder_layers
from tests.test_lora import _adapter, _lora_model, _metrics, _train_cli, lora_config_file
from tests.test_model_internlm2 import make_internlm2
from tests.test_train_speed import _batch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INTERNEVO = SHARED / "conformance" / "internlm2" / "internevo_ckpt_tp1pp1"


def _losses(work: Path) -> list[float]:
    return [r["loss"] for r in _metrics(work)]


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory, tiny_llama_dir, small_folder):
    """3 LoRA steps with activation checkpointing (the reference), without, and with SP=2 on 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("lora_paths")
    runs = {}
    for name, ckpt, extra, nproc in (("ac", True, "", 1), ("no_ac", False, "", 1),
                                     ("sp2", True, "sequence_parallel_size = 2\n", 2)):
        folder = tmp / name
        folder.mkdir()
        cfg = lora_config_file(folder, tiny_llama_dir, small_folder, steps=3, lr=3e-2, ckpt=ckpt)
        Path(cfg).write_text(Path(cfg).read_text() + extra)
        runs[name] = folder / "work"
        _train_cli(cfg, runs[name], nproc=nproc)
    return runs


def _same_training(got: Path, ref: Path, rtol: float, atol: float) -> None:
    assert len(_losses(got)) == 3
    assert _losses(got) == pytest.approx(_losses(ref), rel=rtol)
    a, b = _adapter(got), _adapter(ref)
    assert a.keys() == b.keys() and len(a) > 0
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)
    # and the adapter did train: the reference moved away from peft's zero B
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)


def test_activation_checkpointing_gives_the_same_adapter(lora_paths):
    # recomputation replays the same ops on the CPU: the same numbers, bit for bit
    _same_training(lora_paths["no_ac"], lora_paths["ac"], rtol=0, atol=0)


def test_sequence_parallel_2_equals_one_process(lora_paths):
    _same_training(lora_paths["sp2"], lora_paths["ac"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not INTERNEVO.is_dir(), reason="../shared conformance data not present")
def test_an_internevo_checkpoint_trains_like_its_converted_folder(tmp_path, small_folder):
    """LoRA on an InternEvo checkpoint == LoRA on that checkpoint converted with ``convert internevo2hf``:
    the same losses and the same adapter, in InternLM2 names (which fit the converted folder, where
    tests/test_lora.py checks them with peft)."""
    converted = tmp_path / "converted"
    assert cli_main(["convert", "internevo2hf", str(INTERNEVO), str(converted)]) == 0
    works = {}
    for name, model in (("internevo", INTERNEVO), ("converted", converted)):
        folder = tmp_path / f"run_{name}"
        folder.mkdir()
        cfg = Path(lora_config_file(folder, str(model), small_folder, steps=3, lr=3e-2))
        line = "tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)"
        assert line in cfg.read_text()  # an InternEvo checkpoint has no tokenizer files
        cfg.write_text(cfg.read_text().replace(line, "tokenizer = None"))
        works[name] = folder / "work"
        _train_cli(str(cfg), works[name])
    _same_training(works["internevo"], works["converted"], rtol=0, atol=0)
    names = _adapter(works["internevo"]).keys()
    assert any(".attention.wqkv.lora_A" in k for k in names) and any(".feed_forward.w2.lora_B" in k for k in names)


def test_compiled_lora_layers_give_the_eager_adapter_gradients(tiny_llama_dir):
    """peft's LoRA layers inside compiled decoder layers (the GPU default): the same gradients, and only the
    adapter has any."""
    args = _batch(seed=7)
    torch.manual_seed(0)  # peft draws A at random
    eager = _lora_model(tiny_llama_dir)
    eager(**args).backward()
    torch.manual_seed(0)
    compiled = _lora_model(tiny_llama_dir)
    assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), compiled.parameters()))
    set_activation_checkpointing(compiled.llm, "selective")
    assert compile_decoder_layers(compiled.llm, backend="aot_eager") == 2
    compiled(**args).backward()
    trained = [(n, p, q) for (n, p), q in zip(eager.named_parameters(), compiled.parameters()) if p.requires_grad]
    assert trained and all("lora_" in n for n, _, _ in trained)
    for name, p, q in trained:  # aot_eager decomposes some ops: fp32 rounding differs (seen: 7e-7 on grads of 3)
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(q.grad is None for q in compiled.parameters() if not q.requires_grad)


def _adapted(model) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path, m in model.llm.named_modules() if hasattr(m, "lora_A")})


def test_target_modules_of_an_internlm2_base_may_use_internlm2_names(tmp_path, tiny_llama_dir, capsys):
    base = make_internlm2(tmp_path / "base", hidden_size=64, intermediate_size=96, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)

    def lora(path, targets):
        return SupervisedFinetune(load_model(path), activation_checkpointing=False, torch_compile=False,
                                  fused_kernels="none",
                                  lora=dict(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))

    fused = lora(base, ["wqkv", "w2"])
    assert _adapted(fused) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    out = capsys.readouterr().out
    assert "LoRA target_modules in InternLM2 names: w2 -> down_proj; wqkv -> q_proj, k_proj, v_proj" in out
    assert "q_proj, k_proj and v_proj share one lora_A in each of 2 layers, one rank-4 adapter on wqkv" in out
    assert shares_qkv_a(fused.llm)
    split = lora(base, ["q_proj", "k_proj", "v_proj"])  # Llama names: three independent A's, as peft makes them
    assert _adapted(split) == ["k_proj", "q_proj", "v_proj"] and not shares_qkv_a(split.llm)
    assert "share one lora_A" not in capsys.readouterr().out
    assert sum(p.numel() for p in split.parameters() if p.requires_grad) - \
        sum(p.numel() for p in lora(base, ["wqkv"]).parameters() if p.requires_grad) == 2 * 2 * 4 * 64
    assert _adapted(lora(base, ["wo", "o_proj", "w1"])) == ["gate_proj", "o_proj"]  # both spellings, once
    with pytest.raises(EvotuneError, match=r"\['w4'\] match no linear layer of the model; its linear layers are: "
                                           r"down_proj, .*, v_proj \(in InternLM2 names: w1, w2, w3, wo, wqkv\)"):
        lora(base, ["wqkv", "w4"])
    with pytest.raises(EvotuneError, match=r"\['wqkv'\] match no linear layer"):  # a Llama has no wqkv
        lora(tiny_llama_dir, ["wqkv"])
