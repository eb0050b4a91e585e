"""``evotune convert``: the command line, its errors, and pth_to_hf on DCP training checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evotune.convert import parse_size, pth_to_hf
from evotune.cli import main
from evotune.errors import EvotuneError
from evotune.model.load import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONF = SHARED / "conformance" / "internlm2"
TINY = CONF / "tiny_internlm2"
needs_shared = pytest.mark.skipif(not TINY.is_dir(), reason="../shared conformance data not present")


def test_parse_size():
    assert parse_size("5GB") == 5 * 1024**3
    assert parse_size("500MB") == 500 * 1024**2
    assert parse_size("1024") == 1024
    with pytest.raises(EvotuneError, match="5GB or 500MB"):
        parse_size("lots")


@needs_shared
def test_cli_round_trip_and_options(tmp_path, capsys):
    ie, hf, native = tmp_path / "ie", tmp_path / "hf", tmp_path / "native"
    assert main(["convert", "hf2internevo", str(TINY), str(ie), "--tp", "2", "--pp", "3"]) == 0
    assert main(["convert", "internevo2hf", str(ie), str(hf), "--tokenizer", str(TINY),
                 "--max-position-embeddings", "512"]) == 0
    want = json.loads((TINY / "config.json").read_text())
    del want["transformers_version"]  # the one field InternEvo's model_config.pt cannot give back
    assert json.loads((hf / "config.json").read_text()) == want
    a, b = load_file(hf / "model.safetensors"), load_file(TINY / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert main(["convert", "internevo2hf", str(ie), str(native), "--save-format", "huggingface",
                 "--dtype", "bfloat16", "--rope-scaling", "dynamic", "--rope-scaling-factor", "2"]) == 0
    cfg = json.loads((native / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["dtype"] == "bfloat16"
    assert cfg["rope_parameters"]["rope_type"] == "dynamic" and cfg["rope_parameters"]["factor"] == 2.0
    assert load_model(native).dtype == torch.bfloat16
    assert "wrote" in capsys.readouterr().out


@needs_shared
@pytest.mark.parametrize("argv, message", [
    (["internevo2hf", str(CONF / "internevo_ckpt_bad"), "{out}"], "model_tp1_pp1.pt is missing"),
    (["hf2internevo", str(TINY), "{out}", "--tp", "4", "--pp", "1"], "--tp 4 does not divide num_key_value_heads"),
    (["internevo2hf", str(CONF / "internevo_ckpt_tp1pp1"), "{out}", "--rope-scaling", "dynamic"],
     "--rope-scaling needs --rope-scaling-factor"),
    (["internevo2hf", str(TINY / "config.json"), "{out}"], "is not a directory"),
    (["pth_to_hf", str(TINY), "{out}"], "is not an evotune training checkpoint"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    out = str(tmp_path / "out")
    code = main(["convert", *[a.replace("{out}", out) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not Path(out).exists()


def _save_dcp(step_dir: Path, state: dict, model=None) -> None:
    """The layout evotune.checkpoint.dcp writes: DCP {"model": llm.* weights, "optimizer": ...},
    hf_config.json, trainer_state.json with the model source."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {f"llm.{k}": v for k, v in state.items()}, "optimizer": {"step": torch.tensor(3)}},
             checkpoint_id=str(step_dir))
    if model is not None:
        model.config.to_json_file(step_dir / "hf_config.json")
        (step_dir / "trainer_state.json").write_text(json.dumps({"step": 3, "model_source": model.evotune_source.to_json()}))


@needs_shared
def test_pth_to_hf_exports_the_newest_step_in_the_source_layout(tmp_path):
    model = load_model(TINY)
    work = tmp_path / "work"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _save_dcp(work / "checkpoints" / "step_2", {k: torch.zeros_like(v) for k, v in state.items()}, model)
    _save_dcp(work / "checkpoints" / "step_10", state, model)
    out = pth_to_hf(work, tmp_path / "hf")
    a, b = load_file(out / "model.safetensors"), load_file(TINY / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((out / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    assert (out / "tokenizer.model").is_file()
    assert main(["convert", "pth_to_hf", str(work / "checkpoints" / "step_2"), str(tmp_path / "hf2"),
                 "--save-format", "huggingface"]) == 0
    zero = load_model(tmp_path / "hf2")
    assert type(zero).__name__ == "LlamaForCausalLM"
    assert all(float(v.abs().sum()) == 0 for v in zero.state_dict().values())


def test_pth_to_hf_with_model_flag_for_plain_hf(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    ref.save_pretrained(tmp_path / "base")
    _save_dcp(tmp_path / "step_5", ref.state_dict())
    with pytest.raises(EvotuneError, match="pass --model"):
        pth_to_hf(tmp_path / "step_5", tmp_path / "hf")
    out = pth_to_hf(tmp_path / "step_5", tmp_path / "hf", model_path=tmp_path / "base")
    again = load_model(out)
    assert type(again).__name__ == "Qwen2ForCausalLM"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref.state_dict().items())
