"""evotune: train Hugging Face causal LMs on InternEvo data and checkpoints.

Names used in configs (``type=...``) and the Python API are importable from
here. They are resolved lazily so that ``import evotune`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "EvotuneError": "evotune.errors",
    "load_config": "evotune.config",
    "build": "evotune.config",
    # data
    "load_intern_repo_tokenized_dataset": "evotune.data.ftdp",
    "build_packed_dataset": "evotune.data.packing",
    "build_valid_datasets": "evotune.data.packing",
    "InternRepoSampler": "evotune.data.sampler",
    "SequenceParallelSampler": "evotune.data.sampler",
    "packed_collate": "evotune.data.collate",
    "write_bin": "evotune.data.ftdp_write",
    "BinWriter": "evotune.data.ftdp_write",
    "tokenize_files": "evotune.data.tokenize",
    # XTuner's data path (evotune/data/hf_dataset.py, xtuner_maps.py, templates.py)
    "process_hf_dataset": "evotune.data.hf_dataset",
    "load_intern_repo_untokenized_dataset": "evotune.data.hf_dataset",
    "template_map_fn": "evotune.data.xtuner_maps",
    "template_map_fn_factory": "evotune.data.xtuner_maps",
    "DATASET_FORMAT_MAPPING": "evotune.data.xtuner_maps",
    **{f"{name}_map_fn": "evotune.data.xtuner_maps" for name in (
        "alpaca", "alpaca_zh", "arxiv", "code_alpaca", "colors", "crime_kg_assitant", "default", "law_reference",
        "medical", "oasst1", "openai", "openorca", "pretrain", "sql", "stack_exchange", "tiny_codes", "wizardlm")},
    "PROMPT_TEMPLATE": "evotune.data.templates",
    "SYSTEM_TEMPLATE": "evotune.data.templates",
    # model
    "load_model": "evotune.model.load",
    "load_tokenizer": "evotune.model.load",
    "save_hf": "evotune.checkpoint.hf",
    "SupervisedFinetune": "evotune.model.finetune",
    "chunked_cross_entropy": "evotune.model.loss",
    "set_activation_checkpointing": "evotune.model.checkpointing",
    "compile_decoder_layers": "evotune.model.compile",
    # migration
    "read_internevo_config": "evotune.migrate",
    "migrate_internevo_config": "evotune.migrate",
    # optimisation
    "AdamW": "torch.optim",
    "LinearLR": "evotune.train.schedule",
    "CosineAnnealingLR": "evotune.train.schedule",
    "build_optimizer": "evotune.train.optim",
    # logging and evaluation
    "TensorBoardWriter": "evotune.train.tensorboard",
    "generate_samples": "evotune.train.evaluate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evotune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
