"""The training run's checkpoint policy: where, how often, how many, resume, train state and RNG.

:class:`Checkpointer` owns ``<work_dir>/checkpoints``: it saves every
``interval`` optimizer steps and once more at the end (:meth:`maybe_save`),
keeps the newest ``keep``, resolves ``--resume`` (``auto`` or a path) and loads
model, optimizer, scheduler and :class:`TrainState` from it, and restores this
rank's RNG state last (:meth:`restore_rng`), once everything that draws random
numbers while being built exists. A checkpoint is never written from weights
that are not finite (:meth:`maybe_save` refuses), so pruning only ever deletes
finite ones in favour of finite ones. Setting an earlier run aside is the work
dir's business (evotune/train/workdir.py). The files themselves are written and
read by :mod:`evotune.checkpoint.dcp`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from evotune.checkpoint import dcp
from evotune.errors import EvotuneError


@dataclass
class TrainState:
    """What changes step to step and must survive a resume."""

    step: int = 0
    consumed_tokens: int = 0
    sampler: dict = field(default_factory=dict)
    skipped_steps: int = 0  # steps not applied: NaN/inf loss or gradient norm (evotune/train/nonfinite.py)
    loss_scale: dict = field(default_factory=dict)  # float16 loss scaler state (evotune/train/loss_scale.py)


@dataclass
class Resumed:
    """What :meth:`Checkpointer.resume` loaded."""

    path: str
    state: TrainState
    world_size: int | None  # processes of the run that saved it
    load_time: float
    data_changed: bool = False  # resumed on other data (--resume-data-changed=ok): the data order restarts


class Checkpointer:
    """Saves and resumes the checkpoints of one run.

    ``meta``: what ``trainer_state.json`` records besides the train state (world
    layout, model source); ``hf_config``: the model's transformers config.
    ``interval`` 0: save only at the end; ``keep`` < 1: keep all.
    """

    def __init__(self, work_dir: str, *, interval: int, keep: int, model, optimizer, scheduler, meta: dict,
                 hf_config=None, is_main: bool = True):
        self.root = dcp.checkpoints_dir(work_dir)
        self.work_dir = work_dir
        self.interval = interval
        self.keep = keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.meta = meta
        self.hf_config = hf_config
        self.is_main = is_main
        self.saved_step: int | None = None
        self._rng: dict | None = None

    def resume(self, resume: str | None, data_changed_ok: bool = False) -> Resumed | None:
        """Load the checkpoint ``--resume`` names (None: a fresh run).

        Refused first, in one line: a checkpoint of another optimizer, a LoRA
        checkpoint whose q/k/v adapters share (or do not share) one A where this run's
        do not (or do), or of other
        training data (``meta['data_fingerprint']``) unless ``data_changed_ok``
        (``--resume-data-changed=ok``); another model shape is refused by
        :func:`dcp.load_checkpoint`.
        """
        path = dcp.resolve_resume(resume, self.work_dir) if resume else None
        if path is None:
            return None
        data_changed = self._check_same_run(path, data_changed_ok)
        start = time.perf_counter()
        loaded = dcp.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        state = TrainState(loaded["step"], loaded["consumed_tokens"], loaded["sampler"],
                           loaded.get("skipped_steps", 0), loaded.get("loss_scale", {}))
        self.saved_step = state.step
        self._rng = loaded["rng"]
        return Resumed(path, state, loaded.get("world_size"), time.perf_counter() - start, data_changed)

    def _check_same_run(self, path: str, data_changed_ok: bool) -> bool:
        """Raise on another optimizer or (unless ``data_changed_ok``) other data; True: the data changed."""
        saved = dcp.read_trainer_state(path)
        before, now = saved.get("optimizer"), self.meta.get("optimizer")
        if before and now and before != now:
            raise EvotuneError(f"--resume {path}: the checkpoint was trained with the optimizer {before}, this run "
                               f"uses {now}; resume with the optimizer it was trained with, or start a fresh run")
        if saved.get("lora") and self.meta.get("lora") and bool(saved.get("lora_shared_qkv_a")) != \
                bool(self.meta.get("lora_shared_qkv_a")):
            have = "one lora_A shared by" if saved.get("lora_shared_qkv_a") else "independent lora_A matrices for"
            want = ("target_modules=['wqkv', 'wo', 'w1', 'w2', 'w3'] (or none)" if saved.get("lora_shared_qkv_a")
                    else "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
                         "'down_proj'] (Llama names keep them independent)")
            raise EvotuneError(f"--resume {path}: the checkpoint's adapter has {have} q_proj, k_proj and v_proj "
                               f"(docs/lora.md, \"InternLM2\"), this run's does not; resume with {want}")
        before, now = saved.get("data_fingerprint"), self.meta.get("data_fingerprint")
        if before and now and before != now and not data_changed_ok:
            raise EvotuneError(f"--resume {path}: the training data changed since this checkpoint (index fingerprint "
                               f"{before} then, {now} now: other files, documents, max_length or min_length), so "
                               "the data order cannot continue where it stopped; restore the data, or pass "
                               "--resume-data-changed=ok to continue on the new data")
        return bool(before and now and before != now)

    def restore_rng(self) -> None:
        """This rank's RNG as the checkpoint saved it; call last, once the model and data are built."""
        if self._rng is not None:
            dcp.set_rng_state(self._rng)

    def due(self, step: int, last: bool = False) -> bool:
        """Every ``interval`` steps; at the end unless this step is saved already."""
        if last:
            return self.saved_step != step
        return bool(self.interval) and step % self.interval == 0

    def maybe_save(self, state: TrainState, last: bool = False) -> str | None:
        """Save after ``state.step`` when :meth:`due` (all ranks call it); returns the path saved."""
        if not self.due(state.step, last):
            return None
        if not self._weights_finite():
            last = dcp.list_checkpoints(self.root)
            raise EvotuneError(f"step {state.step}: the weights hold NaN/inf, so no checkpoint is written (the last, "
                               f"finite one is {last[-1][1] if last else 'none'}); lower lr or check the data")
        start = time.perf_counter()
        train_state = {"step": state.step, "consumed_tokens": state.consumed_tokens, "sampler": state.sampler,
                       "skipped_steps": state.skipped_steps, "loss_scale": state.loss_scale, **self.meta}
        path = dcp.save_checkpoint(self.root, state.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, train_state=train_state, keep=self.keep,
                                   hf_config=self.hf_config)
        self.saved_step = state.step
        if self.is_main:  # print() goes above a progress bar too (rich redirects stdout)
            print(f"evotune: checkpoint {path} saved in {time.perf_counter() - start:.2f} s")
        return path

    def _weights_finite(self) -> bool:
        """All ranks agree (each checks its shards); one reduction per save."""
        params = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).any().to(torch.int32) if params else None
        if bad is None:
            return True
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        return not bool(bad)

    def latest(self) -> str | None:
        """The newest complete checkpoint of this run's folder."""
        found = dcp.list_checkpoints(self.root)
        return found[-1][1] if found else None

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step}")
