"""How processes are started: torchrun re-launch, slurm, or an external launcher.

Three ways in, as XTuner users know them:

* ``NPROC_PER_NODE=8 [NNODES=2 NODE_RANK=0 ADDR=host PORT=29500] evotune train CFG``:
  the command re-launches itself under torchrun (``python -m
  torch.distributed.run``) with the same arguments plus ``--launcher pytorch``.
  torchrun watches its workers: when one fails it stops the others and exits
  non-zero.
* ``srun ... evotune train CFG --launcher slurm``: every task is one rank; rank,
  world size and local rank come from ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the master address is the first host of the job's node
  list; the port is ``MASTER_PORT`` or ``PORT`` or :data:`DEFAULT_PORT`.
* ``--launcher pytorch``: an external launcher already set ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

This module only computes command lines and environment variables; the process
group itself is set up in :mod:`evotune.parallel.env`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping

from evotune.errors import EvotuneError

LAUNCHERS = ("none", "pytorch", "slurm")
DEFAULT_PORT = 29500


def _int_env(environ: Mapping[str, str], name: str, default: str | None = None, minimum: int = 1) -> int:
    text = environ.get(name, default)
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise EvotuneError(f"environment variable {name}={text!r} must be a whole number") from None
    if value < minimum:
        raise EvotuneError(f"environment variable {name}={text!r} must be at least {minimum}")
    return value


def torchrun_args(environ: Mapping[str, str]) -> list[str] | None:
    """torchrun's options from ``NPROC_PER_NODE``/``NNODES``/``NODE_RANK``/``ADDR``/``PORT``.

    None when no re-launch is asked for (neither several processes per node nor
    several nodes). One node without ``ADDR``/``PORT`` uses ``--standalone``
    (torchrun picks a free port, so several jobs can share a machine).
    """
    if "NPROC_PER_NODE" not in environ:
        return None
    nproc = _int_env(environ, "NPROC_PER_NODE")
    nnodes = _int_env(environ, "NNODES", "1")
    if nproc == 1 and nnodes == 1:
        return None
    args = ["--nproc-per-node", str(nproc)]
    if nnodes > 1:
        if not environ.get("ADDR"):
            raise EvotuneError(f"NNODES={nnodes} needs ADDR=<address of the node with NODE_RANK=0> (and PORT)")
        node_rank = _int_env(environ, "NODE_RANK", "0", minimum=0)
        if node_rank >= nnodes:
            raise EvotuneError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
    if environ.get("ADDR") or environ.get("PORT"):
        args += ["--master-addr", environ.get("ADDR") or "127.0.0.1",
                 "--master-port", str(_int_env(environ, "PORT", str(DEFAULT_PORT)))]
    else:
        args.append("--standalone")
    return args


# Worker exit codes that come with the worker's own one-line explanation: an EvotuneError (2,
# evotune/cli.py) or a stop on a signal after a checkpoint (75, evotune/train/preempt.py).
EXPLAINED_EXIT_CODES = (2, 75)
_TORCHRUN = "import sys; from evotune.parallel.launch import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))"


def torchrun_command(train_argv: list[str], environ: Mapping[str, str]) -> list[str] | None:
    """The full command that runs ``evotune train <train_argv>`` under torchrun (:func:`run_torchrun`), or None."""
    args = torchrun_args(environ)
    if args is None:
        return None
    return [sys.executable, "-c", _TORCHRUN, *args,
            "-m", "evotune.cli", "train", *train_argv, "--launcher", "pytorch"]


class _HideExplainedFailures(logging.Filter):
    """Drops torchrun's "failed (exitcode: 2)" log lines: the worker printed the reason already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f"exitcode: {code})" in record.getMessage() for code in EXPLAINED_EXIT_CODES)


def run_torchrun(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``), returning the workers' exit code.

    A worker that exits with one of :data:`EXPLAINED_EXIT_CODES` has printed
    why; torchrun would add its ``ChildFailedError`` traceback and exit 1, so
    the user saw the reason buried and the code lost (slurm requeues on 75).
    Other failures keep torchrun's report.
    """
    from torch.distributed import run as torchrun  # torch only in the torchrun process, not the launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_HideExplainedFailures())
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        if code in EXPLAINED_EXIT_CODES:
            return code
        raise
    return 0


def relaunch(command: list[str]) -> int:
    """Run ``command`` (torchrun) in the foreground; SIGTERM is passed on to it. Returns its exit code."""
    child = subprocess.Popen(command)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun as well; wait for it to stop its workers
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- slurm

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '['")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_host(pattern: str) -> list[str]:
    """``node[01-03,7]-ib`` -> node01-ib, node02-ib, node03-ib, node7-ib (several bracket groups allowed)."""
    open_ = pattern.find("[")
    if open_ < 0:
        return [pattern]
    close = pattern.index("]", open_)
    prefix, body, rest = pattern[:open_], pattern[open_ + 1:close], pattern[close + 1:]
    hosts = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            hosts.extend(prefix + str(n).zfill(width) + tail for tail in _expand_host(rest))
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a slurm node list (``a,b``, ``node[1-3]``, ``gpu[01-02,05],cpu1``)."""
    try:
        hosts = [h for part in _split_top(nodelist.strip()) for h in _expand_host(part)]
    except ValueError as e:
        raise EvotuneError(f"SLURM_NODELIST={nodelist!r} cannot be read ({e}); set MASTER_ADDR to the first host") from None
    if not hosts:
        raise EvotuneError(f"SLURM_NODELIST={nodelist!r} names no host; set MASTER_ADDR to the first host")
    return hosts


def launcher_environ(launcher: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for ``launcher``.

    ``none``: {} (one process, unless a launcher already set ``WORLD_SIZE``);
    ``pytorch``: checks the variables are there; ``slurm``: derives them.
    """
    if launcher not in LAUNCHERS:
        raise EvotuneError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "none":
        return {}
    if launcher == "pytorch":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise EvotuneError(f"--launcher pytorch: {', '.join(missing)} not set; start the command with torchrun "
                               "(or use NPROC_PER_NODE=N evotune train ..., or --launcher slurm under srun)")
        return {}
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS") if not environ.get(k)]
    if missing:
        raise EvotuneError(f"--launcher slurm: {', '.join(missing)} not set; run the command with srun")
    rank = _int_env(environ, "SLURM_PROCID", minimum=0)
    world = _int_env(environ, "SLURM_NTASKS")
    if rank >= world:
        raise EvotuneError(f"SLURM_PROCID={rank} must be below SLURM_NTASKS={world}")
    local_rank = _int_env(environ, "SLURM_LOCALID", "0", minimum=0)
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST")
                    or environ.get("SLURM_JOB_NODELIST"))
        if not nodelist:
            raise EvotuneError("--launcher slurm: SLURM_NODELIST not set; run under srun or set MASTER_ADDR")
        addr = expand_nodelist(nodelist)[0]
    port = environ.get("MASTER_PORT") or environ.get("PORT") or str(DEFAULT_PORT)
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
           "MASTER_ADDR": addr, "MASTER_PORT": str(_int_env({"MASTER_PORT": port}, "MASTER_PORT"))}
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        out["LOCAL_WORLD_SIZE"] = environ["SLURM_NTASKS_PER_NODE"]
    return out


def apply_launcher(launcher: str) -> None:
    """Put the launcher's variables into ``os.environ`` (before the process group starts)."""
    os.environ.update(launcher_environ(launcher, os.environ))
