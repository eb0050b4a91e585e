"""float16 loss scaling (XTuner's ``AmpOptimWrapper(dtype='float16', loss_scale='dynamic')``).

float16 has 5 exponent bits: small gradients underflow to 0. The loss is
multiplied by ``scale`` before backward, and the gradients are divided by it
before clipping and the optimizer step, so the update is the one unscaled
gradients give. With ``dynamic`` scaling (torch's ``GradScaler`` rule, its
defaults: start at 2**16, halve on overflow, double after 2000 clean steps) a
step whose gradients overflow is not applied: the loop (evotune/train/loop.py)
skips it the way it skips any non-finite step and counts it in
``skipped_steps``; the scale is halved and the next step tries again.

Sharded gradients (FSDP2 DTensors) need no special scaler: the overflow test
is the global gradient norm the loop computes anyway
(:func:`evotune.parallel.fsdp.clip_grad_norm_`, one reduction over every shard
of every rank), so all ranks agree to skip, which is what
``ShardedGradScaler`` adds to ``GradScaler``. The state (scale, clean steps
since the last change) is saved in the checkpoint's train state, so a resumed
run goes on with the same scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LossScaler:
    """``settings.optim.loss_scale`` (evotune.xtuner_compat.loss_scale): init_scale, growth_factor,
    backoff_factor, growth_interval, dynamic (False: the scale never changes)."""

    def __init__(self, init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int,
                 dynamic: bool = True):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.dynamic = int(growth_interval), bool(dynamic)
        self.clean_steps = 0  # applied steps since the scale last changed

    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Divide the gradients by the scale, in place (plain tensors or DTensor shards)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)

    def update(self, overflow: bool) -> None:
        """After a step: halve on overflow; grow after ``growth_interval`` applied steps in a row."""
        if not self.dynamic:
            return
        if overflow:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
