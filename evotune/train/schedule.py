"""Learning-rate schedule phases in XTuner's shape, as one ``LambdaLR``.

Configs write ``param_scheduler = [dict(type=LinearLR, ...), dict(type=CosineAnnealingLR, ...)]``
with ``begin``/``end`` in epochs (fractions allowed) as XTuner does with
``by_epoch=True, convert_to_iter_based=True``. The trainer converts epochs to
optimizer steps and combines the phases into a single ``LambdaLR`` whose state
is just the step counter, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LinearLR:
    """Linear factor from ``start_factor`` to ``end_factor`` over [begin, end)."""

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    begin: float = 0
    end: float = 1
    by_epoch: bool = True
    convert_to_iter_based: bool = True

    def factor(self, progress: float, base_lr: float) -> float:
        return self.start_factor + (self.end_factor - self.start_factor) * progress


@dataclass
class CosineAnnealingLR:
    """Cosine from the base lr down to ``eta_min`` over [begin, end)."""

    eta_min: float = 0.0
    begin: float = 0
    end: float = 1
    by_epoch: bool = True
    convert_to_iter_based: bool = True

    def factor(self, progress: float, base_lr: float) -> float:
        floor = self.eta_min / base_lr if base_lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_steps(value: float, by_epoch: bool, steps_per_epoch: int) -> int:
    return int(round(value * steps_per_epoch)) if by_epoch else int(value)


def build_scheduler(
    optimizer: torch.optim.Optimizer, phases: list, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``LambdaLR`` over ``phases`` (built phase objects); outside every phase the
    factor of the nearest phase's edge holds. ``end`` is capped at ``total_steps``."""
    spans = []
    for ph in phases:
        begin = _to_steps(ph.begin, ph.by_epoch, steps_per_epoch)
        end = min(_to_steps(ph.end, ph.by_epoch, steps_per_epoch), total_steps)
        spans.append((begin, max(end, begin), ph))
    spans.sort(key=lambda s: s[0])
    base_lr = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        current = 1.0
        for begin, end, ph in spans:
            if step < begin:
                break
            progress = 1.0 if end == begin else min((step - begin) / (end - begin), 1.0)
            current = ph.factor(progress, base_lr)
        return current

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
