"""Who this process is: rank, world size, device; the process group's life.

Works the same for a plain ``evotune train`` process (one process) and for a
process started by torchrun, srun (``--launcher slurm``, see
:mod:`evotune.parallel.launch`) or another launcher: nccl on CUDA, gloo on CPU.

A process group is started when there are several processes, and also for a
single CUDA process: FSDP2 then gives bf16 compute over fp32 master weights
with the same code as on many GPUs. One CPU process runs without any.

No hang when a rank fails. torchrun stops the other workers itself; for the
other launchers (and as a second line under torchrun) :func:`process_group`
records a failing rank's error in the process group's key-value store, and a
small watcher thread in every rank polls that key once a second and ends its
own process with exit code 1, or quietly with exit code 2 when the failure is an
:class:`~evotune.errors.EvotuneError`: the rank that raised it first prints the
one line (several ranks raising the same error print it once). A rank that dies without raising (killed, out of
memory) is noticed by gloo at once (closed connection) and by nccl after the
process-group timeout: ``EVOTUNE_DIST_TIMEOUT`` seconds, default 1800 (it also
bounds how long ranks wait for rank 0 to index a large dataset). Under slurm,
``srun --kill-on-bad-exit=1`` stops the job at once in that case too.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evotune.errors import EvotuneError
from evotune.parallel.launch import apply_launcher

FAILED_KEY = "evotune/failed"
FAILED_COUNT_KEY = "evotune/failed_count"  # the first rank to fail is the one that explains it
EXPLAINED_KEY = "evotune/failed_explained"  # set when that failure is an EvotuneError (printed by its rank)
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes (collectives are needed to agree on anything)."""
        return self.world_size > 1


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("EVOTUNE_DIST_TIMEOUT", "1800")))


def setup(device: str | None = None, *, launcher: str = "none", cpu_offload: bool = False) -> DistEnv:
    """Read the launcher's variables and start the process group when one is needed.

    ``cpu_offload`` on CUDA adds a gloo backend for CPU tensors (the gradient
    norm of offloaded gradients is reduced on the CPU).
    """
    apply_launcher(launcher)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvotuneError(f"--device {device}: not a device name; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise EvotuneError(f"--device {device}: evotune trains on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvotuneError(f"--device {device}: no CUDA GPU is visible to this process (torch.cuda.is_available() "
                           "is False); use --device cpu, or check the driver and CUDA_VISIBLE_DEVICES")
    if dev.type == "cuda":  # modulo: under srun --gpus-per-task=1 every task sees its one GPU as cuda:0
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if (world > 1 or dev.type == "cuda") and not dist.is_initialized():
        backend = "gloo"
        if dev.type == "cuda":
            backend = "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"
        kwargs = {}
        if world == 1 and "MASTER_ADDR" not in os.environ:  # one CUDA process: a private in-memory store
            kwargs = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend=backend, timeout=timeout(),
                                device_id=dev if dev.type == "cuda" else None, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _FailureWatch:
    """Ends this process when another rank has recorded a failure in the store."""

    def __init__(self, store: dist.Store, rank: int):
        self.store = store
        self.rank = rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evotune-failure-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                failed = self.store.check([FAILED_KEY])
                message = self.store.get(FAILED_KEY).decode(errors="replace") if failed else None
            except Exception as e:  # the store is gone: its host (rank 0 or torchrun) died
                if self._stop.is_set():
                    return
                message = f"the rendezvous store stopped answering ({type(e).__name__})"
            if message is not None:
                with contextlib.suppress(Exception):
                    if self.store.check([EXPLAINED_KEY]):  # the failing rank prints the one line
                        os._exit(2)
                print(f"evotune: stopping rank {self.rank}: {message}", file=sys.stderr, flush=True)
                os._exit(1)

    def report(self, error: BaseException) -> bool:
        """Record ``error`` for the other ranks; True if this rank failed first (it explains the failure)."""
        with contextlib.suppress(Exception):
            if self.store.add(FAILED_COUNT_KEY, 1) != 1:
                return False
            if isinstance(error, EvotuneError):
                self.store.set(EXPLAINED_KEY, "1")
            self.store.set(FAILED_KEY, f"rank {self.rank} failed: {type(error).__name__}: {error}")
        return True

    def explained(self) -> bool:
        """The first failure recorded is an EvotuneError (its rank prints it)."""
        with contextlib.suppress(Exception):
            return self.store.check([EXPLAINED_KEY])
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def process_group(device: str | None = None, *, launcher: str = "none", cpu_offload: bool = False):
    """``setup`` + failure propagation + ``teardown``; yields the :class:`DistEnv`.

    On an exception in this rank the error is recorded for the other ranks
    (which then stop) and re-raised, and the process is left to exit; on
    success all ranks meet at a barrier before the group is destroyed, so no
    rank tears down the store early.
    """
    env = setup(device, launcher=launcher, cpu_offload=cpu_offload)
    watch = _FailureWatch(dist.distributed_c10d._get_default_store(), env.rank) if env.distributed else None
    try:
        yield env
    except BaseException as e:
        if watch is None:
            teardown()
        else:  # no teardown: peers may sit in a collective that would block it
            first = watch.report(e)
            watch.stop()
            if not first and watch.explained():  # another rank's EvotuneError, printed there, came first
                if not isinstance(e, EvotuneError):
                    raise SystemExit(2) from None  # this error follows from it (a peer closed the connection)
                e.explained_by_another_rank = True  # the same error on several ranks: printed once (evotune/cli.py)
        raise
    if watch is not None:
        watch.stop()
        dist.barrier()
    # Free what still holds the process group (FSDP modules and their mesh live in reference cycles)
    # before destroying it: left to the interpreter's exit, gloo's threads were sometimes destroyed
    # still running, and the rank aborted ("terminate called without an active exception").
    gc.collect()
    teardown()
