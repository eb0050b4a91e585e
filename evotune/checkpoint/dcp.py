"""Training checkpoints with torch.distributed.checkpoint (DCP): save, find, resume.

Layout of ``<work_dir>/checkpoints/step_<N>/`` (N = optimizer steps done)::

    .metadata, __<rank>_0.distcp   DCP: {"model": ..., "optimizer": ...}
    trainer_state.json             step, consumed_tokens, sampler, scheduler, world layout,
                                   model_source (a ModelSource as JSON: format, path, original config;
                                   see evotune/checkpoint/source.py)
    hf_config.json                 the transformers config of the trained model
    rng/rank_<r>.pt                python, numpy, torch CPU (and CUDA) RNG states of rank r

``model`` holds the trained parameters of ``SupervisedFinetune`` (all of them, or a LoRA adapter's
only: frozen ones are not saved) under their full names
(``llm.`` + the transformers name: ``llm.model.layers.0.self_attn.q_proj.weight``,
``llm.lm_head.weight``), fp32, each stored once however it was sharded;
``optimizer`` is ``get_optimizer_state_dict``'s layout (``state.<param name>.exp_avg``
..., ``param_groups``). Reading needs no process group and any number of
ranks: :func:`read_model_state` returns the transformers state dict of a
checkpoint (``evotune convert pth_to_hf`` exports one), DCP reshards on
load for another world size.

Atomic (:class:`evotune.checkpoint.atomic.AtomicDir`, collective): every rank
writes into ``.tmp_step_<N>/``; once all files are written and synced, rank 0
renames the folder to ``step_<N>``. A crash mid-save leaves only the temporary
folder (removed by the next save); every ``step_<N>`` is complete. After the
rename the oldest checkpoints beyond ``keep`` are deleted. Several nodes need
the work dir on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.tensor import DTensor

from evotune.checkpoint.atomic import TMP_PREFIX, AtomicDir, folder_bytes, remove_leftovers
from evotune.checkpoint.plan import Planned
from evotune.checkpoint.source import ModelSource
from evotune.errors import EvotuneError

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
HF_CONFIG = "hf_config.json"
_STEP_DIR = re.compile(r"step_(\d+)")
# frozen parameters (a LoRA run's base model, evotune/model/lora.py) are not saved: they are the base's,
# loaded again from it on resume, so a LoRA checkpoint holds the adapter and its optimizer state only
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# loading them: the frozen ones are absent by design (a missing trained tensor is refused first, _check_fits)
SET_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoints_dir(work_dir: str) -> str:
    return os.path.join(work_dir, CHECKPOINTS)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, TRAINER_STATE))


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.fullmatch(name)
        if m and is_checkpoint(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(resume: str, work_dir: str) -> str | None:
    """The checkpoint ``--resume`` names: ``auto`` (the latest in the work dir, None if there is
    none), a checkpoint folder, or a folder of checkpoints (its latest)."""
    if resume == "auto":
        found = list_checkpoints(checkpoints_dir(work_dir))
        return found[-1][1] if found else None
    if is_checkpoint(resume):
        return resume
    found = list_checkpoints(resume)
    if found:
        return found[-1][1]
    raise EvotuneError(f"--resume {resume}: not a checkpoint (a step_<N> folder with .metadata and "
                       f"{TRAINER_STATE}) nor a folder holding one; use --resume auto or a path under "
                       f"<work_dir>/{CHECKPOINTS}")


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's random generators, as plain lists and tensors (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _json_value(value):
    """What ``json`` cannot write itself: a ModelSource as its record, anything else as its string."""
    return value.to_json() if isinstance(value, ModelSource) else str(value)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_value)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _prune(root: str, keep: int) -> None:
    """Delete leftovers of crashed saves and all but the newest ``keep`` checkpoints (keep < 1: all)."""
    remove_leftovers(root)
    if keep >= 1:
        for step, path in list_checkpoints(root)[:-keep]:
            # renamed first: a kill during the deletion leaves a leftover, never a step_<N> missing files
            doomed = os.path.join(root, f"{TMP_PREFIX}pruned_step_{step}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _save_bytes(root: str, *state_dicts) -> int:
    """What the next save takes: the size of the newest checkpoint, or (the first save) this
    rank's tensors times the number of ranks."""
    found = list_checkpoints(root)
    if found:
        return folder_bytes(found[-1][1])
    tensors = [t for sd in state_dicts for t in torch.utils._pytree.tree_leaves(sd) if isinstance(t, torch.Tensor)]
    local = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)
    return local * (dist.get_world_size() if dist.is_initialized() else 1)


def _trained_state(model, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of the trained parameters. ``ignore_frozen_params`` drops frozen
    parameters but not the extra entries a module writes beside one: a bitsandbytes 4-bit weight (QLoRA)
    adds ``<weight>.absmax``, ``.quant_map``, ``.quant_state.*``, derived from the base like the weight
    itself and rebuilt from it at load, so they are left out too."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    frozen = tuple(f"{name}." for name, p in model.named_parameters() if not p.requires_grad)
    if frozen:
        model_sd = {k: v for k, v in model_sd.items() if not k.startswith(frozen)}
    return model_sd, optim_sd


def save_checkpoint(root: str, step: int, *, model, optimizer, scheduler, train_state: dict,
                    keep: int = -1, hf_config=None) -> str:
    """Write ``<root>/step_<step>`` atomically on every rank; returns its path.

    ``train_state``: JSON data (step, consumed tokens, sampler state, ``model_source``
    (a :class:`ModelSource` or its JSON), ...) written by rank 0 with the scheduler's
    state. ``hf_config``: the model's transformers config. The same step written
    again (a rerun in the same work dir) replaces the earlier one.
    """
    rank = _rank()
    final = os.path.join(root, f"step_{step}")
    model_sd, optim_sd = _trained_state(model, optimizer)
    with AtomicDir(final, overwrite=True, collective=True, need_bytes=_save_bytes(root, model_sd, optim_sd)) as tmp:
        os.makedirs(tmp / "rng", exist_ok=True)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp),
                     no_dist=not dist.is_initialized())
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        if rank == 0:  # dcp.save returns once every rank's shards are written
            _write_json(str(tmp / TRAINER_STATE), {**train_state, "scheduler": scheduler.state_dict()})
            if hf_config is not None:
                hf_config.to_json_file(str(tmp / HF_CONFIG))
    if rank == 0:
        _prune(root, keep)
    _barrier()
    return final


# --------------------------------------------------------------------------- load


def read_trainer_state(path: str) -> dict:
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvotuneError(f"{path}/{TRAINER_STATE}: cannot be read ({e}); resume from another checkpoint") from None


def load_checkpoint(path: str, *, model, optimizer, scheduler) -> dict:
    """Load model, optimizer and scheduler in place (resharding as needed).

    Returns the trainer state, with ``rng``: this rank's saved RNG state (rank 0's
    when the checkpoint had fewer ranks); the caller restores it last, with
    :func:`set_rng_state`, once nothing else will draw random numbers before
    training.
    """
    state = read_trainer_state(path)
    model_sd, optim_sd = _trained_state(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    _check_fits(path, loaded)
    try:
        with _single_process_quiet():
            dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # the layout fits (checked above): the files are damaged
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise EvotuneError(f"{path}: its files cannot be read ({reason[:200]}): the checkpoint is damaged "
                           "(a truncated or missing file); resume from an older one with --resume "
                           f"{os.path.dirname(path)}/step_<N>") from e
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=SET_TRAINED_ONLY)
    scheduler.load_state_dict(state.pop("scheduler"))
    rng_file = os.path.join(path, "rng", f"rank_{_rank()}.pt")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng", "rank_0.pt")
    state["rng"] = torch.load(rng_file, weights_only=True)
    return state


def load_model_weights(path: str, model) -> None:
    """Only the model weights of checkpoint ``path``, into ``model`` in place (resharding as needed):
    ``load_from``, a run's initial weights; optimizer, schedule and step start fresh."""
    if not is_checkpoint(path):
        raise EvotuneError(f"load_from {path}: not an evotune checkpoint (checkpoints/step_N with .metadata and "
                           f"{TRAINER_STATE}); a Hugging Face folder goes in pretrained_model_name_or_path")
    loaded = {"model": get_model_state_dict(model)}
    try:
        with _single_process_quiet():
            dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise EvotuneError(f"load_from {path}: does not fit this model ({reason})") from e
    set_model_state_dict(model, loaded["model"])


def _check_fits(path: str, state: dict) -> None:
    """Compare the checkpoint's tensor layout (its ``.metadata``) with this model's and optimizer's:
    one line naming the first tensor that differs, instead of DCP's long traceback."""
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - an unreadable .metadata is one user error
        raise EvotuneError(f"{path}/.metadata cannot be read ({type(e).__name__}): the checkpoint is damaged; "
                           f"resume from an older one with --resume {os.path.dirname(path)}/step_<N>") from None
    flat = _flat({"model": state["model"], "optimizer": {"state": state["optimizer"].get("state", {})}})
    missing = [k for k in flat if k not in saved and isinstance(flat[k], torch.Tensor)]
    if missing:
        what = "optimizer state" if missing[0].startswith("optimizer.") else "model tensor"
        raise EvotuneError(f"--resume {path}: the checkpoint has no {what} {missing[0]} ({len(missing)} missing): it "
                           f"was trained with another {'optimizer' if what != 'model tensor' else 'model'}; resume "
                           "with the config it was trained with")
    for key, value in flat.items():
        md = saved.get(key)
        if isinstance(value, torch.Tensor) and isinstance(md, TensorStorageMetadata) and tuple(md.size) != tuple(
                value.shape):
            raise EvotuneError(f"--resume {path}: {key} is {list(md.size)} in the checkpoint but {list(value.shape)} "
                               "in this model: it was trained with another model shape; resume with the config it "
                               "was trained with")


def _flat(state: dict, prefix: str = "") -> dict:
    """DCP's keys of a nested state dict (``optimizer.state.<param>.exp_avg``; bitsandbytes nests its
    8-bit state one level deeper, ``<param>.__bnb_optimizer_quant_state__.state1``)."""
    flat = {}
    for k, v in state.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def model_tensors(path: str) -> dict[str, tuple[str, object]]:
    """The model tensors of a checkpoint, read from its ``.metadata`` alone:
    ``{transformers name: (DCP key, TensorStorageMetadata)}``; ``SupervisedFinetune``'s ``llm.`` is stripped."""
    metadata = dcp.FileSystemReader(path).read_metadata()
    entries = {key: md for key, md in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    names = [key.removeprefix("model.") for key in entries]
    if all(n.startswith("llm.") for n in names):
        names = [n.removeprefix("llm.") for n in names]
    return {name: (key, md) for name, (key, md) in zip(names, entries.items())}


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint as a transformers state dict (``llm.`` stripped).

    Runs in a plain process, no process group, whatever world size saved it.
    """
    if not is_checkpoint(path):
        raise EvotuneError(f"{path}: not an evotune checkpoint (no .metadata or {TRAINER_STATE})")
    tensors = model_tensors(path)
    model = {key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in tensors.values()}
    with _single_process_quiet():
        dcp.load({"model": model}, checkpoint_id=path, no_dist=True)
    return {name: model[key.removeprefix("model.")] for name, (key, _) in tensors.items()}


def model_plan(path: str) -> dict[str, Planned]:
    """The model weights of a checkpoint as a plan (:mod:`evotune.checkpoint.plan`): each tensor is
    read on its own when written, in a plain process, so an export never holds the whole model."""
    tensors = model_tensors(path)
    if not tensors:
        raise EvotuneError(f"{path}: the checkpoint holds no model.* tensors")

    def loader(key: str):
        def load():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                out = _load_state_dict_from_keys({key}, checkpoint_id=path)
            return out["model"][key.removeprefix("model.")]

        return load

    return {name: Planned(tuple(md.size), md.properties.dtype, loader(key)) for name, (key, md) in tensors.items()}
