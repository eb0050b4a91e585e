"""Write a directory completely or not at all: the one writer behind every folder evotune saves.

Training checkpoints (:mod:`evotune.checkpoint.dcp`), Hugging Face exports
(:mod:`evotune.checkpoint.hf`) and InternEvo shards
(:mod:`evotune.checkpoint.internevo`) are all written through
:class:`AtomicDir`: files go into ``.tmp_<name>`` beside the target, which is
synced and renamed to ``<name>`` once everything is written. A crash leaves
the previous ``<name>`` untouched and, at worst, a leftover ``.tmp_<name>`` or
``.old_<name>`` that :func:`remove_leftovers` (or the next write of the same
target) removes. Checks that belong to every save (free space, leftovers)
belong here: ``need_bytes`` (an estimate of what the write takes) is checked
against the free space before anything is written, and a write that fails
for an OS reason (disk full, quota, permissions, an I/O error) becomes one
:class:`WriteError` line naming the folder, the bytes needed and the bytes
free; the previous ``<name>`` is untouched (docs/reliability.md).

Several ranks can write one folder together (``collective=True``): rank 0
creates the temporary folder, all ranks write into it, and after a barrier
rank 0 renames it; every rank leaves once the rename is done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

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


class WriteError(EvotuneError):
    """A folder could not be written (no space, no permission, I/O error); nothing earlier was lost."""


def free_bytes(path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def os_error_of(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc``: itself, its cause, a DCP rank failure, or torch.save's
    ``PytorchStreamWriter failed writing`` (a RuntimeError on a full disk)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        if isinstance(exc, CheckpointException):
            return next((e for e, _ in exc.failures.values() if isinstance(e, OSError)), None)
        if isinstance(exc, RuntimeError) and ("PytorchStreamWriter failed" in str(exc) or "unexpected pos" in str(exc)):
            return OSError(str(exc).strip().splitlines()[-1])
        exc = exc.__cause__ or exc.__context__
    return None


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

    def __init__(self, target, *, overwrite: bool = False, collective: bool = False, need_bytes: int = 0):
        self.target = Path(target)
        self.need_bytes = need_bytes
        self.tmp = self.target.with_name(TMP_PREFIX + self.target.name)
        self._old = self.target.with_name(OLD_PREFIX + self.target.name)
        self._shared = collective and _distributed()
        self._leader = not self._shared or dist.get_rank() == 0
        if not overwrite and self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise EvotuneError(f"{self.target} exists and is not empty: choose a new directory or pass --overwrite")

    def _barrier(self) -> None:
        if self._shared:
            dist.barrier()

    def _error(self, reason: str) -> WriteError:
        return WriteError(f"writing {self.target} failed: {reason}; it needs about {self.need_bytes} bytes, "
                          f"{free_bytes(self.target.parent)} are free there; earlier saves are intact: free space "
                          "or choose another --work-dir, then resume")

    def __enter__(self) -> Path:
        problem = None
        if self._leader:
            try:
                shutil.rmtree(self.tmp, ignore_errors=True)  # a crashed write of the same target
                # a write replacing the target needs room for both until the rename
                if self.need_bytes > free_bytes(self.target.parent):
                    problem = "not enough free space"
                else:
                    self.target.parent.mkdir(parents=True, exist_ok=True)
                    self.tmp.mkdir()
            except OSError as e:
                problem = e.strerror or str(e)
        if self._shared:  # every rank stops, not only the one that looked
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise self._error(problem)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if not self._shared:
                shutil.rmtree(self.tmp, ignore_errors=True)
            os_error = os_error_of(exc)
            if os_error is not None and not isinstance(exc, EvotuneError):
                raise self._error(os_error.strerror or str(os_error)) from exc
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
