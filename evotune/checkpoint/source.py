"""Which format a model folder holds, and the record of where a loaded model came from.

evotune reads three kinds of model folder (see docs/models.md):
``'hf'`` (a Hugging Face folder of any ``model_type``), ``'internlm2'`` (a
Hugging Face folder with ``model_type: internlm2``, whose remote code does not
run) and ``'internevo'`` (``model_config.pt`` + ``model_tp{t}_pp{p}.pt``).
:func:`detect_format` tells them apart. A loaded model carries a
:class:`ModelSource` (``model.evotune_source``) so that an export writes it
back in the layout it came in; ``trainer_state.json`` stores it as JSON
(``model_source``) so that ``evotune convert pth_to_hf`` can too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from evotune.errors import EvotuneError

FORMATS = ("hf", "internlm2", "internevo")
SOURCE_ATTR = "evotune_source"


def read_config_json(path: Path) -> dict:
    """``<path>/config.json`` as a dict; a file that is not JSON is an error naming it."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise EvotuneError(f"{file}: not valid JSON ({e}); restore the file from the original model") from e


def detect_format(path) -> str:
    """'internevo', 'internlm2' or 'hf' for a model directory; an EvotuneError for anything else."""
    p = Path(path)
    if not p.exists():
        raise EvotuneError(f"model path {p} does not exist: set pretrained_model_name_or_path to a model directory")
    if not p.is_dir():
        raise EvotuneError(f"model path {p} is a file: point at the folder that holds config.json or model_config.pt")
    if (p / "model_config.pt").is_file():
        return "internevo"
    if (p / "config.json").is_file():
        model_type = read_config_json(p).get("model_type")
        return "internlm2" if model_type == "internlm2" else "hf"
    raise EvotuneError(
        f"{p} holds neither config.json (Hugging Face model) nor model_config.pt (InternEvo checkpoint): "
        "point at a model directory"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: its folder's ``format`` (one of :data:`FORMATS`), ``path``, and
    ``config``: the original ``config.json``, or for InternEvo ``model_config.pt`` with its dtype as a
    string (so the record is plain JSON)."""

    format: str
    path: str | None = None
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise EvotuneError(f"model source format {self.format!r}: must be one of {', '.join(FORMATS)}")

    def to_json(self) -> dict:
        return {"format": self.format, "path": self.path, "config": self.config}

    @classmethod
    def from_json(cls, data: dict | None, where: str = "model_source") -> ModelSource | None:
        """The record :meth:`to_json` wrote (``None`` stays ``None``: a checkpoint of a model built in Python)."""
        if data is None:
            return None
        if not isinstance(data, dict) or "format" not in data:
            raise EvotuneError(f"{where}: {data!r} is not a model source record (format, path, config)")
        return cls(format=data["format"], path=data.get("path"), config=dict(data.get("config") or {}))

    @classmethod
    def of(cls, model) -> ModelSource | None:
        """The record :func:`evotune.load_model` attached to ``model`` (None for a model built otherwise)."""
        return getattr(model, SOURCE_ATTR, None)

    def attach(self, model) -> None:
        setattr(model, SOURCE_ATTR, self)
