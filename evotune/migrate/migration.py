"""One migration: read the InternEvo config, plan the batch, translate, render."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from evotune.errors import EvotuneError
from evotune.migrate.batch import BatchPlan, internevo_parallel, plan_batch, smallest_internevo_world
from evotune.migrate.read import InternEvoConfig, read_internevo_config
from evotune.migrate.render import render
from evotune.migrate.rules import UNSUPPORTED
from evotune.migrate.translate import Row, translate


@dataclass
class Migration:
    """The result of :func:`migrate_internevo_config`: the config text, the table and the batch arithmetic."""

    source: str
    text: str
    rows: list[Row]
    plan: BatchPlan
    deepspeed: str | None
    assumptions: list[str] = field(default_factory=list)

    @property
    def unsupported(self) -> list[Row]:
        return [r for r in self.rows if r.status == UNSUPPORTED]


def _positive_int(cfg: InternEvoConfig, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EvotuneError(f"{cfg.path}:{cfg.lines.get(key, '?')}: {key} must be a positive integer, got {value!r}")
    return value


def migrate_internevo_config(path: str | os.PathLike, world_size: int | None = None,
                             target_world_size: int | None = None,
                             sequence_parallel_size: int | None = None) -> Migration:
    """Translate the InternEvo config at ``path``.

    ``world_size``: GPUs of the InternEvo job (sets InternEvo's dp and so the tokens
    per step; default: the smallest world InternEvo accepts for ``parallel``, noted
    as an assumption). ``target_world_size``: GPUs evotune will train on (default:
    ``world_size``). ``sequence_parallel_size``: evotune's SP (default: see
    :func:`evotune.migrate.batch.plan_batch`).
    """
    cfg = read_internevo_config(path)
    if not isinstance(cfg.get("data"), dict):
        raise EvotuneError(f"{cfg.path}: no 'data = dict(...)': is this an InternEvo training config?")
    seq_len = _positive_int(cfg, "data.seq_len")
    micro_bsz = _positive_int(cfg, "data.micro_bsz")
    micro_num = _positive_int(cfg, "data.micro_num", 1)
    assumptions = []
    if world_size is None:
        world_size = smallest_internevo_world(cfg.get("parallel"))
        assumptions.append(f"InternEvo ran on {world_size} GPUs (the fewest its parallel settings allow); "
                           f"pass --world-size with the GPU count of your InternEvo job")
    ie = internevo_parallel(cfg.get("parallel"), world_size)
    problems = ie.problems()
    if problems:
        raise EvotuneError(f"{cfg.path}: InternEvo would not run on {world_size} GPUs: {'; '.join(problems)} "
                           f"(--world-size is the GPU count of the InternEvo job)")
    heads = cfg.get("model.num_attention_heads")
    plan = plan_batch(ie, seq_len, micro_bsz, micro_num, int(target_world_size or world_size),
                      sequence_parallel_size, heads if isinstance(heads, int) else None)
    translation = translate(cfg, plan)
    text = render(cfg.path, translation, plan, assumptions)
    return Migration(cfg.path, text, translation.rows, plan, translation.deepspeed, assumptions)
