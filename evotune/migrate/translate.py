"""Translate an InternEvo config: walk the tables of evotune/migrate/rules.py, decide what they cannot.

:func:`translate` gives every InternEvo key one table row and collects the evotune
settings with a comment naming the InternEvo key (and line) each comes from.
Three decisions involve several keys and stay code here: where the model
weights come from (``ckpt.load_ckpt_info`` and its older spellings, resume),
the model's dimensions (compared with the checkpoint when it is readable), and
the parallel layout (sequence parallel size and the ``--deepspeed`` preset).
Every key nothing took is reported at the end as not needed or unsupported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from evotune.errors import EvotuneError
from evotune.migrate.batch import SEQUENCE_MODES, BatchPlan
from evotune.migrate.read import InternEvoConfig
from evotune.migrate.rules import (CHANGED, CHECKPOINT, DATA, DERIVED, EMPTY, FIXED, KEY_NOT_NEEDED, MAPPED, MODEL,
                                   MODEL_DIMS, NOT_NEEDED, OPTIMIZER, SECTIONS, TENSOR_MODE_NOTES, TOP_NOT_NEEDED,
                                   UNSUPPORTED, Rule, Verdict, is_remote, local_path)


@dataclass
class Row:
    """One InternEvo key and what became of it."""

    key: str
    value: Any
    status: str
    target: str = ""
    note: str = ""


@dataclass
class Translation:
    """The table rows, the evotune settings (name -> (value, comment)) and the ``--deepspeed`` preset."""

    rows: list[Row]
    settings: dict[str, tuple[Any, str]]
    deepspeed: str | None


def translate(cfg: InternEvoConfig, plan: BatchPlan) -> Translation:
    """Every key of ``cfg`` as a row, and the evotune settings that train on ``plan``'s batch."""
    t = _Translator(cfg, plan)
    t.apply(DATA)
    model_path = t.model_source()
    t.apply(MODEL)
    t.check_dims(model_path)
    t.apply(CHECKPOINT)
    t.apply(OPTIMIZER)
    for name, derive in DERIVED.items():
        setting = derive(cfg, plan)
        if setting is not None:
            t.settings[name] = setting
    t.settings.update(FIXED)
    deepspeed = t.parallel()
    t.leftovers()
    return Translation(t.rows, t.settings, deepspeed)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _checkpoint_dims(path: str) -> dict[str, Any] | None:
    """The checkpoint's own dimensions (config.json or model_config.pt), or None when not readable here."""
    if not os.path.isdir(path):
        return None
    cfg_json = os.path.join(path, "config.json")
    if os.path.isfile(cfg_json):
        try:
            with open(cfg_json, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvotuneError(f"{cfg_json}: cannot read the checkpoint's config ({e})") from None
    if os.path.isfile(os.path.join(path, "model_config.pt")):
        # imported here for its cost, not a cycle: torch loads in seconds, and only this case needs it
        from evotune.checkpoint.internevo import load_model_config

        return load_model_config(path)
    return None


class _Translator:
    """Walk one InternEvo config, collecting rows, settings and the keys already reported."""

    def __init__(self, cfg: InternEvoConfig, plan: BatchPlan):
        self.cfg = cfg
        self.plan = plan
        self.rows: list[Row] = []
        self.handled: set[str] = set()
        self.settings: dict[str, tuple[Any, str]] = {}

    def row(self, key: str, status: str, target: str = "", note: str = "", value: Any = None) -> None:
        self.handled.add(key)
        self.rows.append(Row(key, self.cfg.get(key, value), status, target, note))

    def apply(self, rules: tuple[Rule, ...]) -> None:
        """One row per present key (and per ``always`` key), one setting per key that writes one."""
        c = self.cfg
        for rule in rules:
            present = c.has(rule.key)
            value = c.get(rule.key, rule.default)
            if present or rule.always:
                verdict = rule.judge(value, c, self.plan) if rule.judge else Verdict(MAPPED, rule.note)
                if verdict is not None:
                    target = rule.target or rule.setting if verdict.target is None else verdict.target
                    self.row(rule.key, verdict.status, target, verdict.note, value)
            if rule.setting and (present or rule.absent is not None):
                comment = c.cite(rule.key) if present else f"{rule.key} {rule.absent}".rstrip()
                self.settings[rule.setting] = (rule.value(value) if rule.value else value, comment)

    # -- where the model comes from, and its dimensions ----------------------------------------------
    def model_source(self) -> str | None:
        """Rows for the ckpt keys that name the starting weights; sets pretrained_model_name_or_path."""
        c = self.cfg
        candidates = []  # (key, path, ckpt_type, content), in InternEvo's order of precedence
        for key in ("ckpt.load_ckpt_info", "ckpt.load_model_only_folder", "ckpt.load_ckpt_folder"):
            value = c.get(key)
            if key == "ckpt.load_model_only_folder":  # the older spelling: a folder of model weights
                if value:
                    candidates.append((key, value, "internevo", ("model",)))
            elif isinstance(value, dict) and value.get("path"):
                candidates.append((f"{key}.path", value["path"], value.get("ckpt_type", "internevo"),
                                   tuple(value.get("content", ("model",)))))
            if c.has(key):
                self.handled.update(_flatten(value, key))
        for i, (key, path, ckpt_type, content) in enumerate(candidates):
            if i:
                self.row(key, NOT_NEEDED, "", f"{candidates[0][0]} is used")
                continue
            if is_remote(path):
                self.row(key, UNSUPPORTED, "pretrained_model_name_or_path",
                         "object-store path: copy the checkpoint to a local or shared file system")
            else:
                self.row(key, MAPPED, "pretrained_model_name_or_path",
                         "InternEvo folder: loads directly (any tp/pp split)" if ckpt_type == "internevo"
                         else f"ckpt_type {ckpt_type!r}: a Hugging Face directory")
            extra = [x for x in content if x != "model"]
            if extra:
                self.row(f"{key.rsplit('.path', 1)[0]}.content", UNSUPPORTED, "",
                         f"{', '.join(map(str, extra))}: InternEvo optimizer/sampler/scheduler states are not "
                         f"loaded; training starts at step 0 from the weights")
        if isinstance(c.get("ckpt.load_ckpt_folder"), str):
            self.row("ckpt.load_ckpt_folder", NOT_NEEDED, "",
                     "InternEvo's resume folder: resume evotune runs with `evotune train --resume auto`")
        if c.has("ckpt.auto_resume"):
            if c.get("ckpt.auto_resume") and candidates:
                self.row("ckpt.auto_resume", CHANGED, "--resume auto",
                         "InternEvo with auto_resume=True ignores load_ckpt_info when save_ckpt_folder holds a "
                         "checkpoint; evotune starts from the weights and resumes only with --resume auto")
            else:
                self.row("ckpt.auto_resume", NOT_NEEDED if c.get("ckpt.auto_resume") else MAPPED, "--resume auto",
                         "resume with `evotune train --resume auto`")
        if not candidates:
            self.row("ckpt.load_ckpt_info", UNSUPPORTED, "pretrained_model_name_or_path",
                     "no model weights to start from: evotune fine-tunes a pretrained model")
            self.settings["pretrained_model_name_or_path"] = (
                "/path/to/model", "no model to start from in ckpt: set a HF directory or an InternEvo checkpoint folder")
            return None
        key, path, ckpt_type, _ = candidates[0]
        self.settings["pretrained_model_name_or_path"] = (
            local_path(path), f"{self.cfg.cite(key)} (ckpt_type {ckpt_type!r}; InternEvo folders load directly)")
        return local_path(path)

    def check_dims(self, path: str | None) -> None:
        """Compare the model dimensions the config states with the checkpoint's, when it is readable here."""
        c = self.cfg
        theirs = _checkpoint_dims(path) if path else None
        for key, names in MODEL_DIMS.items():
            if not c.has(f"model.{key}"):
                continue
            mine = c.get(f"model.{key}")
            if theirs is None:
                self.row(f"model.{key}", NOT_NEEDED, "", "read from the checkpoint (not found here: unchecked)")
                continue
            found = next((theirs[k] for k in names if k in theirs), None)
            if found is None and key == "num_kv_attention_heads":
                found = theirs.get("num_attention_heads")
            if found is not None and int(found) != int(mine):
                raise EvotuneError(
                    f"{c.path}:{c.lines.get(f'model.{key}', '?')}: model.{key} = {mine} but the "
                    f"checkpoint {path} has {found}; the InternEvo config and its checkpoint disagree "
                    f"(fix model.{key} or ckpt.load_ckpt_info.path)"
                )
            self.row(f"model.{key}", NOT_NEEDED, "", "read from the checkpoint (checked: equal)")

    # -- parallel ----------------------------------------------------------------------------------
    def parallel(self) -> str | None:
        """Rows for ``parallel``; sets sequence_parallel_size and returns the ``--deepspeed`` preset."""
        c = self.cfg
        plan = self.plan
        ie = plan.internevo
        sp = plan.sequence_parallel_size
        for leaf in _flatten(c.get("parallel"), "parallel") if c.has("parallel") else {}:
            if leaf.split(".")[1] in ("tensor", "pipeline", "zero1", "weight"):
                self.handled.add(leaf)  # one row per sub-dict below
        note = TENSOR_MODE_NOTES[ie.mode]
        start = ie.tensor if ie.mode in SEQUENCE_MODES else 1
        if sp > start:
            note += (f"; sequence_parallel_size {sp} (not {start}) so that dp {plan.data_parallel_size} "
                     f"divides the {plan.packs_per_step} packs per step")
        elif sp < start:
            note += (f"; sequence_parallel_size {sp} (not {start}): the largest that splits the "
                     f"{c.get('model.num_attention_heads')} attention heads and the {plan.packs_per_step} "
                     f"packs per step")
        status = MAPPED if (ie.mode == "isp" and sp == ie.tensor) or (ie.tensor == 1 and sp == 1) else CHANGED
        self.row("parallel.tensor", status, "sequence_parallel_size", note, value=1)
        self.settings["sequence_parallel_size"] = (
            sp, f"parallel.tensor (size {ie.tensor}, mode {ie.mode!r}): InternEvo dp = world / (tensor x pipeline)")
        if c.has("parallel.pipeline"):
            self.row("parallel.pipeline", NOT_NEEDED, "",
                     "no pipeline stages: FSDP shards every layer over the data-parallel ranks; pipeline ranks "
                     "become data-parallel ranks" if ie.pipeline > 1 else "size 1")
        preset, note, status = self.zero_preset()
        if c.has("parallel.zero1"):
            self.row("parallel.zero1", status, f"--deepspeed {preset}" if preset else "(no --deepspeed)", note)
        if ie.weight > 1:
            self.row("parallel.weight", CHANGED, "--deepspeed deepspeed_zero3",
                     f"weight parallel {ie.weight} shards parameters in groups of {ie.weight}; evotune shards "
                     f"them over all {plan.data_parallel_size} data-parallel ranks (its overlap/prefetch knobs: "
                     f"FSDP2 prefetches by itself)")
        elif c.has("parallel.weight"):
            self.row("parallel.weight", NOT_NEEDED, "", "size 1")
        s2d = c.get("parallel.sequence_2D")
        if isinstance(s2d, dict):
            self.handled.update(_flatten(s2d, "parallel.sequence_2D"))
            if s2d.get("enable"):
                self.rows.append(Row("parallel.sequence_2D", "enable=True", CHANGED, "sequence_parallel_size",
                                     f"2D (head x context) sequence parallel -> Ulysses over all {sp} sequence "
                                     f"ranks (head parallel only)"))
            else:
                self.rows.append(Row("parallel.sequence_2D", "enable=False", NOT_NEEDED, "", "disabled"))
        for key in ("parallel.expert", "parallel.expert_zero1", "parallel.expert_weight"):
            if c.has(key):
                self.handled.update(_flatten(c.get(key), key))
                self.row(key, NOT_NEEDED, "", "mixture-of-experts only")
        return preset

    def zero_preset(self) -> tuple[str | None, str, str]:
        """The ``--deepspeed`` preset for InternEvo's ZeRO and weight-parallel settings, its note and status."""
        plan = self.plan
        ie = plan.internevo
        zero1 = self.cfg.get("parallel.zero1")
        fsdp = isinstance(zero1, dict) and bool(zero1.get("fsdp"))
        dp = plan.data_parallel_size
        if fsdp or ie.weight > 1:
            why = "zero1.fsdp=True: parameters sharded" if fsdp else f"weight parallel {ie.weight}"
            return "deepspeed_zero3", f"{why} -> parameters, gradients and optimizer states sharded (FSDP)", CHANGED
        if dp == 1:
            return None, "one data-parallel rank: nothing to shard", MAPPED
        if ie.zero1 == 1:
            return None, "size 1: no sharding -> plain data parallel (no --deepspeed flag)", MAPPED
        group = ie.zero_group
        if ie.zero1 <= 0 or group >= dp:
            return ("deepspeed_zero1",
                    f"optimizer states sharded over all {dp} data-parallel ranks (FSDP, parameters gathered once "
                    f"per step)", MAPPED)
        return ("deepspeed_zero1",
                f"InternEvo shards optimizer states in groups of {group}; evotune shards over all {dp} "
                f"data-parallel ranks (same mathematics, less memory, more cross-node traffic)", CHANGED)

    # -- everything else ---------------------------------------------------------------------------
    def leftovers(self) -> None:
        """Rows for every key no rule took: not needed, or unsupported."""
        for name, value in self.cfg.values.items():
            if name.startswith("_") or name.isupper() or name in self.handled:
                continue  # private names and CONSTANTS are helpers the sections use
            if name in TOP_NOT_NEEDED:
                self.rows.append(Row(name, "..." if isinstance(value, dict) else value, NOT_NEEDED, "",
                                     TOP_NOT_NEEDED[name]))
            elif name not in SECTIONS:
                if value in EMPTY:
                    self.rows.append(Row(name, value, NOT_NEEDED, "", "empty or disabled"))
                else:
                    self.rows.append(Row(name, value, UNSUPPORTED, "", "not an InternEvo key evotune knows"))
            else:
                for leaf, leaf_value in _flatten(value, name).items():
                    if leaf in self.handled or any(leaf.startswith(h + ".") for h in self.handled):
                        continue
                    if leaf in KEY_NOT_NEEDED:
                        self.rows.append(Row(leaf, leaf_value, NOT_NEEDED, "", KEY_NOT_NEEDED[leaf]))
                    elif leaf_value in EMPTY and not leaf.startswith("model."):
                        self.rows.append(Row(leaf, leaf_value, NOT_NEEDED, "", "empty or disabled"))
                    else:
                        self.rows.append(Row(leaf, leaf_value, UNSUPPORTED, "", "no evotune equivalent"))
