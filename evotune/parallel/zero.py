"""``--deepspeed``: XTuner's ZeRO preset names and DeepSpeed JSON files, read into FSDP2 settings.

evotune does not run DeepSpeed; the flag names a memory/communication trade-off
that :mod:`evotune.parallel.fsdp` realises with FSDP2 (``docs/distributed.md``
has the table). From a JSON file only these keys are read:

* ``zero_optimization.stage`` (0-3);
* ``zero_optimization.offload_optimizer.device`` / ``offload_param.device``:
  ``"cpu"`` turns on FSDP2's CPU offload (``pin_memory`` is read too);
* ``gradient_clipping``: a number overrides the config's ``clip_grad.max_norm``;
* ``bf16.enabled`` / ``fp16.enabled``: ``true`` for bf16 compute; fp16 is
  refused (it needs loss scaling, which this trainer does not do); ``false``
  for both means fp32 compute.

A value ``"auto"`` means "as the trainer's config says" (as in DeepSpeed) and is
not reported. Every other key is listed once as ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from evotune.errors import EvotuneError

_AUTO = {"gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
_CPU = {"device": "cpu", "pin_memory": True}

# XTuner's preset names, as the JSON files it ships would be read.
PRESETS: dict[str, dict] = {
    "deepspeed_zero1": {**_AUTO, "zero_optimization": {"stage": 1}},
    "deepspeed_zero2": {**_AUTO, "zero_optimization": {"stage": 2}},
    "deepspeed_zero2_offload": {**_AUTO, "zero_optimization": {"stage": 2, "offload_optimizer": _CPU}},
    "deepspeed_zero3": {**_AUTO, "zero_optimization": {"stage": 3}},
    "deepspeed_zero3_offload": {
        **_AUTO, "zero_optimization": {"stage": 3, "offload_optimizer": _CPU, "offload_param": _CPU}},
}

_READ = {
    "zero_optimization.stage",
    "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_optimizer.pin_memory",
    "zero_optimization.offload_param.device",
    "zero_optimization.offload_param.pin_memory",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
}


@dataclass(frozen=True)
class ZeroSettings:
    source: str  # preset name or JSON path
    stage: int  # 0 (plain data parallel) to 3
    offload: bool  # parameters, gradients and optimizer step on the CPU
    pin_memory: bool
    gradient_clipping: float | None  # None: the config's clip_grad
    compute_dtype: torch.dtype | None  # None: the config's optim_wrapper dtype
    ignored: tuple[str, ...]  # keys of the JSON that have no FSDP2 meaning here


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _load_json(spec: str) -> dict:
    if spec in PRESETS:
        return PRESETS[spec]
    if not os.path.isfile(spec):
        raise EvotuneError(f"--deepspeed {spec}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise EvotuneError(f"{spec}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise EvotuneError(f"{spec}: a DeepSpeed config is a JSON object, got {type(data).__name__}")
    return data


def read_deepspeed(spec: str) -> ZeroSettings:
    """The FSDP2-relevant settings of a preset name or DeepSpeed JSON path."""
    flat = _flatten(_load_json(spec))
    stage = flat.get("zero_optimization.stage", 0)
    if stage not in (0, 1, 2, 3):
        raise EvotuneError(f"{spec}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    devices = {flat.get(f"zero_optimization.{k}.device", "none") for k in ("offload_optimizer", "offload_param")}
    unknown = devices - {"none", "cpu", None}
    if unknown:
        raise EvotuneError(f"{spec}: offload device {sorted(map(str, unknown))[0]!r} is not supported; use \"cpu\"")
    offload = "cpu" in devices
    if offload and stage == 0:
        raise EvotuneError(f"{spec}: offloading needs zero_optimization.stage 1, 2 or 3")
    pin = all(flat.get(f"zero_optimization.{k}.pin_memory", True) is not False
              for k in ("offload_optimizer", "offload_param"))

    clip = flat.get("gradient_clipping", "auto")
    if clip not in ("auto", None) and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise EvotuneError(f"{spec}: gradient_clipping must be a number >= 0 or \"auto\", got {clip!r}")
    bf16, fp16 = flat.get("bf16.enabled", "auto"), flat.get("fp16.enabled", "auto")
    if fp16 is True:
        raise EvotuneError(f"{spec}: fp16 training is not supported (it needs loss scaling); "
                           "set \"bf16\": {\"enabled\": true} and \"fp16\": {\"enabled\": false}")
    dtype = torch.bfloat16 if bf16 is True else torch.float32 if (bf16 is False and fp16 is False) else None

    ignored = tuple(sorted(k for k, v in flat.items() if k not in _READ and v != "auto"))
    return ZeroSettings(source=spec, stage=int(stage), offload=offload, pin_memory=pin,
                        gradient_clipping=None if clip in ("auto", None) else float(clip),
                        compute_dtype=dtype, ignored=ignored)
