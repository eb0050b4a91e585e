"""LoRA and QLoRA (evotune/model/lora.py, evotune/checkpoint/adapter.py): training, export, merge, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evotune.checkpoint import dcp
from evotune.checkpoint.adapter import read_adapter
from evotune.cli import main as cli_main
from evotune.convert import merge
from evotune.data.collate import model_inputs, packed_collate
from evotune.model.finetune import SupervisedFinetune
from evotune.model.load import load_model
from evotune.model.lora import apply_lora
from tests.conftest import random_documents, whole_document_pack, write_folder
from tests.test_model_internlm2 import make_internlm2
from tests.test_train import write_config

LORA = "dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM')"


def lora_config_file(tmp_path: Path, model: str, data: str, lora: str = LORA, llm_extra: str = "", **kw) -> str:
    """tests/test_train.py's config with ``lora=`` on the model (and extra load_model arguments)."""
    path = Path(write_config(tmp_path, model, data, **kw))
    text = path.read_text().replace(
        "llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype='float32'))",
        f"llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype='float32'{llm_extra}),\n"
        f"             lora={lora})")
    path.write_text("from peft import LoraConfig\nfrom transformers import BitsAndBytesConfig\nimport torch\n" + text)
    return str(path)


def _metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def _randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """peft starts B at zero (the adapter is a no-op); tests need an adapter that changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _lora_model(path: str) -> SupervisedFinetune:
    model = SupervisedFinetune(load_model(path, dtype="float32"), activation_checkpointing=False,
                               torch_compile=False, fused_kernels="none",
                               lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    _randomise_lora_b(model)
    return model


def _loss_and_grads(model, docs: list[list[int]]):
    model.zero_grad(set_to_none=True)
    batch = packed_collate([whole_document_pack(docs)], "pack")
    loss = model(**model_inputs(batch, torch.device("cpu")))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_rows_equal_documents_one_by_one(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir)
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 128, n).tolist() for n in (7, 19, 12)]
    packed_loss, packed = _loss_and_grads(model, docs)
    # pack weights: each supervised token 1/len of the row; documents alone are re-weighted to the row's
    total = sum(len(d) - 1 for d in docs)
    alone_loss, alone = 0.0, {n: torch.zeros_like(g) for n, g in packed.items()}
    for d in docs:
        loss, grads = _loss_and_grads(model, [d])
        share = (len(d) - 1) / total
        alone_loss += loss * share
        for n, g in grads.items():
            alone[n] += g * share
    assert abs(float(packed_loss - alone_loss)) < 1e-6
    assert set(packed) == {n for n, _ in model.named_parameters() if "lora_" in n}
    for n in packed:
        torch.testing.assert_close(packed[n], alone[n], rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-4 for n, g in packed.items() if "lora_A" in n)


def test_target_modules_matching_nothing_lists_the_linear_layers(tmp_path, tiny_llama_dir, small_folder, capsys):
    lora = "dict(type=LoraConfig, r=4, target_modules=['wqkv', 'q_proj'])"
    cfg = lora_config_file(tmp_path, tiny_llama_dir, small_folder, lora=lora, steps=1)
    assert cli_main(["train", cfg, "--work-dir", str(tmp_path / "w")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evotune")]
    assert err == ["evotune: error: lora target_modules ['wqkv'] match no linear layer of the model; its linear "
                   "layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"]


def test_refused_lora_options_say_why():
    from evotune.errors import EvotuneError
    from evotune.model.lora import lora_config

    with pytest.raises(EvotuneError, match="bias='all'"):
        lora_config(dict(r=4, bias="all"))
    with pytest.raises(EvotuneError, match="use_dora"):
        lora_config(dict(r=4, use_dora=True))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir, small_folder):
    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = lora_config_file(tmp, tiny_llama_dir, small_folder, steps=12, lr=3e-2)
    Path(cfg).write_text(Path(cfg).read_text() + "save_merged = True\n")
    work = tmp / "work"
    assert cli_main(["train", cfg, "--work-dir", str(work)]) == 0
    return work


def test_lora_trains_only_the_adapter_and_checkpoints_it_alone(lora_run, tiny_llama_dir):
    rows = _metrics(lora_run)
    assert len(rows) == 12 and np.mean([r["loss"] for r in rows[-3:]]) < rows[0]["loss"] - 0.05
    step = dcp.list_checkpoints(dcp.checkpoints_dir(str(lora_run)))[-1][1]
    saved = dcp.read_model_state(step)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert len(saved) == 2 * 7 * 2  # A and B of 7 linear layers in 2 decoder layers
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)
    state = json.loads((Path(step) / "trainer_state.json").read_text())
    assert state["lora"]["r"] == 4 and state["lora"]["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # the base is untouched: the model trained = base + the saved adapter, exactly
    base = load_model(tiny_llama_dir, dtype="float32")
    trained = load_model(tiny_llama_dir, dtype="float32")
    apply_lora(trained, dict(r=4, lora_alpha=8, lora_dropout=0.0), log=None)
    missing, unexpected = trained.load_state_dict(saved, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    base_sd = base.state_dict()
    for k, v in trained.state_dict().items():
        plain = k.replace(".base_layer", "")
        if "lora_" not in k:
            assert torch.equal(v, base_sd[plain]), k


def _evotune_lora_logits(base_dir: str, step_dir: str, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(base_dir, dtype="float32")
    apply_lora(model, dict(r=4, lora_alpha=8, lora_dropout=0.0), log=None)
    model.load_state_dict(dcp.read_model_state(step_dir), strict=False)
    with torch.no_grad():
        return model(ids).logits


def test_exported_adapter_loads_in_peft_and_merges(lora_run, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_run / "hf_adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    step = dcp.list_checkpoints(dcp.checkpoints_dir(str(lora_run)))[-1][1]
    ids = torch.randint(3, 128, (2, 17))
    ours = _evotune_lora_logits(tiny_llama_dir, step, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    assert float((ours - plain).abs().max()) > 1e-3  # the adapter changes the model
    torch.testing.assert_close(peft_logits, ours, rtol=0, atol=1e-5)

    assert cli_main(["convert", "merge", tiny_llama_dir, str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, rtol=0, atol=1e-5)
    # pth_to_hf on the LoRA work dir writes the same adapter
    assert cli_main(["convert", "pth_to_hf", str(lora_run), str(tmp_path / "again")]) == 0
    again, _ = read_adapter(tmp_path / "again")
    first, _ = read_adapter(adapter)
    assert again.keys() == first.keys() and all(torch.equal(again[k][1], first[k][1]) for k in first)


def _assert_same_folder(got: Path, want: Path) -> None:
    """The same config.json and the same tensors, bit for bit."""
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_save_merged_writes_hf_as_convert_merge_does(lora_run, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert cli_main(["convert", "merge", tiny_llama_dir, str(lora_run / "hf_adapter"), str(tmp_path / "merged")]) == 0
    _assert_same_folder(lora_run / "hf", tmp_path / "merged")
    assert load_file(lora_run / "hf" / "model.safetensors").keys() == load_file(
        Path(tiny_llama_dir) / "model.safetensors").keys()  # the base's layout, no adapter keys
    step = dcp.list_checkpoints(dcp.checkpoints_dir(str(lora_run)))[-1][1]
    ids = torch.randint(3, 128, (2, 17))
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "hf", dtype=torch.float32)
    with torch.no_grad():  # merged == base + adapter as trained
        torch.testing.assert_close(merged(ids).logits, _evotune_lora_logits(tiny_llama_dir, step, ids), rtol=0,
                                   atol=1e-5)


def test_save_merged_without_lora_is_one_line(tmp_path, tiny_llama_dir, small_folder, capsys):
    cfg = Path(write_config(tmp_path, tiny_llama_dir, small_folder, steps=1))
    cfg.write_text(cfg.read_text() + "save_merged = True\n")
    assert cli_main(["train", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evotune: error: save_merged=True (cfg.py: save_merged) merges a LoRA adapter into its base, but "
                   "the model has no lora=: a full fine-tune writes hf/ anyway; remove save_merged or add "
                   "lora=dict(type=LoraConfig, ...) to the model"]


INTERNEVO = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "internlm2" / \
    "internevo_ckpt_tp1pp1"


@pytest.mark.parametrize("case", ["internevo", "save_format"])
def test_save_merged_refusals_at_start(case, tmp_path, tiny_llama_dir, small_folder, capsys):
    if case == "internevo" and not INTERNEVO.is_dir():
        pytest.skip("../shared conformance data not present")
    model = str(INTERNEVO) if case == "internevo" else tiny_llama_dir
    cfg = Path(lora_config_file(tmp_path, model, small_folder, steps=1))
    extra = "save_merged = True\n" + ("save_format = 'internlm2'\n" if case == "save_format" else "")
    cfg.write_text(cfg.read_text().replace(
        "tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)", "tokenizer = None") + extra)
    work = tmp_path / "w"
    assert cli_main(["train", str(cfg), "--work-dir", str(work)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evotune")]
    want = {"internevo": f"evotune: error: save_merged=True (cfg.py: save_merged): the base {INTERNEVO} is an "
                         "InternEvo checkpoint, which evotune convert merge does not merge into; remove save_merged, "
                         "convert the base with 'evotune convert internevo2hf' and run 'evotune convert merge' on "
                         "that folder and hf_adapter/",
            "save_format": "evotune: error: save_merged=True (cfg.py: save_merged) writes hf/ in the base's "
                           "huggingface layout from an adapter in that layout, but save_format='internlm2' "
                           "(cfg.py: save_format) writes hf_adapter/ in another; remove one of them"}
    assert err == [want[case]]
    assert not (work / "metrics.jsonl").exists()  # refused before the first step


# ---------------------------------------------------------------- InternLM2 base: adapter in InternLM2 names


class _InternLM2Reference(torch.nn.Module):
    """InternLM2's forward in its own module names (attention.wqkv grouped per kv head, wo,
    feed_forward.w1/w2/w3), written from its published modelling code, so that peft can load an
    InternLM2-named adapter onto it (its remote code does not run on transformers 5)."""

    def __init__(self, path: Path):
        super().__init__()
        cfg = json.loads((path / "config.json").read_text())
        self.cfg = cfg
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(**cfg)  # what peft's wrapper reads (model_type, tie_word_embeddings)
        H, V = cfg["hidden_size"], cfg["vocab_size"]
        self.heads, self.kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = H // self.heads
        rows = (self.heads + 2 * self.kv) * self.d
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.model = torch.nn.Module()
        self.model.tok_embeddings = torch.nn.Embedding(V, H)
        self.model.layers = torch.nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = torch.nn.Module()
            layer.attention = torch.nn.Module()
            layer.attention.wqkv, layer.attention.wo = lin(H, rows), lin(H, H)
            layer.feed_forward = torch.nn.Module()
            inter = cfg["intermediate_size"]
            layer.feed_forward.w1, layer.feed_forward.w3, layer.feed_forward.w2 = lin(H, inter), lin(H, inter), \
                lin(inter, H)
            layer.attention_norm = torch.nn.Parameter(torch.ones(H))
            layer.ffn_norm = torch.nn.Parameter(torch.ones(H))
            self.model.layers.append(layer)
        self.model.norm = torch.nn.Parameter(torch.ones(H))
        self.output = lin(H, V)
        sd = load_file(path / "model.safetensors")
        sd = {k.replace("attention_norm.weight", "attention_norm").replace("ffn_norm.weight", "ffn_norm")
              .replace("model.norm.weight", "model.norm"): v for k, v in sd.items()}
        self.load_state_dict(sd)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """peft's causal-LM wrapper (task_type CAUSAL_LM) requires it; these tests do not generate."""
        return {"input_ids": input_ids}

    def _norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    def forward(self, input_ids, **unused):  # peft's wrapper passes attention_mask=None etc.
        ids = input_ids
        T = ids.shape[1]
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, self.d, 2).float() / self.d))
        ang = torch.outer(torch.arange(T).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(x):
            x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        h = self.model.tok_embeddings(ids)
        g = self.heads // self.kv
        for layer in self.model.layers:
            x = self._norm(h, layer.attention_norm)
            qkv = layer.attention.wqkv(x).view(*x.shape[:2], self.kv, g + 2, self.d)
            q = qkv[..., :g, :].reshape(*x.shape[:2], self.heads, self.d).transpose(1, 2)
            k = qkv[..., g, :].transpose(1, 2).repeat_interleave(g, 1)
            v = qkv[..., g + 1, :].transpose(1, 2).repeat_interleave(g, 1)
            att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            h = h + layer.attention.wo(att.transpose(1, 2).reshape(*x.shape))
            x = self._norm(h, layer.ffn_norm)
            ff = layer.feed_forward
            h = h + ff.w2(F.silu(ff.w1(x)) * ff.w3(x))
        return self.output(self._norm(h, self.model.norm))


def test_internlm2_adapter_in_internlm2_names_loads_in_peft_and_merges(tmp_path, small_folder, capsys):
    from peft import PeftModel

    base = make_internlm2(tmp_path / "base", hidden_size=64, intermediate_size=96, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    reference = _InternLM2Reference(base)
    ids = torch.randint(3, 128, (2, 13))
    with torch.no_grad():  # the reference is InternLM2: it gives evotune's (Llama-loaded) logits
        torch.testing.assert_close(reference(ids), load_model(base)(ids).logits, rtol=0, atol=1e-5)
    cfg = lora_config_file(tmp_path, str(base), small_folder, steps=4, lr=3e-2)
    Path(cfg).write_text(Path(cfg).read_text() + "save_merged = True\n")
    work = tmp_path / "work"
    assert cli_main(["train", cfg, "--work-dir", str(work)]) == 0
    adapter = work / "hf_adapter"
    modules, config = read_adapter(adapter)
    assert sorted(config["target_modules"]) == ["w1", "w2", "w3", "wo", "wqkv"]
    wqkv = modules["model.layers.0.attention.wqkv"]
    # XTuner's adapter: q, k and v share one A, so wqkv's is rank r with B's rows grouped per kv head
    assert wqkv[0].shape == (4, 64) and wqkv[1].shape == ((8 + 4) * 8, 4)
    assert config["r"] == 4 and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    step = dcp.list_checkpoints(dcp.checkpoints_dir(str(work)))[-1][1]
    ours = _evotune_lora_logits(str(base), step, ids)
    with torch.no_grad():
        assert float((ours - reference(ids)).abs().max()) > 1e-4
        peft_logits = PeftModel.from_pretrained(reference, str(adapter)).eval()(ids)
    torch.testing.assert_close(peft_logits, ours, rtol=0, atol=1e-5)

    merged = merge(str(base), str(adapter), tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["model_type"] == "internlm2"
    assert "model.layers.0.attention.wqkv.weight" in load_file(merged / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(ids).logits, ours, rtol=0, atol=1e-5)
    _assert_same_folder(work / "hf", merged)  # save_merged: the same InternLM2 folder

    # the checkpoint's q, k and v share one A: a resume whose Llama names keep them independent is refused
    llama_names = LORA.replace("r=4,", "r=4, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                               "'up_proj', 'down_proj'],")
    (tmp_path / "other").mkdir()
    other = lora_config_file(tmp_path / "other", str(base), small_folder, lora=llama_names, steps=6, lr=3e-2)
    capsys.readouterr()
    assert cli_main(["train", other, "--work-dir", str(work), "--resume", "auto"]) != 0
    captured = capsys.readouterr()
    assert "the checkpoint's adapter has one lora_A shared by q_proj, k_proj and v_proj" in captured.err + captured.out
    assert "Traceback" not in captured.err


def test_internlm2_adapter_is_xtuners_rank_r_adapter_on_wqkv(tmp_path):
    """evotune's LoRA on an InternLM2 base, loaded as Llama layers, is the adapter XTuner trains on the fused
    wqkv: the same loss and, mapped to wqkv (one A; B's rows grouped per kv head), the same gradients."""
    from peft import LoraConfig, get_peft_model

    from evotune.checkpoint.internlm2 import merge_wqkv
    from evotune.model.lora import shares_qkv_a

    base = make_internlm2(tmp_path / "base", hidden_size=64, intermediate_size=96, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    ours = load_model(base, dtype="float32")
    apply_lora(ours, dict(r=4, lora_alpha=8, lora_dropout=0.0), log=None)
    _randomise_lora_b(ours)
    assert shares_qkv_a(ours)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == 2 * (
        4 * 64 + (8 + 4) * 8 * 4 + (64 * 4 + 4 * 64) + 2 * (64 * 4 + 96 * 4) + (4 * 96 + 64 * 4))
    xtuner = get_peft_model(_InternLM2Reference(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["wqkv", "wo", "w1", "w2", "w3"]))
    pairs = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}

    def lora_of(module):
        return module.lora_A["default"].weight, module.lora_B["default"].weight

    with torch.no_grad():
        for mine, theirs in zip(ours.model.layers, xtuner.base_model.model.model.layers):
            q, k, v = (lora_of(mine.get_submodule(f"self_attn.{n}_proj")) for n in "qkv")
            a, b = lora_of(theirs.attention.wqkv)
            a.copy_(q[0]), b.copy_(merge_wqkv(q[1], k[1], v[1], 8, 2))
            for name, llama in pairs.items():
                for dst, src in zip(lora_of(theirs.get_submodule(name)), lora_of(mine.get_submodule(llama))):
                    dst.copy_(src)
    ids = torch.randint(3, 128, (2, 13))

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))

    loss, ref_loss = loss_of(ours(ids).logits), loss_of(xtuner(ids))
    loss.backward(), ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for mine, theirs in zip(ours.model.layers, xtuner.base_model.model.model.layers):
        q, k, v = (lora_of(mine.get_submodule(f"self_attn.{n}_proj")) for n in "qkv")
        a, b = lora_of(theirs.attention.wqkv)
        assert k[0] is q[0] and v[0] is q[0]  # one A, one gradient summed over q, k and v
        torch.testing.assert_close(q[0].grad, a.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(merge_wqkv(q[1].grad, k[1].grad, v[1].grad, 8, 2), b.grad, rtol=0, atol=1e-6)
        for name, llama in pairs.items():
            for got, want in zip(lora_of(mine.get_submodule(llama)), lora_of(theirs.get_submodule(name))):
                torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-6)
        assert float(a.grad.abs().max()) > 0 and float(b.grad.abs().max()) > 0


def test_independent_q_k_v_adapters_export_as_one_rank_3r_wqkv_adapter():
    """Llama-named q/k/v adapters (three A's) have no rank-r wqkv equivalent: the export stacks them,
    exactly: the wqkv update B @ A (times its scaling) is the grouped merge of the three updates."""
    from evotune.checkpoint.adapter import to_internlm2
    from evotune.checkpoint.internlm2 import merge_wqkv

    gen = torch.Generator().manual_seed(0)
    rows = {"q_proj": 64, "k_proj": 16, "v_proj": 16}
    modules = {f"model.layers.0.self_attn.{n}": (torch.randn(4, 64, generator=gen), torch.randn(r, 4, generator=gen))
               for n, r in rows.items()}
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"], "alpha_pattern":
              {}, "rank_pattern": {}}
    out, cfg = to_internlm2(modules, config, heads=8, kv_heads=2)
    a, b = out["model.layers.0.attention.wqkv"]
    assert a.shape == (12, 64) and b.shape == (96, 12)
    assert cfg["rank_pattern"] == {"attention.wqkv": 12} and cfg["alpha_pattern"] == {"attention.wqkv": 24}
    want = merge_wqkv(*(b_ @ a_ * 2 for a_, b_ in modules.values()), 8, 2)
    torch.testing.assert_close(b @ a * (24 / 12), want, rtol=1e-6, atol=1e-5)
    # one shared A (evotune's InternLM2 adapter) stays rank r
    shared = {name: (modules["model.layers.0.self_attn.q_proj"][0], pair[1]) for name, pair in modules.items()}
    out, cfg = to_internlm2(shared, config, heads=8, kv_heads=2)
    a, b = out["model.layers.0.attention.wqkv"]
    assert a.shape == (4, 64) and b.shape == (96, 4) and cfg["rank_pattern"] == {}
    torch.testing.assert_close(b @ a * 2, merge_wqkv(*(b_ @ a_ * 2 for a_, b_ in shared.values()), 8, 2),
                               rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- QLoRA

QLORA_LLM = (", quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, load_in_8bit=False, "
             "llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False, bnb_4bit_compute_dtype=torch.float32, "
             "bnb_4bit_use_double_quant=True, bnb_4bit_quant_type='nf4')")


def test_qlora_nf4_on_cpu_trains_and_its_loss_falls(tmp_path, tiny_llama_dir, capsys):
    pytest.importorskip("bitsandbytes")
    # a few packs seen many times: the loss of a rank-4 adapter on a near-uniform tiny model falls clearly
    # there, while on small_folder's 45 fresh packs 40 steps move it by about its step-to-step noise
    few = write_folder(tmp_path / "few", {"en/a.bin": random_documents(np.random.RandomState(0), 8)})
    cfg = lora_config_file(tmp_path, tiny_llama_dir, few, llm_extra=QLORA_LLM, steps=40, lr=3e-2)
    Path(cfg).write_text(Path(cfg).read_text() + "save_merged = True\n")
    work = tmp_path / "work"
    assert cli_main(["train", cfg, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters 8,192" in out
    rows = _metrics(work)
    assert np.mean([r["loss"] for r in rows[-3:]]) < rows[0]["loss"] - 0.05
    modules, config = read_adapter(work / "hf_adapter")
    assert len(modules) == 14 and config["r"] == 4
    # save_merged: the adapter merged into the unquantised base read from the model path (as convert merge)
    _assert_same_folder(work / "hf", merge(tiny_llama_dir, str(work / "hf_adapter"), tmp_path / "merged"))
    base = load_file(Path(tiny_llama_dir) / "model.safetensors")
    hf = load_file(work / "hf" / "model.safetensors")
    assert hf.keys() == base.keys() and all(t.dtype == torch.float32 for t in hf.values())
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_qlora_without_bitsandbytes_names_the_install_command(monkeypatch, tiny_llama_dir):
    import importlib.util

    from evotune.errors import EvotuneError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))
    with pytest.raises(EvotuneError, match=r"needs bitsandbytes: pip install 'evotune\[qlora\]'"):
        load_model(tiny_llama_dir, quantization_config=dict(load_in_4bit=True))


# ---------------------------------------------------------------- sharding and resume


def _adapter(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "hf_adapter" / "adapter_model.safetensors")


def _train_cli(cfg: str, work: Path, *args: str, nproc: int = 1):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    out = subprocess.run([sys.executable, "-m", "evotune.cli", "train", cfg, "--work-dir", str(work), "--device",
                          "cpu", *args], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, tiny_llama_dir, small_folder) -> tuple[Path, str]:
    """(work dir, config) of an uninterrupted 4-step LoRA run on one process, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("lora_one")
    one = lora_config_file(tmp, tiny_llama_dir, small_folder, steps=4, lr=3e-2, accum=2)
    Path(one).write_text(Path(one).read_text() + "save_steps = 2\n")
    _train_cli(one, tmp / "one")
    return tmp / "one", one


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, one_rank_run):
    tmp = tmp_path_factory.mktemp("lora_sharded")
    runs, one = {"one": one_rank_run[0]}, one_rank_run[1]
    two = tmp / "cfg2.py"
    two.write_text(Path(one).read_text().replace("accumulative_counts = 2", "accumulative_counts = 1"))
    for preset in ("deepspeed_zero2", "deepspeed_zero3"):
        runs[preset] = tmp / preset
        _train_cli(str(two), runs[preset], "--deepspeed", preset, nproc=2)
    return runs, one, str(two)


def test_two_gloo_ranks_zero2_zero3_equal_one_rank_with_twice_the_accumulation(sharded_runs):
    runs, _, _ = sharded_runs
    ref_rows, ref = _metrics(runs["one"]), _adapter(runs["one"])
    for preset in ("deepspeed_zero2", "deepspeed_zero3"):
        rows = _metrics(runs[preset])
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        for a, b in zip(ref_rows, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
        got = _adapter(runs[preset])
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
        step = dcp.list_checkpoints(dcp.checkpoints_dir(str(runs[preset])))[-1][1]
        assert all("lora_" in k for k in dcp.read_model_state(step))  # the sharded base is not saved


def _stopped_after_step_2(src: Path, dst: Path) -> Path:
    """A copy of a 4-step work dir as a run killed after checkpoint 2 leaves it."""
    import shutil

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "hf_adapter")
    shutil.rmtree(dst / "checkpoints" / "step_4")
    return dst


def test_resume_is_bitwise_and_moves_to_another_world_size(sharded_runs, tmp_path):
    runs, one, _ = sharded_runs
    # a run stopped (killed) after checkpoint 2: its later checkpoints and exports do not exist
    work = _stopped_after_step_2(runs["one"], tmp_path / "resumed")
    _train_cli(one, work, "--resume", "auto")
    a, b = _adapter(work), _adapter(runs["one"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in _metrics(work)] == [(r["step"], r["loss"]) for r in _metrics(runs["one"])]
    # the 2-rank ZeRO-3 checkpoint of step 2 continues on one process with accumulation 2
    moved = _stopped_after_step_2(runs["deepspeed_zero3"], tmp_path / "moved")
    _train_cli(one, moved, "--resume", "auto")
    got, ref = _adapter(moved), _adapter(runs["one"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_sigkill_mid_step_then_resume_auto_is_bitwise(one_rank_run, tmp_path):
    """A LoRA run killed with SIGKILL in step 3 (backward done, optimizer not stepped; tests/test_faults.py's
    forked runner) continues with --resume auto from checkpoint 2 to the uninterrupted run's adapter and losses."""
    from tests.test_faults import Zygote

    reference, cfg = one_rank_run
    work = tmp_path / "killed"
    argv = ["train", cfg, "--work-dir", str(work), "--device", "cpu"]
    zygote = Zygote(tmp_path)
    try:
        result, log = zygote.run(argv, "step", 3)
        assert result["killed"], log[-3000:]
        assert [r["step"] for r in _metrics(work)] == [1, 2] and not (work / "hf_adapter").exists()
        result, log = zygote.run([*argv, "--resume", "auto"])
        assert result["code"] == 0, log[-3000:]
    finally:
        zygote.close()
    assert f"evotune: resumed from {work / 'checkpoints' / 'step_2'} " in log
    a, b = _adapter(work), _adapter(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in _metrics(work)] == [(r["step"], r["loss"]) for r in _metrics(reference)]
