"""Write a directory completely or not at all: the one writer behind every folder evotune saves.

Training checkpoints (:mod:`evotune.checkpoint.dcp`), Hugging Face exports
(:mod:`evotune.checkpoint.hf`) and InternEvo shards
(:mod:`evotune.checkpoint.internevo`) are all written through
:class:`AtomicDir`: files go into ``.tmp_<name>`` beside the target, which is
synced and renamed to ``<name>`` once everything is written. A crash leaves
the previous ``<name>`` untouched and, at worst, a leftover ``.tmp_<name>`` or
``.old_<name>`` that :func:`remove_leftovers` (or the next write of the same
target) removes. Checks that belong to every save (free space, leftovers)
belong here.

Several ranks can write one folder together (``collective=True``): rank 0
creates the temporary folder, all ranks write into it, and after a barrier
rank 0 renames it; every rank leaves once the rename is done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from evotune.errors import EvotuneError

TMP_PREFIX = ".tmp_"
OLD_PREFIX = ".old_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class AtomicDir:
    """``with AtomicDir(target) as tmp:`` write into ``tmp``; on success it becomes ``target``.

    ``overwrite=False`` refuses an existing non-empty ``target`` at once (before
    any work); ``overwrite=True`` replaces it, by rename, only once the new
    folder is complete. On an error inside the block the temporary folder is
    removed (left for :func:`remove_leftovers` when ranks write together, as
    the others may still be writing into it).
    ``collective=True``: every rank of the default process group enters the
    block with the same ``target`` (see the module docstring).
    """

    def __init__(self, target, *, overwrite: bool = False, collective: bool = False):
        self.target = Path(target)
        self.tmp = self.target.with_name(TMP_PREFIX + self.target.name)
        self._old = self.target.with_name(OLD_PREFIX + self.target.name)
        self._shared = collective and _distributed()
        self._leader = not self._shared or dist.get_rank() == 0
        if not overwrite and self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise EvotuneError(f"{self.target} exists and is not empty: choose a new directory or pass --overwrite")

    def _barrier(self) -> None:
        if self._shared:
            dist.barrier()

    def __enter__(self) -> Path:
        if self._leader:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)  # a crashed write of the same target
            self.tmp.mkdir()
        self._barrier()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if not self._shared:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self._barrier()
        if self._leader:
            self._commit()
        self._barrier()
        return False

    def _commit(self) -> None:
        _fsync_dir(self.tmp)
        if self.target.exists():
            os.replace(self.target, self._old)
            os.replace(self.tmp, self.target)
            _remove(self._old)
        else:
            os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)


def remove_leftovers(parent) -> None:
    """Clean what crashed writes left in ``parent``: ``.tmp_<name>`` folders are deleted; an
    ``.old_<name>`` whose ``<name>`` is missing (a crash between the two renames) is put back."""
    parent = Path(parent)
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            _remove(entry)
        elif entry.name.startswith(OLD_PREFIX):
            original = parent / entry.name[len(OLD_PREFIX):]
            if original.exists():
                _remove(entry)
            else:
                os.replace(entry, original)
