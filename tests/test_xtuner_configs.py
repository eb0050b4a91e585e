"""XTuner 0.2 configs run unchanged (issue 14, part 1): imports, keys that act, keys that are refused.

The configs under tests/xtuner_configs/ are XTuner v0.2.0's own files, copied
unchanged; the runs change only paths, lengths and intervals with --cfg-options.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evotune import xtuner_compat as xt
from evotune.checkpoint import dcp
from evotune.cli import main as cli_main
from evotune.config import load_config
from evotune.errors import EvotuneError
from evotune.model.load import load_model
from evotune.settings import SECTIONS, load_settings
from test_distributed import read_metrics
from test_hub import make_hub_cache
from test_model_internlm2 import make_internlm2

CONFIGS = Path(__file__).parent / "xtuner_configs"

# an XTuner-shaped config on an InternEvo folder: the imports and runtime part of XTuner's configs
HEADER = """\
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from torch.optim import AdamW
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.intern_repo import build_packed_dataset, load_intern_repo_tokenized_dataset
from xtuner.dataset.samplers import InternRepoSampler
from xtuner.engine import DatasetInfoHook, EvaluateChatHook, ThroughputHook, VarlenAttnArgsToMessageHubHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune

pretrained_model_name_or_path = {model!r}
dataset_folder = {folder!r}
accumulative_counts = 2
save_steps = 4
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=pretrained_model_name_or_path,
                 trust_remote_code=True, padding_side='right')
model = dict(type=SupervisedFinetune, use_varlen_attn=True,
             llm=dict(type=AutoModelForCausalLM.from_pretrained,
                      pretrained_model_name_or_path=pretrained_model_name_or_path, trust_remote_code=True))
train_dataset = dict(type=build_packed_dataset,
                     dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=dataset_folder, min_length=0,
                                      file_type='.bin'),
                     packed_length=64, seed=1024)
train_dataloader = dict(batch_size=1, num_workers=0, dataset=train_dataset,
                        sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
                        batch_sampler=dict(type=BatchSampler, drop_last=True, batch_size=1),
                        collate_fn=dict(type=default_collate_fn, use_varlen_attn=True))
optim_wrapper = dict(type=AmpOptimWrapper, optimizer=dict(type=AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0),
                     clip_grad=dict(max_norm=1, error_if_nonfinite=False), accumulative_counts=accumulative_counts,
                     loss_scale='dynamic')
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=0.5,
                        convert_to_iter_based=True),
                   dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=0.5, end=1,
                        convert_to_iter_based=True)]
train_cfg = dict(type=TrainLoop, max_iters=8)
custom_hooks = [dict(type=DatasetInfoHook, tokenizer=tokenizer, is_intern_repo_dataset=True),
                dict(type=ThroughputHook), dict(type=VarlenAttnArgsToMessageHubHook)]
default_hooks = dict(timer=dict(type=IterTimerHook),
                     logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=2),
                     param_scheduler=dict(type=ParamSchedulerHook),
                     checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=1),
                     sampler_seed=dict(type=DistSamplerSeedHook))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False, window_size=1, mean_pattern=r'.*(loss|time|data_time|grad_norm|tflops).*')
"""


def _write(tmp_path, text: str, name: str = "cfg.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def xtuner_cfg(tmp_path, tiny_llama_dir, small_folder):
    def write(extra: str = "", **replace) -> str:
        text = HEADER.format(model=tiny_llama_dir, folder=small_folder)
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        return _write(tmp_path, text + textwrap.dedent(extra))
    return write


# --------------------------------------------------------------------------- the imports


def test_imports_resolve_only_while_the_config_runs(xtuner_cfg):
    before = set(sys.modules)
    import builtins
    real_import = builtins.__import__
    cfg = load_config(xtuner_cfg())
    assert builtins.__import__ is real_import
    assert not [m for m in set(sys.modules) - before if m.split(".")[0] in ("mmengine", "xtuner")]
    assert not [m for m in sys.modules if m.split(".")[0] in ("mmengine", "xtuner")]
    with pytest.raises(ImportError):
        __import__("mmengine.hooks")
    # the config got evotune's names; the real transformers and torch are untouched
    assert cfg["default_hooks"]["checkpoint"]["type"] is xt.CheckpointHook
    assert cfg["optim_wrapper"]["type"] is xt.AmpOptimWrapper
    assert cfg["model"]["llm"]["type"] is xt.AutoModelForCausalLM.from_pretrained
    import torch.utils.data
    import transformers
    assert transformers.AutoModelForCausalLM is not xt.AutoModelForCausalLM
    assert torch.utils.data.BatchSampler is not xt.BatchSampler


def test_a_name_evotune_does_not_provide_is_one_line_naming_it_and_what_to_use(tmp_path):
    path = _write(tmp_path, "from xtuner.model import LLaVAModel\n")
    with pytest.raises(EvotuneError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: `xtuner.model.LLaVAModel` is an XTuner/mmengine name that evotune does not "
                            "provide; evotune trains causal language models only (no LLaVA)")
    path = _write(tmp_path, "from mmengine.hooks import EMAHook\n")
    with pytest.raises(EvotuneError, match=r"`mmengine.hooks.EMAHook` .* does not provide; from mmengine.hooks "
                                           r"evotune provides CheckpointHook, DistSamplerSeedHook, IterTimerHook"):
        load_config(path)
    path = _write(tmp_path, "import xtuner.tools.train\n")
    with pytest.raises(EvotuneError, match="evotune provides no module xtuner.tools.train"):
        load_config(path)
    assert cli_main(["train", path]) == 2


def test_module_style_imports_resolve_too(tmp_path):
    cfg = load_config(_write(tmp_path, """
        import mmengine.hooks
        import xtuner.engine.hooks as hooks
        from xtuner.utils import IGNORE_INDEX
        model = dict(type=mmengine.hooks.CheckpointHook)
        tokenizer = dict(type=hooks.EvaluateChatHook)
        max_length = IGNORE_INDEX
    """))
    assert cfg["model"]["type"] is xt.CheckpointHook and cfg["tokenizer"]["type"] is xt.EvaluateChatHook
    assert cfg["max_length"] == -100


# --------------------------------------------------------------------------- keys that act


def test_xtuner_keys_reach_the_settings(xtuner_cfg, tiny_llama_dir):
    s = load_settings(xtuner_cfg())
    assert s.optim.accumulative_counts == 2 and s.data.batch_size == 1
    # XTuner counts iterations (micro-batches): 8 iterations / 2 per step = 4 steps; every 4 -> every 2 steps
    assert s.schedule.max_steps == 4 and s.checkpoint.interval == 2 and s.logging.interval == 1
    assert s.sources["checkpoint.interval"] == "cfg.py: default_hooks.checkpoint.interval (4 iterations of 2 " \
                                               "micro-batches per step)"
    assert s.checkpoint.keep == 1 and s.model.path == tiny_llama_dir
    assert s.data.dataset_info is xt.DatasetInfoHook and s.data.dataset["type"].__name__ == "build_packed_dataset"
    assert s.optim.loss_scale["dynamic"] is True and s.runtime.resume is None and s.runtime.dist_backend == "nccl"
    assert s.sources["data.dataset"] == "cfg.py: train_dataset"


def test_evaluate_chat_hook_gives_the_samples_their_settings(xtuner_cfg):
    s = load_settings(xtuner_cfg("""
        custom_hooks += [dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=6,
                              evaluation_inputs=['a', 'b'], system='be brief', max_new_tokens=5)]
    """))
    assert (s.eval.inputs, s.eval.freq, s.eval.system, s.eval.max_new_tokens) == (("a", "b"), 3, "be brief", 5)
    assert s.sources["eval.inputs"] == "cfg.py: custom_hooks.EvaluateChatHook.evaluation_inputs"


def test_resume_true_is_resume_auto_and_with_load_from_resumes_from_it(xtuner_cfg, tmp_path):
    assert load_settings(xtuner_cfg()).runtime.resume is None
    s = load_settings(xtuner_cfg("resume = True\n"))
    assert s.runtime.resume == "auto"
    s = load_settings(xtuner_cfg(f"resume = True\nload_from = {str(tmp_path)!r}\n"))
    assert (s.runtime.resume, s.runtime.load_from) == (str(tmp_path), None)
    s = load_settings(xtuner_cfg(f"load_from = {str(tmp_path)!r}\n"))
    assert (s.runtime.resume, s.runtime.load_from) == (None, str(tmp_path))


# --------------------------------------------------------------------------- keys that are refused


@pytest.mark.parametrize("old, new, message", [
    ("by_epoch=False, interval=save_steps", "by_epoch=True, interval=save_steps",
     r"default_hooks.checkpoint.by_epoch=True \(cfg.py: default_hooks\): evotune saves every `interval` iterations"),
    ("error_if_nonfinite=False", "error_if_nonfinite=True",
     r"optim_wrapper.clip_grad.error_if_nonfinite=True: a step with a NaN/inf gradient norm is skipped"),
    ("log_level = 'INFO'", "log_level = 'WARNING'", r"log_level='WARNING': evotune prints progress at INFO"),
    ("window_size=1", "window_size=10", r"log_processor.window_size=10: evotune logs each step's own values"),
    ("backend='nccl'", "backend='mpi'", r"env_cfg.dist_cfg.backend='mpi': evotune uses nccl on CUDA and gloo"),
    ("deterministic=False", "deterministic=False, diff_rank_seed=True", r"randomness.diff_rank_seed=True"),
    ("dict(type=ThroughputHook)", "dict(type=ThroughputHook, hidden_size=4096)",
     r"custom_hooks\[1\].hidden_size=4096 \(cfg.py: custom_hooks\): evotune computes mfu from the model"),
    ("convert_to_iter_based=True),\n                   dict(type=Cos", "convert_to_iter_based=False),\n"
     "                   dict(type=Cos", r"param_scheduler\[0\]: by_epoch=True with convert_to_iter_based=False"),
    ("drop_last=True", "drop_last=False", r"train_dataloader.batch_sampler.drop_last=False"),
    ("trust_remote_code=True))", "trust_remote_code=True, attn_implementation='eager'))",
     r"model.llm.attn_implementation='eager' \(cfg.py: model\): evotune's varlen attention replaces"),
    ("loss_scale='dynamic'", "loss_scale='static'", r"optim_wrapper.loss_scale: expected 'dynamic', a number"),
    ("loss_scale='dynamic'", "loss_scale='dynamic', use_fsdp=True", r"'use_fsdp' is not a parameter of AmpOptim"),
    ("batch_size=1, num_workers=0", "batch_size=2, num_workers=0",
     r"train_dataloader.batch_size=2 .* but train_dataloader.batch_sampler.batch_size=1"),
    ("collate_fn=dict(type=default_collate_fn, use_varlen_attn=True)",
     "collate_fn=dict(type=default_collate_fn, use_varlen_attn=False)",
     r"train_dataloader.collate_fn.use_varlen_attn=False .* but model.use_varlen_attn=True"),
])
def test_a_key_evotune_cannot_honour_is_refused_with_the_reason(xtuner_cfg, old, new, message):
    with pytest.raises(EvotuneError, match=message) as e:
        load_settings(xtuner_cfg(**{old: new}))
    assert "\n" not in str(e.value)


def test_an_unknown_hook_is_refused_with_the_list_of_known_hooks(xtuner_cfg):
    path = xtuner_cfg("""
        class MyHook:
            pass
        custom_hooks.append(dict(type=MyHook))
    """)
    with pytest.raises(EvotuneError) as e:
        load_settings(path)
    assert str(e.value) == ("custom_hooks[3] (cfg.py: custom_hooks): unknown hook MyHook; evotune knows "
                            + ", ".join(xt.HOOKS))
    with pytest.raises(EvotuneError, match=r"default_hooks.timer \(cfg.py: default_hooks.timer\): CheckpointHook "
                                           "is not where IterTimerHook goes"):
        load_settings(_swap_timer(path))


def _swap_timer(path: str) -> str:
    text = Path(path).read_text().replace("class MyHook", "class _MyHook").replace("dict(type=MyHook)",
                                                                                    "dict(type=ThroughputHook)")
    text = text.replace("timer=dict(type=IterTimerHook)", "timer=dict(type=CheckpointHook, by_epoch=False)")
    Path(path).write_text(text)
    return path


def test_every_marker_parameter_is_read_by_a_setting_or_fixed():
    """No parameter of an XTuner name is accepted and ignored: a settings place reads it, or its values
    are fixed (checked), or the hook it belongs to needs no setting."""
    places = {p for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values() for p in f.metadata["places"]}
    where = {"CheckpointHook": "default_hooks.checkpoint", "LoggerHook": "default_hooks.logger",
             "EvaluateChatHook": "custom_hooks.EvaluateChatHook", "DatasetInfoHook": "custom_hooks.DatasetInfoHook",
             "AmpOptimWrapper": "optim_wrapper", "OptimWrapper": "optim_wrapper", "TrainLoop": "train_cfg",
             "BatchSampler": "train_dataloader.batch_sampler", "default_collate_fn": "train_dataloader.collate_fn"}
    markers = [v for v in vars(xt).values() if isinstance(v, type) and issubclass(v, xt.Marker) and v is not xt.Marker]
    assert len(markers) == 18
    for m in markers:
        for p in inspect.signature(m).parameters:
            read = any(q == f"{where.get(m.__name__)}.{p}" or q.startswith(f"{where.get(m.__name__)}.{p}.")
                       for q in places)
            assert p in m.fixed or read or (m.__name__, p) == ("Visualizer", "vis_backends"), (m.__name__, p)


# --------------------------------------------------------------------------- XTuner's own configs train

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "internlm2.model"
HUB_IDS = ("internlm/internlm2-7b", "internlm/internlm2-chat-7b", "internlm/internlm2-chat-1_8b")
CHAT_TOKENS = {92538: "<|plugin|>", 92539: "<|interpreter|>", 92540: "<|action_end|>", 92541: "<|action_start|>",
               92542: "<|im_end|>", 92543: "<|im_start|>"}
REPO = Path(__file__).resolve().parents[1]


def _tiny_internlm2_with_tokenizer(path: Path) -> Path:
    """A random InternLM2 (hidden 32, 2 layers) with the real InternLM2 tokenizer, as the hub ships chat models."""
    make_internlm2(path, vocab_size=92544, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                   pad_token_id=2)
    shutil.copyfile(SHARED_TOKENIZER, path / "tokenizer.model")
    special = {1: "<s>", 2: "</s>", 0: "<unk>", **CHAT_TOKENS}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, c in special.items()},
        "additional_special_tokens": list(CHAT_TOKENS.values()), "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}))
    return path


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME with the tiny InternLM2 cached under the hub ids XTuner's configs name."""
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"{SHARED_TOKENIZER} is not available")
    model = _tiny_internlm2_with_tokenizer(tmp_path_factory.mktemp("tiny") / "internlm2")
    home = tmp_path_factory.mktemp("hf_home")
    for repo in HUB_IDS:
        make_hub_cache(home / "hub", repo, model)
    return home


@pytest.fixture
def offline(hub_home, monkeypatch) -> dict:
    env = {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return env


def _sentences(n: int, seed: int) -> list[str]:
    words = ("alpha beta gamma delta river stone cloud light quick brown fox jumps over lazy dog "
             "上海 景点 你好 世界").split()
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(words, size=rng.randint(6, 20))) for _ in range(n)]


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, str]:
    """One small data set in each format XTuner's configs read."""
    root = tmp_path_factory.mktemp("xtuner_data")
    q, a = _sentences(80, 1), _sentences(80, 2)
    conversation = root / "conversation.json"  # the custom-dataset configs' format
    conversation.write_text(json.dumps([{"conversation": [{"system": "", "input": x, "output": y}]}
                                        for x, y in zip(q, a)], ensure_ascii=False))
    untokenized = root / "untokenized"  # load_intern_repo_untokenized_dataset: one JSON list of messages a line
    untokenized.mkdir()
    (untokenized / "part.json").write_text("\n".join(json.dumps(
        [{"role": "user", "content": x}, {"role": "assistant", "content": y}], ensure_ascii=False)
        for x, y in zip(q, a)) + "\n")
    alpaca = root / "alpaca"  # a local dataset folder instead of tatsu-lab/alpaca
    alpaca.mkdir()
    (alpaca / "train.json").write_text(json.dumps([{"instruction": x, "input": "", "output": y}
                                                   for x, y in zip(q * 2, a * 2)], ensure_ascii=False))
    oasst1 = root / "oasst1"  # a local dataset folder instead of timdettmers/openassistant-guanaco
    oasst1.mkdir()
    (oasst1 / "train.json").write_text(json.dumps([{"text": f"### Human: {x}### Assistant: {y}" + (
        f"### Human: {y} {x}### Assistant: {x}" if i % 3 == 0 else "")} for i, (x, y) in enumerate(zip(q, a))],
        ensure_ascii=False))
    openai = root / "openai.json"  # the *_custom_sft_* configs' format (openai_map_fn), one answer not trained
    openai.write_text(json.dumps([{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": x},
        {"role": "assistant", "content": y, "loss": i % 4 != 0}]} for i, (x, y) in enumerate(zip(q, a))],
        ensure_ascii=False))
    return {"conversation": str(conversation), "untokenized": str(untokenized), "alpaca": str(alpaca),
            "oasst1": str(oasst1), "openai": str(openai)}


def _xtuner_options(name: str, small_folder: str, chat_data: dict) -> list[str]:
    """Only paths, lengths and intervals: the data, 128-token packs, 4-token answers, 6 iterations, saves
    and samples every 2 iterations (XTuner's iterations: micro-batches; the alpaca config has 16 a step, the
    QLoRA ones too: 64-token packs and 2 steps there)."""
    common = {"max_length": 128, "max_new_tokens": 4, "save_steps": 2, "evaluation_freq": 2,
              "dataloader_num_workers": 0, "train_cfg.max_iters": 6}
    sixteen = {"save_steps": 32, "evaluation_freq": 32, "train_cfg.max_iters": 48}  # 16 iterations a step
    qlora = {"max_length": 64, "save_steps": 16, "evaluation_freq": 32, "train_cfg.max_iters": 32}  # 2 steps of 16
    data = {"oasst1": {"data_path": chat_data["oasst1"], **qlora},
            "custom_sft": {"data_files": [chat_data["openai"]], **qlora},
            "internevo": {"dataset_folder": small_folder}, "untokenized": {"dataset_folder": chat_data["untokenized"]},
            "tokenized": {"dataset_folder": small_folder},
            "custom": {"data_files": [chat_data["conversation"]]},
            "alpaca": {"alpaca_en_path": chat_data["alpaca"], **sixteen}}
    kind = next(k for k in data if k in name)
    return [f"{k}={v!r}" for k, v in {**common, **data[kind]}.items()]


def _check_run(work: Path, settings, accumulation: int, hub_home: Path):
    """Trained, honoured the nested settings, wrote samples and an HF export that reloads."""
    from safetensors.torch import load_file

    records = read_metrics(work)
    steps = settings.schedule.max_steps
    assert steps == 6 // accumulation if accumulation < 16 else steps == 3  # train_cfg.max_iters, in iterations
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["tokens"] == (i + 1) * accumulation * 128 for i, r in enumerate(records))  # 1 pack per micro-batch
    # default_hooks.checkpoint: every interval (iterations -> steps), max_keep_ckpts = save_total_limit = 2
    every = settings.checkpoint.interval
    assert [s for s, _ in dcp.list_checkpoints(work / "checkpoints")] == sorted(
        {*range(every, steps + 1, every), steps})[-2:]
    samples = [json.loads(line) for line in (work / "eval_samples.jsonl").read_text().splitlines()]
    assert {s["input"] for s in samples} == set(settings.eval.inputs) == {
        "请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"}  # EvaluateChatHook's inputs
    assert sorted({s["step"] for s in samples}) == sorted({0, *range(settings.eval.freq, steps + 1,
                                                                       settings.eval.freq), steps})
    assert json.loads((work / "hf" / "config.json").read_text())["model_type"] == "internlm2"
    assert load_model(str(work / "hf")).config.vocab_size == 92544  # the export reloads
    start = load_file(next((hub_home / "hub").glob("models--internlm--internlm2-7b/snapshots/*/model.safetensors")))
    trained = load_file(work / "hf" / "model.safetensors")
    assert sorted(trained) == sorted(start) and not torch.equal(trained["output.weight"], start["output.weight"])
    return records


@pytest.mark.parametrize("config", [
    "internlm2_7b_w_internevo_dataset.py", "internlm2_7b_w_tokenized_dataset.py",
    "internlm2_7b_w_untokenized_dataset.py", "internlm2_7b_full_finetune_custom_dataset_e1.py",
    "internlm2_chat_7b_full_finetune_custom_dataset_e1.py", "internlm2_chat_1_8b_full_alpaca_e3.py"])
def test_an_xtuner_config_trains_unchanged(config, offline, hub_home, small_folder, chat_data, tmp_path, capsys):
    work = tmp_path / "work"
    opts = _xtuner_options(config, small_folder, chat_data)
    assert cli_main(["train", str(CONFIGS / config), "--work-dir", str(work), "--cfg-options", *opts]) == 0
    out = capsys.readouterr().out
    assert "trust_remote_code=True: evotune loads internlm/internlm2" in out and "never runs remote code" in out
    assert "the first pack, decoded" in out  # DatasetInfoHook
    settings = load_settings(str(CONFIGS / config), opts)
    records = _check_run(work, settings, settings.optim.accumulative_counts, hub_home)
    if "alpaca" in config:  # AmpOptimWrapper(dtype='float16', loss_scale='dynamic'): scaled, overflows skipped
        assert settings.optim.accumulative_counts == 16 and all("loss_scale" in r for r in records)
        assert records[0]["loss_scale"] == 2.0 ** 16
        assert [r["skipped_steps"] for r in records] == list(np.cumsum([r["overflow"] for r in records]))


def test_the_sequence_parallel_config_trains_on_two_ranks(offline, hub_home, chat_data, small_folder, tmp_path):
    """XTuner's *_sequence_parallel_4 config, with sequence_parallel_size=2 to fit two gloo ranks."""
    config = CONFIGS / "internlm2_7b_full_finetune_custom_dataset_e1_sequence_parallel_4.py"
    work = tmp_path / "work"
    opts = [*_xtuner_options("custom", small_folder, chat_data), "sequence_parallel_size=2"]
    env = {**os.environ, **offline, "NPROC_PER_NODE": "2"}
    proc = subprocess.run([sys.executable, "-m", "evotune.cli", "train", str(config), "--work-dir", str(work),
                           "--device", "cpu", "--deepspeed", "deepspeed_zero2", "--cfg-options", *opts],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu, FSDP2 zero2" in proc.stdout
    # one sequence-parallel group of 2: dp 1, so each step is accumulative_counts (1 * sp 2 = 2) packs
    _check_run(work, load_settings(str(config), opts), 2, hub_home)


# --------------------------------------------------------------------------- XTuner's commands


def test_xtuner_train_flags(xtuner_cfg, capsys, monkeypatch):
    from evotune.cli import build_parser

    path = xtuner_cfg()
    assert cli_main(["train", path, "--launcher", "mpi"]) == 2
    assert capsys.readouterr().err.strip() == (
        "evotune: error: --launcher mpi: evotune starts its processes with torchrun (NPROC_PER_NODE=N) or srun "
        "(--launcher slurm), or joins an external launcher's (--launcher pytorch)")
    argv = ["train", path, "--local_rank", "3", "--work-dir", "w", "--seed", "5", "--deepspeed", "deepspeed_zero2",
            "--resume", "auto", "--cfg-options", "max_length=32"]
    args = build_parser(argv).parse_args(argv)
    assert (args.local_rank, args.work_dir, args.seed, args.deepspeed, args.resume) == (3, "w", 5,
                                                                                          "deepspeed_zero2", "auto")


def test_pth_to_hf_in_xtuner_order(offline, small_folder, chat_data, tmp_path):
    """xtuner convert pth_to_hf CONFIG PTH SAVE_DIR: float16 by default, --fp32 keeps float32; the config's
    tokenizer (a hub id) is copied in."""
    from safetensors.torch import load_file

    config = str(CONFIGS / "internlm2_7b_w_internevo_dataset.py")
    work = tmp_path / "work"
    opts = _xtuner_options("internevo", small_folder, chat_data)
    assert cli_main(["train", config, "--work-dir", str(work), "--cfg-options", *opts, "max_epochs=0.25"]) == 0
    step = dcp.list_checkpoints(work / "checkpoints")[-1][1]
    assert cli_main(["convert", "pth_to_hf", config, step, str(tmp_path / "fp16"), "--cfg-options", *opts]) == 0
    assert cli_main(["convert", "pth_to_hf", config, step, str(tmp_path / "fp32"), "--fp32",
                     "--save-format", "xtuner"]) == 0
    trained = load_file(work / "hf" / "model.safetensors")
    half, full = (load_file(tmp_path / d / "model.safetensors") for d in ("fp16", "fp32"))
    assert sorted(half) == sorted(trained) == sorted(full)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], trained[k].half()) for k in trained)
    assert all(torch.equal(full[k], trained[k]) for k in trained)
    assert (tmp_path / "fp16" / "tokenizer.model").is_file()


def test_check_custom_dataset_and_log_dataset(offline, small_folder, chat_data, tmp_path, capsys):
    config = str(CONFIGS / "internlm2_7b_full_finetune_custom_dataset_e1.py")
    opts = _xtuner_options("custom", small_folder, chat_data)
    assert cli_main(["check-custom-dataset", config, "--cfg-options", *opts]) == 0
    out = capsys.readouterr().out
    assert "the data is valid" in out and "[[<s><|im_start|>user\n" in out and "<|im_end|>" in out
    assert cli_main(["log-dataset", config, "--show", "all", "--cfg-options", *opts]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("####")] == [
        "text", "masked_text", "input_ids", "labels"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversation": [{"input": "a", "output": "b"}]},
                               {"conversation": [{"input": "a"}]}]))
    opts = [o for o in opts if not o.startswith("data_files")] + [f"data_files={[str(bad)]!r}"]
    assert cli_main(["check-custom-dataset", config, "--cfg-options", *opts]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "conversation[0].output" in err


# --------------------------------------------------------------------------- runtime keys that act


def test_load_from_gives_the_initial_weights(tiny_llama_dir, small_folder, tmp_path):
    """load_from: a checkpoint's model weights, nothing else (lr 0: the export is exactly those weights)."""
    from test_distributed import read_hf_weights, run_single, tiny_options

    first = tmp_path / "first"
    run_single(tiny_options(tiny_llama_dir, small_folder, max_steps=2, save_steps=2), first)
    step = dcp.list_checkpoints(first / "checkpoints")[-1][1]
    second = tmp_path / "second"
    summary = run_single([*tiny_options(tiny_llama_dir, small_folder, max_steps=2, lr=0.0), f"load_from={step!r}"],
                         second)
    assert summary["steps"] == 2  # the step count starts fresh
    got, want = read_hf_weights(second), dcp.read_model_state(step)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in got)
    assert not all(torch.equal(got[k], v) for k, v in load_model(tiny_llama_dir).state_dict().items() if k in got)
    with pytest.raises(EvotuneError, match=f"load_from {tmp_path}: not an evotune checkpoint"):
        run_single([*tiny_options(tiny_llama_dir, small_folder, max_steps=1), f"load_from={str(tmp_path)!r}"],
                   tmp_path / "third")


def test_deterministic_and_cudnn_benchmark_act():
    from types import SimpleNamespace

    from evotune.train.loop import set_determinism

    try:
        set_determinism(SimpleNamespace(deterministic=True, cudnn_benchmark=True))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = False


def test_an_mmengine_visualizer_becomes_tensorboard(xtuner_cfg, tmp_path):
    head = "from mmengine.visualization import Visualizer, LocalVisBackend, TensorboardVisBackend\n"
    s = load_settings(xtuner_cfg("visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend), "
                                 "dict(type=TensorboardVisBackend)])\n", **{"from mmengine.hooks": head +
                                                                            "from mmengine.hooks"}))
    assert s.logging.visualizer == "tensorboard"
    s = load_settings(xtuner_cfg("visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])\n",
                                 **{"from mmengine.hooks": head + "from mmengine.hooks"}))
    assert s.logging.visualizer is None
    with pytest.raises(EvotuneError, match="WandbVisBackend` is an XTuner/mmengine name that evotune does not "
                                           "provide; use TensorboardVisBackend"):
        load_config(_write(tmp_path, "from mmengine.visualization import WandbVisBackend\n"))


QLORA_CONFIGS = ["internlm2_chat_7b_qlora_oasst1_e3.py", "internlm2_chat_7b_qlora_custom_sft_e1.py"]


@pytest.mark.parametrize("config", QLORA_CONFIGS)
def test_an_xtuner_qlora_config_trains_unchanged(config, offline, hub_home, small_folder, chat_data, tmp_path,
                                                 capsys):
    """XTuner's QLoRA configs: NF4 base (bitsandbytes on the CPU), LoRA r=64 on every decoder linear, float16
    compute with dynamic loss scaling, 16 iterations a step; only the adapter trains and is saved."""
    from safetensors.torch import load_file

    work = tmp_path / "work"
    opts = _xtuner_options(config, small_folder, chat_data)
    assert cli_main(["train", str(CONFIGS / config), "--work-dir", str(work), "--cfg-options", *opts]) == 0
    out = capsys.readouterr().out
    assert "trust_remote_code=True: evotune loads internlm/internlm2-chat-7b" in out
    assert ("LoRA r=64 alpha=16 dropout=0.1 on all linear layers of the decoder (no target_modules given): "
            "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj") in out
    # XTuner's adapter on the fused wqkv: q, k and v share one A (r x hidden); their B's are wqkv's rows
    assert "q_proj, k_proj and v_proj share one lora_A in each of 2 layers, one rank-64 adapter on wqkv" in out
    # trainable: r * (in + out) for each adapted linear of the tiny InternLM2 (hidden 32, kv rows 16, mlp 48),
    # less k's and v's A (q's, shared)
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48), (32, 48), (48, 32)]  # q k v o gate up down
    assert f"trainable parameters {2 * (sum(64 * (i + o) for i, o in shapes) - 2 * 64 * 32):,} (" in out
    assert "compute float16, trained weights float32, frozen 4-bit + float32" in out
    assert "the first pack, decoded" in out  # DatasetInfoHook
    first_pack = out.split("the first pack, decoded")[1]
    if "oasst1" in config:  # oasst1_map_fn: '### Human: ... ### Assistant: ...' text -> turns, prefixes gone
        assert "<|im_start|>user\n" in first_pack and "###" not in first_pack and "Human:" not in first_pack
    else:  # openai_map_fn: the records' system message, in the internlm2_chat template
        assert "<|im_start|>system\nbe brief<|im_end|>" in first_pack
    settings = load_settings(str(CONFIGS / config), opts)
    assert (settings.optim.accumulative_counts, settings.optim.dtype, settings.optim.lr) == (16, "float16", 2e-4)
    records = read_metrics(work)
    assert [r["step"] for r in records] == [1, 2] and all(r["tokens"] == (i + 1) * 16 * 64
                                                        for i, r in enumerate(records))
    assert records[0]["loss_scale"] == 2.0 ** 16 and all(np.isfinite(r["loss"]) for r in records)
    assert not any(r["skipped"] for r in records)  # both steps applied
    # default_hooks.checkpoint: every 16 iterations = 1 step, max_keep_ckpts 2; a checkpoint is the adapter only
    checkpoints = dcp.list_checkpoints(work / "checkpoints")
    assert [s for s, _ in checkpoints] == [1, 2]
    state = dcp.read_model_state(checkpoints[-1][1])
    assert len(state) == 28 and all(".lora_A." in k or ".lora_B." in k for k in state)
    samples = [json.loads(line) for line in (work / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 2] and len(samples) == 4  # samples on the 4-bit model
    # work_dir/hf_adapter: a PEFT adapter in InternLM2 names (wqkv, wo, w1, w2, w3 in both layers), no hf/
    adapter = work / "hf_adapter"
    assert not (work / "hf").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["peft_type"], cfg["task_type"]) == (
        64, 16, 0.1, "LORA", "CAUSAL_LM")
    assert sorted(cfg["target_modules"]) == ["w1", "w2", "w3", "wo", "wqkv"]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * 5 * 2 and all(".attention." in k or ".feed_forward." in k for k in weights)
    assert weights["base_model.model.model.layers.0.attention.wqkv.lora_A.weight"].shape == (64, 32)  # rank r
    assert weights["base_model.model.model.layers.0.attention.wqkv.lora_B.weight"].shape == (32 + 2 * 16, 64)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 10 and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: every one trained


@pytest.mark.parametrize("old, new, message", [
    ('bnb_4bit_quant_type="nf4"', 'bnb_4bit_quant_typ="nf4"',
     r"^model.llm.quantization_config: 'bnb_4bit_quant_typ' is not a parameter of BitsAndBytesConfig; did you mean "
     r"'bnb_4bit_quant_type'\?$"),
    ("llm_int8_threshold=6.0", "llm_int8_threshold=4.0",
     r"^model.llm.quantization_config.llm_int8_threshold=4.0 \(internlm2_chat_7b_qlora_oasst1_e3.py: model\): an "
     r"LLM.int8\(\) \(8-bit\) setting, which does nothing to the 4-bit layers evotune trains; remove it$"),
    ("llm_int8_has_fp16_weight=False", "llm_int8_has_fp16_weight=True",
     r"llm_int8_has_fp16_weight=True .*: an LLM.int8\(\) \(8-bit\) setting"),
    ("lora_dropout=0.1,", "lora_dropout=0.1, lora_alpah=8,",
     r"^model.lora: 'lora_alpah' is not a parameter of LoraConfig; did you mean 'lora_alpha'\?$"),
])
def test_a_qlora_key_evotune_cannot_honour_is_refused_at_load(tmp_path, old, new, message):
    text = (CONFIGS / QLORA_CONFIGS[0]).read_text()
    assert text.count(old) == 1
    path = tmp_path / QLORA_CONFIGS[0]
    path.write_text(text.replace(old, new))
    with pytest.raises(EvotuneError, match=message):
        load_settings(str(path), [f"data_path={str(tmp_path)!r}"])


def test_bits_and_bytes_config_in_a_config_is_transformers_own_with_its_named_parameters():
    from transformers import BitsAndBytesConfig

    real = {k: p.default for k, p in inspect.signature(BitsAndBytesConfig.__init__).parameters.items()
            if k != "self" and p.kind != p.VAR_KEYWORD}
    assert {k: p.default for k, p in inspect.signature(xt.BitsAndBytesConfig).parameters.items()} == real
    cfg = load_config(str(CONFIGS / QLORA_CONFIGS[0]))["model"]["llm"]["quantization_config"]
    assert cfg["type"] is xt.BitsAndBytesConfig
    built = cfg["type"](**{k: v for k, v in cfg.items() if k != "type"})
    assert type(built) is BitsAndBytesConfig and built.to_dict() == BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4").to_dict()


def test_samples_on_a_4bit_model_leave_its_training_gradients_exact(tiny_llama_dir):
    """EvaluateChatHook samples the 4-bit model before the first step (eval mode, no grad). On an
    AVX512-BF16 CPU bitsandbytes would repack the weights in place for inference, after which its matmul
    passes no gradient to its input: the next training step's gradients must equal a fresh model's."""
    from evotune.model.finetune import SupervisedFinetune
    from evotune.train.evaluate import greedy_generate
    from tests.test_lora import _randomise_lora_b

    def model():
        quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype=torch.float32)
        torch.manual_seed(0)
        m = SupervisedFinetune(load_model(tiny_llama_dir, quantization_config=quant), activation_checkpointing=False,
                               torch_compile=False, fused_kernels="none",
                               lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
        _randomise_lora_b(m)  # B = 0 at init would hide the gradient through the adapters
        return m

    def grads(m):
        ids = torch.arange(3, 35).view(1, -1)
        m.llm(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    pytest.importorskip("bitsandbytes")
    fresh, sampled = model(), model()
    assert greedy_generate(sampled, [[3, 4, 5]], max_new_tokens=3, pad_id=0)
    want, got = grads(fresh), grads(sampled)
    assert len(want) == 28 and got.keys() == want.keys()
    for k in want:
        assert want[k].abs().max() > 0 and torch.equal(got[k], want[k]), k
