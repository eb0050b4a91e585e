"""The work dir of one training run: one run at a time, an earlier run kept whole, crash leftovers cleaned.

``evotune train`` writes ``checkpoints/``, ``hf/``, ``metrics.jsonl``,
``eval_samples.jsonl`` and ``tensorboard/`` into its work dir. Three rules keep
two runs from destroying each other's outputs (docs/reliability.md):

* :class:`WorkDirLock`: ``.evotune.lock`` names the host, pid and start time of
  the run using the folder. A second run is refused in one line naming the
  holder; a lock whose process is gone (same host, pid dead or reused) is
  taken over with a message.
* :func:`set_aside_run`: a fresh run moves every output of an earlier run,
  together, into ``<work_dir>.<time>`` and says how to continue it there
  (``--work-dir <that folder> --resume auto``).
* :func:`remove_leftovers`: the temporary folders of a save or export that was
  killed (``.tmp_step_<N>``, ``.tmp_hf``; see :mod:`evotune.checkpoint.atomic`)
  are removed at start, each named.

Only rank 0 calls these; with several nodes the work dir is on a shared
filesystem, so one lock covers the whole job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from evotune.checkpoint import atomic, dcp
from evotune.errors import EvotuneError

LOCK_FILE = ".evotune.lock"
# what a run writes into its work dir (evotune/train/loop.py, evaluate.py, tensorboard.py)
RUN_OUTPUTS = (dcp.CHECKPOINTS, "hf", "hf_adapter", "metrics.jsonl", "eval_samples.jsonl", "tensorboard")


def prepare(work_dir: str) -> None:
    """Create the work dir; a path that is a file or cannot be created is one clear error."""
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise EvotuneError(f"--work-dir {work_dir} is a file, not a folder: choose another --work-dir")
    try:
        os.makedirs(work_dir, exist_ok=True)
    except OSError as e:
        raise EvotuneError(f"--work-dir {work_dir} cannot be created ({e.strerror}): choose another --work-dir")
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise EvotuneError(f"--work-dir {work_dir} is not writable: choose another --work-dir or fix its permissions")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start is None or _process_start(pid) in (None, start)


class WorkDirLock:
    """``.evotune.lock`` in the work dir while a run uses it (``with WorkDirLock(work_dir):``)."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.record, f)
        return True

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # a lock torn by a kill while it was written
            return None

    def acquire(self) -> None:
        for _ in range(3):  # the holder may release between our two looks
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder == {}:
                continue
            if holder is None:
                print(f"evotune: {self.path} could not be read (a run killed while writing it); taking it over")
            elif holder.get("host") != self.record["host"] or _alive(int(holder["pid"]), holder.get("pid_start")):
                raise EvotuneError(
                    f"work dir {os.path.dirname(self.path)} is in use by another evotune train (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}); wait for it "
                    f"to end or choose another --work-dir (if that run is gone, delete {self.path})")
            else:
                print(f"evotune: taking over the lock of a run that is gone (host {holder['host']}, pid "
                      f"{holder['pid']}, started {holder.get('started')})")
            tmp = f"{self.path}.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
            os.replace(tmp, self.path)
            if self._holder() == self.record:  # two runs taking over at once: the last rename wins
                self.held = True
                return
        raise EvotuneError(f"{self.path}: another run keeps taking the lock; choose another --work-dir")

    def release(self) -> None:
        if self.held and self._holder() == self.record:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def set_aside_run(work_dir: str) -> str | None:
    """Move an earlier run's outputs (all of :data:`RUN_OUTPUTS` there are) into ``<work_dir>.<time>``.

    A fresh run must neither overwrite them nor mix with them (``--resume auto``
    would pick the wrong checkpoint, pruning could delete the new ones). Returns
    the folder they went to, or None when there was nothing.
    """
    present = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(work_dir, name))]
    if not present:
        return None
    base = f"{os.path.normpath(work_dir)}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while os.path.exists(aside):
        aside, n = f"{base}-{n}", n + 1
    os.makedirs(aside)
    for name in present:
        os.replace(os.path.join(work_dir, name), os.path.join(aside, name))
    found = dcp.list_checkpoints(dcp.checkpoints_dir(aside))
    how = (f"continue it with --work-dir {aside} --resume auto (from step {found[-1][0]})" if found
           else "it has no complete checkpoint to continue from")
    print(f"evotune: {work_dir} held an earlier run ({', '.join(present)}); moved to {aside}: {how}")
    return aside


def remove_leftovers(work_dir: str) -> list[str]:
    """Remove what killed saves and exports left in the work dir and its checkpoints; returns their names."""
    removed = []
    for parent in (Path(work_dir), Path(dcp.checkpoints_dir(work_dir))):
        if parent.is_dir():
            names = [p.name for p in parent.iterdir() if p.name.startswith((atomic.TMP_PREFIX, atomic.OLD_PREFIX))]
            atomic.remove_leftovers(parent)
            removed += [str(parent / name) for name in names]
    for path in removed:
        print(f"evotune: cleaned {path}, left by a save or export that did not finish")
    return removed
