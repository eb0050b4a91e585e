"""XTuner 0.2 configs run unchanged (issue 14, part 1): imports, keys that act, keys that are refused.

The configs under tests/xtuner_configs/ are XTuner v0.2.0's own files, copied
unchanged; the runs change only paths, lengths and intervals with --cfg-options.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from evotune import xtuner_compat as xt
from evotune.cli import main as cli_main
from evotune.config import load_config
from evotune.errors import EvotuneError
from evotune.settings import SECTIONS, load_settings

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
    import inspect
    for m in markers:
        for p in inspect.signature(m).parameters:
            read = any(q == f"{where.get(m.__name__)}.{p}" or q.startswith(f"{where.get(m.__name__)}.{p}.")
                       for q in places)
            assert p in m.fixed or read or (m.__name__, p) == ("Visualizer", "vis_backends"), (m.__name__, p)
