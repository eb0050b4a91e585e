"""``evotune migrate``: turn an InternEvo training config into an evotune config.

An InternEvo config is a Python file of ``data = dict(...)``, ``model = dict(...)``,
``parallel = dict(...)``, ``ckpt = dict(...)``, ``adam = dict(...)`` ... Running it
would run arbitrary code, so it is *evaluated*, not executed: only assignments
of literals, ``dict()``/``list()``/... calls, arithmetic, f-strings, subscripts
and names defined on earlier lines are accepted; anything else is an error
naming the line.

The translation keeps the training the same where evotune can:

* **Packs** are identical: ``max_length = seq_len * micro_bsz`` (InternEvo's
  ``packed_length``), ``max_length_per_sample = seq_len``, same ``min_length``,
  ``pack_sample_into_one`` and seed.
* **Packs per optimizer step** are identical. InternEvo's data-parallel size is
  ``world / (tensor * pipeline)`` in every tensor mode (mtp, msp, fsp, isp: the
  tensor ranks of isp are sequence-parallel ranks that share their packs;
  weight parallel does not change it). evotune's is ``world / sequence_parallel_size``.
  ``accumulative_counts`` is chosen so that
  ``dp * batch_size * accumulative_counts`` equals InternEvo's ``dp * micro_num``;
  with the packs equal, tokens per step are equal too, and the packs of global
  step *s* are the same contiguous block of InternEvo's global permutation
  (only their assignment to ranks differs), so loss and gradients are the same.
  When no integer fits, the error proposes the nearest world sizes.
* **Optimizer and schedule**: AdamW with InternEvo's lr, betas, eps, weight decay
  and clip; InternEvo's warm-up (``lr * (step + 1) / W``, ``W = int(total * ratio)``)
  and cosine to ``eta_min`` written as two phases that reproduce it step by step.

Every other key is reported in a table as *mapped*, *changed meaning*, *not
needed* (performance or infrastructure knobs without an effect on the
mathematics) or *unsupported*; the written config carries a comment naming the
InternEvo key on every translated line.
"""

from __future__ import annotations

import argparse
import ast
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any

from evotune.errors import EvotuneError

MAPPED = "mapped"
CHANGED = "changed meaning"
NOT_NEEDED = "not needed"
UNSUPPORTED = "unsupported"

SEQUENCE_MODES = ("msp", "fsp", "isp")  # tensor modes whose ranks split the sequence
TENSOR_MODES = ("mtp",) + SEQUENCE_MODES

# --------------------------------------------------------------------------------------------
# Safe evaluation of an InternEvo config file
# --------------------------------------------------------------------------------------------

_CALLS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "int": int, "float": float, "str": str,
    "bool": bool, "min": min, "max": max, "abs": abs, "round": round, "len": len,
}
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_MAX_SIZE = 1_000_000  # longest string/list an expression may build (a config is small)


@dataclass
class InternEvoConfig:
    """The top-level names of an InternEvo config and the line of every (nested) key."""

    path: str
    values: dict[str, Any]
    lines: dict[str, int]  # "data.micro_num" -> line number

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def has(self, dotted: str) -> bool:
        sentinel = object()
        return self.get(dotted, sentinel) is not sentinel


class _Evaluator:
    """Evaluate the expressions of one config file against the names defined so far."""

    def __init__(self, path: str):
        self.path = path
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, what: str) -> EvotuneError:
        return EvotuneError(
            f"{self.path}:{getattr(node, 'lineno', '?')}: {what}; an InternEvo config can be migrated only "
            f"when it defines constants (literals, dict(...), arithmetic, names defined above)"
        )

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"'{ast.unparse(node)}' is not allowed")
        value = method(node)
        if isinstance(value, (str, list, tuple, bytes)) and len(value) > _MAX_SIZE:
            raise self.fail(node, f"'{ast.unparse(node)}' builds a value of {len(value)} items")
        return value

    def _Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        raise self.fail(node, f"name '{node.id}' is not defined above this line")

    def _List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    def _Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.eval(e) for e in node.elts)

    def _Set(self, node: ast.Set) -> set:
        return {self.eval(e) for e in node.elts}

    def _Dict(self, node: ast.Dict) -> dict:
        out: dict = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                out.update(self._mapping(v))
            else:
                out[self.eval(k)] = self.eval(v)
        return out

    def _mapping(self, node: ast.AST) -> dict:
        value = self.eval(node)
        if not isinstance(value, dict):
            raise self.fail(node, f"'**{ast.unparse(node)}' is not a dict")
        return value

    def _BinOp(self, node: ast.BinOp) -> Any:
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator in '{ast.unparse(node)}' is not allowed")
        left, right = self.eval(node.left), self.eval(node.right)
        if op is operator.pow and isinstance(right, (int, float)) and abs(right) > 1024:
            raise self.fail(node, f"exponent {right} is too large")
        try:
            return op(left, right)
        except Exception as e:  # noqa: BLE001 - any arithmetic error is the config's
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {e}") from None

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator in '{ast.unparse(node)}' is not allowed")
        return op(self.eval(node.operand))

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        value = None
        for operand in node.values:
            value = self.eval(operand)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _Subscript(self, node: ast.Subscript) -> Any:
        container, key = self.eval(node.value), self.eval(node.slice)
        try:
            return container[key]
        except (KeyError, IndexError, TypeError) as e:
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {type(e).__name__} {e}") from None

    def _Slice(self, node: ast.Slice) -> slice:
        parts = [None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def _JoinedStr(self, node: ast.JoinedStr) -> str:
        return "".join(str(self.eval(v)) for v in node.values)

    def _FormattedValue(self, node: ast.FormattedValue) -> str:
        value = self.eval(node.value)
        if node.conversion == ord("r"):
            value = repr(value)
        elif node.conversion == ord("s"):
            value = str(value)
        spec = self.eval(node.format_spec) if node.format_spec is not None else ""
        return format(value, spec)

    def _Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in _CALLS or node.func.id in self.names:
            raise self.fail(node, f"call '{ast.unparse(node.func)}(...)' is not allowed "
                                  f"(allowed: {', '.join(sorted(_CALLS))})")
        args = [self.eval(a) for a in node.args if not isinstance(a, ast.Starred)]
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, "'*args' is not allowed")
        kwargs: dict = {}
        for kw in node.keywords:
            if kw.arg is None:
                kwargs.update(self._mapping(kw.value))
            else:
                kwargs[kw.arg] = self.eval(kw.value)
        try:
            return _CALLS[node.func.id](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bad call is the config's error
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {e}") from None


def _key_lines(node: ast.AST, prefix: str, lines: dict[str, int]) -> None:
    """Record the line of every key of a ``dict(...)`` call or ``{...}`` literal, recursively."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for kw in node.keywords:
            if kw.arg is not None:
                lines[f"{prefix}.{kw.arg}"] = kw.value.lineno
                _key_lines(kw.value, f"{prefix}.{kw.arg}", lines)
    elif isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                lines[f"{prefix}.{k.value}"] = k.lineno
                _key_lines(v, f"{prefix}.{k.value}", lines)


def read_internevo_config(path: str | os.PathLike) -> InternEvoConfig:
    """Evaluate an InternEvo config file safely (no imports, no calls but ``dict``/``int``/...).

    Raises :class:`EvotuneError` naming the file and line of anything else.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvotuneError(f"InternEvo config '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise EvotuneError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    ev = _Evaluator(path)
    lines: dict[str, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string used as a comment block
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            raise ev.fail(stmt, f"'{ast.unparse(stmt)}': imports are not allowed "
                                f"(replace values read from modules or the environment by literals)")
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
            targets, value_node = [stmt.target], stmt.value
        elif isinstance(stmt, ast.Assign):
            targets, value_node = stmt.targets, stmt.value
        else:
            kind = type(stmt).__name__.lower()
            raise ev.fail(stmt, f"a '{kind}' statement is not allowed")
        value = ev.eval(value_node)
        for target in targets:
            if isinstance(target, ast.Name):
                ev.names[target.id] = value
                lines[target.id] = stmt.lineno
                _key_lines(value_node, target.id, lines)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                container, key = ev.eval(target.value), ev.eval(target.slice)
                if not isinstance(container, dict):
                    raise ev.fail(stmt, f"'{ast.unparse(target)}': only dict items can be assigned")
                container[key] = value
                lines[f"{target.value.id}.{key}"] = stmt.lineno
            else:
                raise ev.fail(stmt, f"assignment to '{ast.unparse(target)}' is not allowed")
    return InternEvoConfig(path, ev.names, lines)


# --------------------------------------------------------------------------------------------
# Batch-size arithmetic
# --------------------------------------------------------------------------------------------


def _size(value: Any, default: int = 1) -> int:
    """InternEvo accepts ``zero1=8`` and ``zero1=dict(size=8)`` alike."""
    if value is None:
        return default
    if isinstance(value, dict):
        return int(value.get("size", default))
    return int(value)


@dataclass(frozen=True)
class InternEvoParallel:
    """The parallel layout InternEvo derives from ``parallel`` and the world size."""

    world_size: int
    tensor: int
    mode: str
    pipeline: int
    weight: int
    zero1: int  # as written: <= 0 means "all of the (weight-)data-parallel group"

    @property
    def data_parallel_size(self) -> int:
        # parallel_context.init_parallel_groups: sequence_parallel_size = tensor size,
        # data_parallel_size = world // pipeline // sequence_parallel_size, in every mode.
        return self.world_size // (self.pipeline * self.tensor)

    @property
    def weight_data_parallel_size(self) -> int:
        return self.world_size // (self.pipeline * self.weight)

    @property
    def zero_group(self) -> int:
        """Ranks one optimizer state is sharded over (InternEvo's zero1_parallel_size)."""
        group = self.weight_data_parallel_size if self.mode == "isp" else self.data_parallel_size
        return group if self.zero1 <= 0 else self.zero1

    def problems(self) -> list[str]:
        """What InternEvo's own checks would reject at this world size."""
        out = []
        if self.world_size % (self.tensor * self.pipeline):
            out.append(f"world size {self.world_size} is not a multiple of tensor {self.tensor} x "
                       f"pipeline {self.pipeline}")
        if self.world_size % (self.weight * self.pipeline):
            out.append(f"world size {self.world_size} is not a multiple of weight {self.weight} x "
                       f"pipeline {self.pipeline}")
        if not out and self.zero1 > 1:
            group = self.weight_data_parallel_size if self.mode == "isp" else self.data_parallel_size
            name = "weight data parallel size" if self.mode == "isp" else "data parallel size"
            if group % self.zero1:
                out.append(f"zero1 size {self.zero1} does not divide the {name} {group}")
        return out


def internevo_parallel(parallel: dict | None, world_size: int) -> InternEvoParallel:
    """InternEvo's layout for ``parallel`` at ``world_size`` (defaults as launch.py sets them)."""
    parallel = parallel or {}
    tensor = parallel.get("tensor", 1)
    mode = (tensor.get("mode") if isinstance(tensor, dict) else None) or "mtp"
    if mode not in TENSOR_MODES:
        raise EvotuneError(f"parallel.tensor.mode '{mode}' is not one of InternEvo's modes {TENSOR_MODES}")
    return InternEvoParallel(
        world_size=int(world_size), tensor=_size(tensor), mode=mode, pipeline=_size(parallel.get("pipeline")),
        weight=_size(parallel.get("weight")), zero1=_size(parallel.get("zero1"), default=-1),
    )


def smallest_internevo_world(parallel: dict | None) -> int:
    """The smallest world size at which InternEvo accepts ``parallel``."""
    base = internevo_parallel(parallel, 1)
    step = math.lcm(base.tensor * base.pipeline, base.weight * base.pipeline)
    world = step
    while internevo_parallel(parallel, world).problems():
        world += step
    return world


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step on both sides; the tokens are equal by construction."""

    internevo: InternEvoParallel
    seq_len: int
    micro_bsz: int
    micro_num: int
    world_size: int
    sequence_parallel_size: int
    accumulative_counts: int
    batch_size: int = 1

    @property
    def max_length(self) -> int:
        return self.seq_len * self.micro_bsz

    @property
    def packs_per_step(self) -> int:
        return self.internevo.data_parallel_size * self.micro_num

    @property
    def internevo_tokens_per_step(self) -> int:
        return self.internevo.data_parallel_size * self.micro_num * self.micro_bsz * self.seq_len

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def tokens_per_step(self) -> int:
        return self.data_parallel_size * self.batch_size * self.accumulative_counts * self.max_length


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def nearest_world_sizes(packs_per_step: int, sequence_parallel_size: int, world_size: int) -> list[int]:
    """The nearest world sizes below and above ``world_size`` whose dp divides ``packs_per_step``."""
    fits = [sequence_parallel_size * d for d in _divisors(packs_per_step)]
    below = [w for w in fits if w < world_size]
    above = [w for w in fits if w > world_size]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def plan_batch(internevo: InternEvoParallel, seq_len: int, micro_bsz: int, micro_num: int, world_size: int,
               sequence_parallel_size: int | None = None, num_heads: int | None = None) -> BatchPlan:
    """Choose evotune's sequence parallel size and accumulation for the same packs per step.

    ``sequence_parallel_size=None``: start from InternEvo's sequence-parallel degree
    (the tensor size for msp/fsp/isp, 1 for mtp) and take the smallest size up to
    tensor * pipeline (the GPUs of one InternEvo replica, where dp is InternEvo's
    own) that divides the world and makes the accumulation an integer; when
    ``num_heads`` (Ulysses gives every rank heads / sp heads) rules those out,
    the largest smaller size that fits.
    """
    packs = internevo.data_parallel_size * micro_num
    start = internevo.tensor if internevo.mode in SEQUENCE_MODES else 1

    def splits_heads(sp: int) -> bool:
        return not num_heads or num_heads % sp == 0

    if sequence_parallel_size is not None:
        candidates = [int(sequence_parallel_size)]
        if world_size % candidates[0]:
            raise EvotuneError(f"--sequence-parallel-size {candidates[0]} does not divide the world size "
                               f"{world_size}")
        if not splits_heads(candidates[0]):
            raise EvotuneError(f"--sequence-parallel-size {candidates[0]}: the model's {num_heads} attention heads "
                               f"cannot be split over {candidates[0]} ranks; choose a divisor of {num_heads}")
    else:
        limit = max(start, internevo.tensor * internevo.pipeline)
        usable = [sp for sp in _divisors(world_size) if splits_heads(sp)]
        candidates = ([sp for sp in usable if start <= sp <= limit]
                      + sorted((sp for sp in usable if sp < start), reverse=True)) or [start]
    for sp in candidates:
        dp = world_size // sp
        if world_size % sp == 0 and packs % dp == 0:
            return BatchPlan(internevo, seq_len, micro_bsz, micro_num, world_size, sp, packs // dp)
    sp = candidates[0]
    dp = max(world_size // sp, 1)
    proposals = ", ".join(
        f"{w} (dp {w // sp}, accumulative_counts {packs // (w // sp)})"
        for w in nearest_world_sizes(packs, sp, world_size)
    )
    other_sp = [s for s in _divisors(world_size)
                if s != sp and splits_heads(s) and packs % (world_size // s) == 0]
    alt = (f"; or keep {world_size} GPUs with --sequence-parallel-size "
           f"{' or '.join(str(s) for s in other_sp[:3])}") if other_sp else ""
    raise EvotuneError(
        f"no integer accumulation fits: InternEvo trains {packs} packs of {seq_len * micro_bsz} tokens per "
        f"optimizer step (dp {internevo.data_parallel_size} x micro_num {micro_num}); evotune on {world_size} "
        f"GPUs with sequence_parallel_size {sp} has dp {dp}, and {packs} packs do not split evenly over {dp} "
        f"ranks. Nearest world sizes that keep the batch exactly: {proposals} (--target-world-size){alt}"
    )


# --------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One InternEvo key and what became of it."""

    key: str
    value: Any
    status: str
    target: str = ""
    note: str = ""


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


# Top-level InternEvo names that only steer infrastructure (alerts, cuDNN, logging).
_TOP_NOT_NEEDED = {
    "model_type": "evotune reads the architecture from the checkpoint",
    "monitor": "Feishu alerts and light monitor are not part of evotune",
    "cudnn_deterministic": "no cuDNN kernels in a transformer's training step",
    "cudnn_benchmark": "no cuDNN kernels in a transformer's training step",
    "use_fp32_norm": "FSDP mixed precision keeps master weights in float32",
    "metric_dtype": "evotune computes metrics in float64",
    "enable_tb": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "tensorboard_folder": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "resume_tb_folder": "metrics go to <work_dir>/metrics.jsonl; `evotune plot` draws them",
    "alert_address": "alerts are not part of evotune",
    "selective_checkpoint": "activation checkpointing is per layer (activation_checkpointing)",
    "selective_checkpoint_offload": "activation checkpointing is per layer (activation_checkpointing)",
    "grad_scaler": "fp16 loss scaling: evotune trains in bfloat16 or float32, which need none",
}
_TOP_HANDLED = {"data", "model", "parallel", "ckpt", "adam", "lr_scheduler", "beta2_scheduler", "loss",
                "hybrid_zero_optimizer"}

# Keys whose value does not change the mathematics of training.
_KEY_NOT_NEEDED = {
    "data.valid_micro_num": "evotune validates every pack of valid_folder",
    "data.empty_cache_and_diag_interval": "a CUDA cache/diagnosis interval",
    "data.diag_outlier_ratio": "a straggler diagnosis threshold",
    "data.num_worker": "evotune reads packs from memory-mapped files in a prefetch thread",
    "data.fixed_random_dataset_seqlen": "applies to InternEvo's random dataset only",
    "data.use_shm": "evotune memory-maps its token index",
    "data.packed_length": "InternEvo overwrites it with seq_len * micro_bsz",
    "data.gradient_accumulation": "InternEvo sets it to micro_num",
    "hybrid_zero_optimizer.overlap_sync_grad": "FSDP2 overlaps communication by itself",
    "hybrid_zero_optimizer.overlap_sync_param": "FSDP2 overlaps communication by itself",
    "hybrid_zero_optimizer.reduce_bucket_size": "FSDP2 reduces per layer",
    "hybrid_zero_optimizer.use_split_tensor_optim": "an InternEvo optimizer implementation detail",
    "hybrid_zero_optimizer.zero_overlap_communication": "FSDP2 overlaps communication by itself",
    "loss.op_type": "evotune always uses its chunked cross-entropy (same values, no full logits)",
    "lr_scheduler.last_epoch": "a fresh schedule starts at step 0",
    "beta2_scheduler.init_beta2": "beta2 is adam.adam_beta2",
    "beta2_scheduler.cur_iter": "a fresh schedule starts at step 0",
    "ckpt.async_upload": "object-store upload: evotune writes to a file system",
    "ckpt.async_upload_tmp_folder": "object-store upload: evotune writes to a file system",
    "ckpt.oss_snapshot_freq": "object-store snapshots: evotune writes atomic checkpoints",
    "ckpt.snapshot_ckpt_folder": "object-store snapshots: evotune writes atomic checkpoints",
    "ckpt.stop_file_path": "stop a run with Ctrl-C or by killing it; resume with --resume auto",
    "ckpt.load_optimizer": "evotune resumes its own checkpoints with --resume (optimizer included)",
    "ckpt.enable_save_ckpt": "evotune saves every save_steps and exports a Hugging Face model at the end",
    "model.use_flash_attn": "evotune picks the varlen kernel of the device",
    "model.parallel_output": "a tensor-parallel head detail",
    "model.embed_split_hidden": "a tensor-parallel embedding detail, read from the checkpoint",
    "model.num_chunks": "interleaved pipeline chunks: evotune has no pipeline",
    "model.norm_type": "read from the checkpoint",
    "model.mlp_ratio": "the FFN width is read from the checkpoint",
    "model.multiple_of": "the FFN width is read from the checkpoint",
    "model.no_bias": "read from the checkpoint",
    "model.qk_interleaved": "read from the checkpoint (InternEvo folders are converted when loaded)",
    "model.adapt_hf": "read from the checkpoint (InternEvo folders are converted when loaded)",
    "model.norm_head": "read from the checkpoint",
    "model.use_swiglu": "read from the checkpoint",
    "model.residual_in_fp32": "FSDP mixed precision keeps master weights in float32",
    "model.max_position_embeddings": "read from the checkpoint",
    "model.init_type": "weights come from the checkpoint",
    "model.layer_norm_epsilon": "read from the checkpoint",
    "model.rope_base": "read from the checkpoint",
    "parallel.pipeline.interleaved_overlap": "evotune has no pipeline",
    "parallel.weight.overlap": "FSDP2 prefetches the next layer by itself",
    "parallel.weight.memory_pool": "FSDP2 manages its buffers",
    "parallel.weight.launch_allgather_before": "FSDP2 prefetches the next layer by itself",
    "parallel.weight.forward_overlap_per": "FSDP2 prefetches the next layer by itself",
    "parallel.sequence_parallel": "follows parallel.tensor.mode",
}
# Model dimensions compared with the checkpoint: InternEvo key -> config.json key(s).
_DIMS = {
    "num_layers": ("num_layers", "num_hidden_layers"),
    "hidden_size": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_kv_attention_heads": ("num_kv_attention_heads", "num_key_value_heads"),
}
_REMOTE_PREFIXES = ("boto3:", "oss2:", "volc:", "s3:")


def _strip_local(path: Any) -> Any:
    return path[len("local:"):] if isinstance(path, str) and path.startswith("local:") else path


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _checkpoint_dims(path: str) -> dict[str, Any] | None:
    """The checkpoint's own dimensions (config.json or model_config.pt), or None when not readable here."""
    import json

    if not os.path.isdir(path):
        return None
    cfg_json = os.path.join(path, "config.json")
    if os.path.isfile(cfg_json):
        try:
            with open(cfg_json, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvotuneError(f"{cfg_json}: cannot read the checkpoint's config ({e})") from None
    if os.path.isfile(os.path.join(path, "model_config.pt")):
        from evotune.checkpoint.internevo import load_model_config

        return load_model_config(path)
    return None


class _Translator:
    """Walk the InternEvo config once, collecting evotune settings and the table rows."""

    def __init__(self, cfg: InternEvoConfig):
        self.cfg = cfg
        self.rows: list[Row] = []
        self.handled: set[str] = set()
        self.settings: dict[str, tuple[Any, str]] = {}  # evotune setting -> (value, comment)
        self.work_dir: str | None = None  # ckpt.save_ckpt_folder
        self.eta_min = 0.0  # lr_scheduler.eta_min
        self.schedule_steps: int | None = None  # lr_scheduler.total_steps when it differs from data.total_steps

    def src(self, key: str) -> str:
        line = self.cfg.lines.get(key)
        return f"{key} (line {line})" if line else key

    def row(self, key: str, status: str, target: str = "", note: str = "", value: Any = None) -> None:
        self.handled.add(key)
        self.rows.append(Row(key, self.cfg.get(key, value), status, target, note))

    def set(self, name: str, value: Any, comment: str) -> None:
        self.settings[name] = (value, comment)

    def take(self, key: str, default: Any = None) -> Any:
        self.handled.add(key)
        return self.cfg.get(key, default)

    # -- data ------------------------------------------------------------------------------
    def data(self, plan: BatchPlan) -> None:
        c = self.cfg
        dtype = c.get("data.type", "tokenized")
        if c.has("data.type"):
            if dtype == "tokenized":
                self.row("data.type", MAPPED, "load_intern_repo_tokenized_dataset", "InternEvo tokenized folders")
            else:
                self.row("data.type", UNSUPPORTED, "",
                         f"'{dtype}' data: tokenize it first with `evotune tokenize` and point dataset_folder "
                         f"at the output's train/ folder")
        folder = _strip_local(c.get("data.train_folder"))
        if folder is None:
            self.row("data.train_folder", UNSUPPORTED, "dataset_folder",
                     "None trains InternEvo on random tokens; set dataset_folder to an InternEvo tokenized folder")
            self.set("dataset_folder", "/path/to/your/dataset", f"{self.src('data.train_folder')} was None")
        else:
            self.row("data.train_folder", MAPPED, "dataset_folder")
            self.set("dataset_folder", folder, self.src("data.train_folder"))
        self.set("data_order_path", None,
                 "evotune: walk the folder in sorted order as InternEvo intends; see `evotune data-order`")
        min_length = self.take("data.min_length", 0)
        if c.has("data.min_length"):
            self.row("data.min_length", MAPPED, "min_length")
        self.set("min_length", min_length, self.src("data.min_length") if c.has("data.min_length")
                 else "data.min_length (absent: InternEvo's default 0)")
        if c.get("data.min_length_dict"):
            self.row("data.min_length_dict", UNSUPPORTED, "min_length",
                     "per-type minimum lengths: evotune has one min_length for all types")
        self.row("data.seq_len", MAPPED, "max_length_per_sample", "longer segments are split into seq_len pieces")
        self.row("data.micro_bsz", MAPPED, "max_length",
                 f"max_length = seq_len * micro_bsz = {plan.max_length} (InternEvo's packed_length)")
        self.set("max_length", plan.max_length,
                 f"{self.src('data.seq_len')} * {self.src('data.micro_bsz')} = {plan.seq_len} * {plan.micro_bsz} "
                 f"(InternEvo's packed_length)")
        self.set("max_length_per_sample", plan.seq_len, self.src("data.seq_len"))
        one = bool(self.take("data.pack_sample_into_one", False))
        if c.has("data.pack_sample_into_one"):
            self.row("data.pack_sample_into_one", MAPPED, "pack_sample_into_one")
        self.set("pack_sample_into_one", one, self.src("data.pack_sample_into_one") if c.has(
            "data.pack_sample_into_one") else "data.pack_sample_into_one (absent: False)")
        seed = self.take("data.seed", 1024)
        if c.has("data.seed"):
            self.row("data.seed", MAPPED, "seed", "the global pack order")
        self.set("seed", seed, self.src("data.seed") if c.has("data.seed")
                 else "data.seed (absent: InternEvo's default 1024): the global pack order")
        if c.get("data.dataset_weights"):
            self.row("data.dataset_weights", MAPPED, "dataset_weights", "share of packs per named sub-dataset")
            self.set("dataset_weights", c.get("data.dataset_weights"), self.src("data.dataset_weights"))
        elif c.has("data.dataset_weights"):
            self.row("data.dataset_weights", NOT_NEEDED, "", "empty")
        self._validation()
        for key, empty in (("data.rampup_batch_size", ""), ("data.skip_batches", "")):
            value = c.get(key)
            if c.has(key) and value not in (empty, None):
                note = ("a growing batch changes tokens per step over time: evotune keeps one batch size"
                        if key.endswith("rampup_batch_size") else
                        "skipping batches: evotune resumes its own runs exactly with --resume")
                self.row(key, UNSUPPORTED, "", note)
            elif c.has(key):
                self.row(key, NOT_NEEDED, "", "empty")
        if c.has("data.use_packed_dataset"):
            if c.get("data.use_packed_dataset") in (True, None):
                self.row("data.use_packed_dataset", NOT_NEEDED, "", "evotune always packs")
            else:
                self.row("data.use_packed_dataset", UNSUPPORTED, "", "evotune always packs documents")
        if c.has("data.total_steps"):
            self.row("data.total_steps", MAPPED, "max_steps")

    def _validation(self) -> None:
        c = self.cfg
        valid = _strip_local(c.get("data.valid_folder"))
        every = c.get("data.valid_every", 0)
        if c.has("data.valid_folder"):
            if valid:
                self.row("data.valid_folder", MAPPED, "valid_folder", "one validation set per leaf folder")
            else:
                self.row("data.valid_folder", NOT_NEEDED, "",
                         "None: InternEvo validates on random tokens; evotune skips validation")
        self.set("valid_folder", valid or None, self.src("data.valid_folder") if c.has("data.valid_folder")
                 else "data.valid_folder (absent)")
        if c.has("data.valid_every"):
            if valid and every:
                self.row("data.valid_every", MAPPED, "evaluation_freq")
            else:
                self.row("data.valid_every", NOT_NEEDED, "", "no validation folder" if every else "0: disabled")
        if valid and every:
            self.set("evaluation_freq", int(every), self.src("data.valid_every"))

    # -- model and checkpoint -----------------------------------------------------------------
    def model(self) -> None:
        c = self.cfg
        path, ckpt_type, key = self._model_source()
        if path is None:
            self.set("pretrained_model_name_or_path", "/path/to/model",
                     "no model to start from in ckpt: set a HF directory or an InternEvo checkpoint folder")
        else:
            self.set("pretrained_model_name_or_path", path,
                     f"{self.src(key)} (ckpt_type {ckpt_type!r}; InternEvo folders load directly)")
        self.set("use_varlen_attn", True,
                 "model.use_flash_attn with data.pack_sample_into_one: attention stays inside "
                 "each cu_seqlens segment, as InternEvo's flash-attn path")
        dtype = str(c.get("model.dtype", "torch.float16")).removeprefix("torch.")
        if dtype in ("bfloat16", "float32"):
            self.row("model.dtype", MAPPED, "torch_dtype")
            out = dtype
        elif dtype == "tf32":
            self.row("model.dtype", CHANGED, "torch_dtype", "float32 (TF32 matmuls are PyTorch's default on CUDA)")
            out = "float32"
        else:
            self.row("model.dtype", CHANGED, "torch_dtype",
                     f"{dtype} with loss scaling -> bfloat16 (same range as float32, no loss scale)")
            out = "bfloat16"
        self.set("torch_dtype", out, self.src("model.dtype") if c.has("model.dtype")
                 else "model.dtype (absent: InternEvo's float16) -> bfloat16")
        if c.has("grad_scaler") and out == "bfloat16" and dtype != "bfloat16":
            self.row("grad_scaler", CHANGED, "", "fp16 loss scaling dropped: training runs in bfloat16")
        elif c.has("grad_scaler"):
            self.row("grad_scaler", NOT_NEEDED, "", _TOP_NOT_NEEDED["grad_scaler"])
        ac = c.get("model.checkpoint", False)
        ac_bool = bool(ac)
        if c.has("model.checkpoint"):
            if ac in (True, False, 0, 1):
                self.row("model.checkpoint", MAPPED, "activation_checkpointing")
            else:
                self.row("model.checkpoint", CHANGED, "activation_checkpointing",
                         f"a fraction ({ac}) of layers -> every layer is checkpointed")
        self.set("activation_checkpointing", ac_bool, self.src("model.checkpoint") if c.has("model.checkpoint")
                 else "model.checkpoint (absent: False)")
        self._check_dims(path)
        if c.get("model.num_experts", 1) not in (1, None):
            self.row("model.num_experts", UNSUPPORTED, "", "mixture-of-experts models are not supported")
        if c.has("model.embed_grad_scale"):
            if c.get("model.embed_grad_scale") == 1:
                self.row("model.embed_grad_scale", NOT_NEEDED, "", "1: no scaling")
            else:
                self.row("model.embed_grad_scale", UNSUPPORTED, "", "embedding gradient scaling")
        if c.has("model.apply_post_layer_norm"):
            status = NOT_NEEDED if not c.get("model.apply_post_layer_norm") else UNSUPPORTED
            self.row("model.apply_post_layer_norm", status, "", "pre-norm models only" if status == UNSUPPORTED
                     else "False: pre-norm, as the checkpoint")

    def _model_source(self) -> tuple[str | None, str | None, str]:
        """The folder the model weights come from and which ckpt key named it."""
        c = self.cfg
        info = c.get("ckpt.load_ckpt_info")
        auto_resume = c.get("ckpt.auto_resume", True)
        candidates = []
        if isinstance(info, dict) and info.get("path"):
            candidates.append(("ckpt.load_ckpt_info.path", info.get("path"), info.get("ckpt_type", "internevo"),
                               tuple(info.get("content", ("model",)))))
        if c.get("ckpt.load_model_only_folder"):
            candidates.append(("ckpt.load_model_only_folder", c.get("ckpt.load_model_only_folder"), "internevo",
                               ("model",)))
        folder = c.get("ckpt.load_ckpt_folder")
        if isinstance(folder, dict) and folder.get("path"):
            candidates.append(("ckpt.load_ckpt_folder.path", folder.get("path"), folder.get("ckpt_type", "internevo"),
                               tuple(folder.get("content", ("model",)))))
        for key in ("ckpt.load_ckpt_info", "ckpt.load_model_only_folder", "ckpt.load_ckpt_folder"):
            for leaf in _flatten(c.get(key), key) if c.has(key) else {}:
                self.handled.add(leaf)
        chosen = candidates[0] if candidates else None
        for key, path, ckpt_type, content in candidates:
            base = key.rsplit(".path", 1)[0]
            if chosen is not None and key != chosen[0]:
                self.row(key, NOT_NEEDED, "", f"{chosen[0]} is used")
                continue
            if isinstance(path, str) and path.startswith(_REMOTE_PREFIXES):
                self.row(key, UNSUPPORTED, "pretrained_model_name_or_path",
                         "object-store path: copy the checkpoint to a local or shared file system")
            else:
                self.row(key, MAPPED, "pretrained_model_name_or_path",
                         "InternEvo folder: loads directly (any tp/pp split)" if ckpt_type == "internevo"
                         else f"ckpt_type {ckpt_type!r}: a Hugging Face directory")
            extra = [x for x in content if x != "model"]
            if extra:
                self.row(f"{base}.content", UNSUPPORTED, "",
                         f"{', '.join(map(str, extra))}: InternEvo optimizer/sampler/scheduler states are not "
                         f"loaded; training starts at step 0 from the weights")
        if c.has("ckpt.load_ckpt_folder") and isinstance(folder, str):
            self.row("ckpt.load_ckpt_folder", NOT_NEEDED, "",
                     "InternEvo's resume folder: resume evotune runs with `evotune train --resume auto`")
        if c.has("ckpt.auto_resume"):
            if auto_resume and chosen is not None:
                self.row("ckpt.auto_resume", CHANGED, "--resume auto",
                         "InternEvo with auto_resume=True ignores load_ckpt_info when save_ckpt_folder holds a "
                         "checkpoint; evotune starts from the weights and resumes only with --resume auto")
            else:
                self.row("ckpt.auto_resume", MAPPED if not auto_resume else NOT_NEEDED, "--resume auto",
                         "resume with `evotune train --resume auto`")
        if chosen is None:
            self.rows.append(Row("ckpt.load_ckpt_info", c.get("ckpt.load_ckpt_info"), UNSUPPORTED,
                                 "pretrained_model_name_or_path",
                                 "no model weights to start from: evotune fine-tunes a pretrained model"))
            self.handled.add("ckpt.load_ckpt_info")
            return None, None, "ckpt.load_ckpt_info"
        key, path, ckpt_type, _ = chosen
        return _strip_local(path), ckpt_type, key

    def _check_dims(self, path: str | None) -> None:
        c = self.cfg
        present = [k for k in _DIMS if c.has(f"model.{k}")]
        theirs = _checkpoint_dims(path) if path else None
        for key in present:
            mine = c.get(f"model.{key}")
            if theirs is None:
                self.row(f"model.{key}", NOT_NEEDED, "", "read from the checkpoint (not found here: unchecked)")
                continue
            found = next((theirs[k] for k in _DIMS[key] if k in theirs), None)
            if found is None and key == "num_kv_attention_heads":
                found = theirs.get("num_attention_heads")
            if found is not None and int(found) != int(mine):
                raise EvotuneError(
                    f"{self.cfg.path}:{self.cfg.lines.get(f'model.{key}', '?')}: model.{key} = {mine} but the "
                    f"checkpoint {path} has {found}; the InternEvo config and its checkpoint disagree "
                    f"(fix model.{key} or ckpt.load_ckpt_info.path)"
                )
            self.row(f"model.{key}", NOT_NEEDED, "", "read from the checkpoint (checked: equal)")

    def checkpointing(self) -> None:
        c = self.cfg
        every = c.get("ckpt.checkpoint_every")
        if c.has("ckpt.checkpoint_every") and isinstance(every, (int, float)) and math.isfinite(every):
            self.row("ckpt.checkpoint_every", MAPPED, "save_steps")
            self.set("save_steps", int(every), self.src("ckpt.checkpoint_every"))
        else:
            if c.has("ckpt.checkpoint_every"):
                self.row("ckpt.checkpoint_every", CHANGED, "save_steps", "inf -> only at the end")
            self.set("save_steps", int(c.get("data.total_steps", 50000)),
                     "ckpt.checkpoint_every absent or inf: save at the end (data.total_steps)")
        self.set("save_total_limit", -1, "evotune: keep every checkpoint, as InternEvo does")
        folder = _strip_local(c.get("ckpt.save_ckpt_folder"))
        if c.has("ckpt.save_ckpt_folder"):
            if isinstance(folder, str) and folder.startswith(_REMOTE_PREFIXES):
                self.row("ckpt.save_ckpt_folder", UNSUPPORTED, "work_dir", "object stores: use a file system path")
                folder = None
            elif folder:
                self.row("ckpt.save_ckpt_folder", MAPPED, "work_dir")
            else:
                self.row("ckpt.save_ckpt_folder", NOT_NEEDED, "", "None: ./work_dirs/<config name>")
        self.work_dir = folder or None

    # -- optimizer and schedule -----------------------------------------------------------------
    def optimizer(self, plan: BatchPlan) -> None:
        c = self.cfg
        for key, name in (("adam.lr", "lr"), ("adam.adam_eps", "eps"), ("adam.weight_decay", "weight_decay")):
            default = {"lr": 1e-4, "eps": 1e-8, "weight_decay": 0.01}[name]
            if c.has(key):
                self.row(key, MAPPED, name)
            self.set(name, c.get(key, default), self.src(key) if c.has(key) else f"{key} (absent)")
        b1, b2 = c.get("adam.adam_beta1", 0.9), c.get("adam.adam_beta2", 0.95)
        for key in ("adam.adam_beta1", "adam.adam_beta2"):
            if c.has(key):
                self.row(key, MAPPED, "betas")
        self.set("betas", (b1, b2), f"({self.src('adam.adam_beta1')}, {self.src('adam.adam_beta2')})")
        beta2_c = c.get("adam.adam_beta2_c", c.get("beta2_scheduler.c", 0))
        for key in ("adam.adam_beta2_c", "beta2_scheduler.c"):
            if c.has(key):
                if beta2_c:
                    self.row(key, UNSUPPORTED, "", f"a beta2 schedule (c={beta2_c}): evotune keeps beta2 fixed")
                else:
                    self.row(key, NOT_NEEDED, "", "0: beta2 stays constant")
        clip = c.get("hybrid_zero_optimizer.clip_grad_norm", 0.0)
        if c.has("hybrid_zero_optimizer.clip_grad_norm"):
            self.row("hybrid_zero_optimizer.clip_grad_norm", MAPPED, "max_norm", "" if clip else "0: no clipping")
        self.set("max_norm", clip if clip else None, self.src("hybrid_zero_optimizer.clip_grad_norm")
                 if c.has("hybrid_zero_optimizer.clip_grad_norm") else "hybrid_zero_optimizer.clip_grad_norm (absent)")
        smoothing = c.get("loss.label_smoothing", 0)
        if c.has("loss.label_smoothing"):
            self.row("loss.label_smoothing", MAPPED, "label_smoothing")
        self.set("label_smoothing", smoothing, self.src("loss.label_smoothing") if c.has("loss.label_smoothing")
                 else "loss.label_smoothing (absent: 0)")
        self.set("loss_reduction", "pack",
                 "evotune: InternEvo's objective, mean loss per pack / micro_num, averaged over dp")
        self._schedule(plan)

    def _schedule(self, plan: BatchPlan) -> None:
        c = self.cfg
        total = c.get("data.total_steps", 50000)
        self.set("max_steps", int(total), self.src("data.total_steps") if c.has("data.total_steps")
                 else "data.total_steps (absent: InternEvo's default 50000)")
        sched_total = c.get("lr_scheduler.total_steps", total)
        if c.has("lr_scheduler.total_steps"):
            same = int(sched_total) == int(total)
            self.row("lr_scheduler.total_steps", MAPPED, "max_steps" if same else "_schedule_steps",
                     "" if same else "differs from data.total_steps: kept for the schedule")
        self.schedule_steps = None if int(sched_total) == int(total) else int(sched_total)
        ratio = c.get("lr_scheduler.warmup_ratio", 0.0)
        if c.has("lr_scheduler.warmup_ratio"):
            self.row("lr_scheduler.warmup_ratio", MAPPED, "warm_up_ratio",
                     "W = int(total_steps * ratio); lr * (step + 1) / W for steps < W")
        self.set("warm_up_ratio", ratio, self.src("lr_scheduler.warmup_ratio") if c.has("lr_scheduler.warmup_ratio")
                 else "lr_scheduler.warmup_ratio (absent: 0)")
        self.eta_min = c.get("lr_scheduler.eta_min", 0.0)
        if c.has("lr_scheduler.eta_min"):
            self.row("lr_scheduler.eta_min", MAPPED, "param_scheduler[-1].eta_min", "absolute minimum lr")
        init = c.get("lr_scheduler.init_steps", 0)
        if c.has("lr_scheduler.init_steps"):
            if init:
                self.row("lr_scheduler.init_steps", UNSUPPORTED, "",
                         f"{init} steps at lr 0 before the warm-up: evotune's schedule starts warming up at step 0")
            else:
                self.row("lr_scheduler.init_steps", NOT_NEEDED, "", "0: warm-up starts at step 0")

    # -- parallel ------------------------------------------------------------------------------
    def parallel(self, plan: BatchPlan) -> str | None:
        """Rows for ``parallel``; returns the ``--deepspeed`` preset."""
        c = self.cfg
        ie = plan.internevo
        sp = plan.sequence_parallel_size
        for leaf in _flatten(c.get("parallel"), "parallel") if c.has("parallel") else {}:
            if leaf.split(".")[1] in ("tensor", "pipeline", "zero1", "weight"):
                self.handled.add(leaf)  # one row per sub-dict below
        tensor_note = {
            "mtp": "Megatron tensor parallel: its ranks share packs; evotune shards weights with FSDP instead",
            "msp": "Megatron tensor + sequence parallel -> Ulysses sequence parallel (all-to-all around "
                   "attention); same packs per group, weights sharded by FSDP instead of split by tensor parallel",
            "fsp": "flash-attn tensor + sequence parallel -> Ulysses sequence parallel; same packs per group, "
                   "weights sharded by FSDP",
            "isp": "InternEvo's isp is Ulysses-style: sequence shards, all-to-all around attention, as evotune's",
        }[ie.mode]
        start = ie.tensor if ie.mode in SEQUENCE_MODES else 1
        if sp > start:
            tensor_note += (f"; sequence_parallel_size {sp} (not {start}) so that dp {plan.data_parallel_size} "
                            f"divides the {plan.packs_per_step} packs per step")
        elif sp < start:
            tensor_note += (f"; sequence_parallel_size {sp} (not {start}): the largest that splits the "
                            f"{c.get('model.num_attention_heads')} attention heads and the {plan.packs_per_step} "
                            f"packs per step")
        status = MAPPED if (ie.mode == "isp" and sp == ie.tensor) or (ie.tensor == 1 and sp == 1) else CHANGED
        self.rows.append(Row("parallel.tensor", c.get("parallel.tensor", 1), status, "sequence_parallel_size",
                             tensor_note))
        self.set("sequence_parallel_size", sp,
                 f"parallel.tensor (size {ie.tensor}, mode {ie.mode!r}): InternEvo dp = world / (tensor x pipeline)")
        if c.has("parallel.pipeline"):
            if ie.pipeline > 1:
                self.rows.append(Row("parallel.pipeline", c.get("parallel.pipeline"), NOT_NEEDED, "",
                                     "no pipeline stages: FSDP shards every layer over the data-parallel ranks; "
                                     "pipeline ranks become data-parallel ranks"))
            else:
                self.rows.append(Row("parallel.pipeline", c.get("parallel.pipeline"), NOT_NEEDED, "", "size 1"))
        preset, note, status = self.zero_preset(plan)
        if c.has("parallel.zero1"):
            self.rows.append(Row("parallel.zero1", c.get("parallel.zero1"), status, f"--deepspeed {preset}"
                                 if preset else "(no --deepspeed)", note))
        if ie.weight > 1:
            self.rows.append(Row("parallel.weight", c.get("parallel.weight"), CHANGED, "--deepspeed deepspeed_zero3",
                                 f"weight parallel {ie.weight} shards parameters in groups of {ie.weight}; "
                                 f"evotune shards them over all {plan.data_parallel_size} data-parallel ranks "
                                 f"(its overlap/prefetch knobs: FSDP2 prefetches by itself)"))
        elif c.has("parallel.weight"):
            self.rows.append(Row("parallel.weight", c.get("parallel.weight"), NOT_NEEDED, "", "size 1"))
        s2d = c.get("parallel.sequence_2D")
        if isinstance(s2d, dict):
            for leaf in _flatten(s2d, "parallel.sequence_2D"):
                self.handled.add(leaf)
            if s2d.get("enable"):
                self.rows.append(Row("parallel.sequence_2D", "enable=True", CHANGED, "sequence_parallel_size",
                                     "2D (head x context) sequence parallel -> Ulysses over all "
                                     f"{sp} sequence ranks (head parallel only)"))
            else:
                self.rows.append(Row("parallel.sequence_2D", "enable=False", NOT_NEEDED, "", "disabled"))
        for key in ("parallel.expert", "parallel.expert_zero1", "parallel.expert_weight"):
            if c.has(key):
                for leaf in _flatten(c.get(key), key):
                    self.handled.add(leaf)
                self.rows.append(Row(key, c.get(key), NOT_NEEDED, "", "mixture-of-experts only"))
        return preset

    def zero_preset(self, plan: BatchPlan) -> tuple[str | None, str, str]:
        """The ``--deepspeed`` preset for InternEvo's ZeRO and weight-parallel settings."""
        ie = plan.internevo
        zero1 = self.cfg.get("parallel.zero1")
        fsdp = isinstance(zero1, dict) and bool(zero1.get("fsdp"))
        dp = plan.data_parallel_size
        if fsdp or ie.weight > 1:
            why = "zero1.fsdp=True: parameters sharded" if fsdp else f"weight parallel {ie.weight}"
            return "deepspeed_zero3", f"{why} -> parameters, gradients and optimizer states sharded (FSDP)", CHANGED
        if plan.world_size // plan.sequence_parallel_size == 1:
            return None, "one data-parallel rank: nothing to shard", MAPPED
        if ie.zero1 == 1:
            return None, "size 1: no sharding -> plain data parallel (no --deepspeed flag)", MAPPED
        group = ie.zero_group
        if ie.zero1 <= 0 or group >= dp:
            return ("deepspeed_zero1",
                    f"optimizer states sharded over all {dp} data-parallel ranks (FSDP, parameters gathered once "
                    f"per step)", MAPPED)
        return ("deepspeed_zero1",
                f"InternEvo shards optimizer states in groups of {group}; evotune shards over all {dp} "
                f"data-parallel ranks (same mathematics, less memory, more cross-node traffic)", CHANGED)

    # -- everything else -------------------------------------------------------------------------
    def leftovers(self) -> None:
        """Rows for every key no handler took: not needed, or unsupported."""
        for name, value in self.cfg.values.items():
            if name.startswith("_") or name.isupper():
                continue  # private names and CONSTANTS are helpers the sections above use
            if name in _TOP_NOT_NEEDED and name not in self.handled:
                self.handled.add(name)
                self.rows.append(Row(name, "..." if isinstance(value, dict) else value, NOT_NEEDED, "",
                                     _TOP_NOT_NEEDED[name]))
                continue
            if name not in _TOP_HANDLED and name not in _TOP_NOT_NEEDED:
                if value in (None, False, "", {}, []):
                    self.rows.append(Row(name, value, NOT_NEEDED, "", "empty or disabled"))
                else:
                    self.rows.append(Row(name, value, UNSUPPORTED, "", "not an InternEvo key evotune knows"))
                continue
            if name not in _TOP_HANDLED:
                continue
            for leaf, leaf_value in _flatten(value, name).items():
                if leaf in self.handled or any(leaf.startswith(h + ".") for h in self.handled):
                    continue
                if leaf in _KEY_NOT_NEEDED:
                    self.rows.append(Row(leaf, leaf_value, NOT_NEEDED, "", _KEY_NOT_NEEDED[leaf]))
                elif leaf_value in (None, False, "", {}, []) and not leaf.startswith("model."):
                    self.rows.append(Row(leaf, leaf_value, NOT_NEEDED, "", "empty or disabled"))
                else:
                    self.rows.append(Row(leaf, leaf_value, UNSUPPORTED, "", "no evotune equivalent"))
                self.handled.add(leaf)


# --------------------------------------------------------------------------------------------
# Writing the evotune config
# --------------------------------------------------------------------------------------------

_BAR = "#" * 71


def _part(title: str) -> str:
    return f"{_BAR}\n#{title:^69}#\n{_BAR}"


def _fmt(n: int) -> str:
    return f"{n:,}"


def _assign(name: str, value: Any, comment: str) -> str:
    return f"{name} = {value!r}  # {comment}"


def render(source: str, tr: _Translator, plan: BatchPlan, preset: str | None, assumptions: list[str]) -> str:
    """The evotune config text, in the five-part layout of the shipped configs."""
    s = tr.settings
    ie = plan.internevo

    def line(name: str) -> str:
        value, comment = s[name]
        return _assign(name, value, comment)

    optional = [n for n in ("dataset_weights", "valid_folder", "evaluation_freq") if n in s and s[n][0] is not None]
    flag = f" --deepspeed {preset}" if preset else ""
    head = [
        f"# Migrated from the InternEvo config {os.path.basename(source)} by `evotune migrate`.",
        "# Every translated line names the InternEvo key it comes from; see docs/migrating-from-internevo.md.",
        "#",
        f"# InternEvo: {ie.world_size} GPUs, tensor {ie.tensor} ({ie.mode}) x pipeline {ie.pipeline} -> "
        f"data parallel {ie.data_parallel_size};",
        f"#   {ie.data_parallel_size} dp x {plan.micro_num} micro_num x {plan.micro_bsz} micro_bsz x {plan.seq_len} "
        f"seq_len = {_fmt(plan.internevo_tokens_per_step)} tokens per optimizer step.",
        f"# evotune:   {plan.world_size} GPUs / sequence_parallel_size {plan.sequence_parallel_size} -> "
        f"data parallel {plan.data_parallel_size};",
        f"#   {plan.data_parallel_size} dp x {plan.batch_size} batch_size x {plan.accumulative_counts} "
        f"accumulative_counts x {plan.max_length} max_length = {_fmt(plan.tokens_per_step)} tokens per optimizer step.",
        *[f"# Assumed: {a}" for a in assumptions],
        "#",
        "# Launch (one node of 8 GPUs shown; set NNODES/NODE_RANK/ADDR/PORT or use --launcher slurm for more):",
        f"#   NPROC_PER_NODE=8 evotune train THIS_FILE.py{flag}",
        f"#   srun -n {plan.world_size} evotune train THIS_FILE.py --launcher slurm{flag}",
        "from evotune import (AdamW, CosineAnnealingLR, LinearLR, SequenceParallelSampler, SupervisedFinetune,",
        "                     build_packed_dataset, load_intern_repo_tokenized_dataset, load_model, load_tokenizer)",
        "",
    ]
    schedule_total = "max_steps"
    private = [_assign("_eta_min", tr.eta_min, tr.src("lr_scheduler.eta_min") + " (absolute)")]
    if tr.schedule_steps is not None:
        private.append(_assign("_schedule_steps", tr.schedule_steps, tr.src("lr_scheduler.total_steps")))
        schedule_total = "_schedule_steps"
    private.append(f"_warmup_steps = int({schedule_total} * warm_up_ratio)  "
                   f"# InternEvo: int(total_steps * warmup_ratio)")
    work_dir = tr.work_dir
    parts = [
        _part("PART 1  Settings"),
        "# Model",
        line("pretrained_model_name_or_path"),
        line("use_varlen_attn"),
        line("torch_dtype"),
        line("activation_checkpointing"),
        "",
        "# Data",
        line("dataset_folder"),
        line("data_order_path"),
        line("min_length"),
        line("max_length"),
        line("max_length_per_sample"),
        line("pack_sample_into_one"),
        line("seed"),
        *[line(n) for n in optional],
        "",
        "# Scheduler & Optimizer",
        _assign("batch_size", plan.batch_size, "evotune: packs per micro-batch per device (a pack already holds "
                                               "micro_bsz sequences)"),
        _assign("accumulative_counts", plan.accumulative_counts,
                f"{tr.src('data.micro_num')} = {plan.micro_num}: {plan.packs_per_step} packs per step / "
                f"dp {plan.data_parallel_size}"),
        line("max_steps"),
        line("lr"),
        line("betas"),
        line("eps"),
        line("weight_decay"),
        line("max_norm"),
        line("warm_up_ratio"),
        line("label_smoothing"),
        line("loss_reduction"),
        *private,
        "",
        "# Parallel",
        line("sequence_parallel_size"),
        "",
        "# Save",
        line("save_steps"),
        line("save_total_limit"),
        "",
        _part("PART 2  Model & Tokenizer"),
        "tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)",
        "",
        "model = dict(",
        "    type=SupervisedFinetune,",
        "    use_varlen_attn=use_varlen_attn,",
        "    activation_checkpointing=activation_checkpointing,",
        "    label_smoothing=label_smoothing,",
        "    llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype=torch_dtype))",
        "",
        _part("PART 3  Dataset & Dataloader"),
        "train_dataset = dict(",
        "    type=build_packed_dataset,",
        "    dataset_cfg=dict(",
        "        type=load_intern_repo_tokenized_dataset,",
        "        data_order_path=data_order_path,",
        "        folder=dataset_folder,",
        "        min_length=min_length,",
        "        file_type='.bin'),",
        "    packed_length=max_length,",
        "    max_length_per_sample=max_length_per_sample,",
        "    pack_sample_into_one=pack_sample_into_one,",
        *(["    dataset_weights=dataset_weights,"] if "dataset_weights" in optional else []),
        "    seed=seed)",
        "",
        "train_dataloader = dict(",
        "    batch_size=batch_size,",
        "    num_workers=0,",
        "    sampler=dict(type=SequenceParallelSampler, shuffle=True))",
        "",
        _part("PART 4  Scheduler & Optimizer"),
        "optim_wrapper = dict(",
        "    optimizer=dict(type=AdamW, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),",
        "    clip_grad=dict(max_norm=max_norm),",
        "    accumulative_counts=accumulative_counts,",
        "    dtype=torch_dtype)",
        "",
        "# InternEvo's FineTuneCosineAnnealingWarmupLR, step for step: lr * (step + 1) / W for step < W,",
        "# then cosine from lr to eta_min over the remaining steps (begin/end in optimizer steps).",
        "param_scheduler = ([",
        "    dict(type=LinearLR, start_factor=1 / _warmup_steps, begin=0, end=_warmup_steps - 1, by_epoch=False),",
        "] if _warmup_steps else []) + [",
        f"    dict(type=CosineAnnealingLR, eta_min=_eta_min, begin=_warmup_steps, end={schedule_total}, "
        "by_epoch=False),",
        "]",
        "",
        _part("PART 5  Runtime"),
        "train_cfg = dict(max_steps=max_steps)",
        "checkpoint = dict(interval=save_steps, max_keep_ckpts=save_total_limit)",
        "log_interval = 1",
        "randomness = dict(seed=None)",
    ]
    if work_dir:
        parts.append(_assign("work_dir", work_dir, tr.src("ckpt.save_ckpt_folder")))
    return "\n".join(head + parts) + "\n"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def migrate_internevo_config(path: str | os.PathLike, world_size: int | None = None,
                             target_world_size: int | None = None,
                             sequence_parallel_size: int | None = None) -> Migration:
    """Translate the InternEvo config at ``path``.

    ``world_size``: GPUs of the InternEvo job (sets InternEvo's dp and so the tokens
    per step; default: the smallest world InternEvo accepts for ``parallel``, noted
    as an assumption). ``target_world_size``: GPUs evotune will train on (default:
    ``world_size``). ``sequence_parallel_size``: evotune's SP (default: see
    :func:`plan_batch`).
    """
    cfg = read_internevo_config(path)
    for section in ("data",):
        if not isinstance(cfg.get(section), dict):
            raise EvotuneError(f"{cfg.path}: no '{section} = dict(...)': is this an InternEvo training config?")
    for key in ("data.seq_len", "data.micro_bsz"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EvotuneError(f"{cfg.path}:{cfg.lines.get(key, '?')}: {key} must be a positive integer, got {value!r}")
    micro_num = cfg.get("data.micro_num", 1)
    if not isinstance(micro_num, int) or micro_num < 1:
        raise EvotuneError(f"{cfg.path}:{cfg.lines.get('data.micro_num', '?')}: data.micro_num must be a positive "
                           f"integer, got {micro_num!r}")
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
    target = int(target_world_size or world_size)
    heads = cfg.get("model.num_attention_heads")
    plan = plan_batch(ie, cfg.get("data.seq_len"), cfg.get("data.micro_bsz"), micro_num, target,
                      sequence_parallel_size, heads if isinstance(heads, int) else None)

    tr = _Translator(cfg)
    tr.take("data.micro_num")
    dp_same = plan.data_parallel_size == ie.data_parallel_size
    tr.rows.append(Row("data.micro_num", micro_num, MAPPED if dp_same else CHANGED, "accumulative_counts",
                       f"{plan.packs_per_step} packs per step: dp {plan.data_parallel_size} x accumulative_counts "
                       f"{plan.accumulative_counts}" + ("" if dp_same else f" (InternEvo dp {ie.data_parallel_size} "
                                                                          f"x micro_num {micro_num})")))
    tr.data(plan)
    tr.model()
    tr.checkpointing()
    tr.optimizer(plan)
    preset = tr.parallel(plan)
    tr.leftovers()
    text = render(cfg.path, tr, plan, preset, assumptions)
    return Migration(cfg.path, text, tr.rows, plan, preset, assumptions)


def format_table(rows: list[Row]) -> str:
    """The rows as plain text, grouped by status."""
    order = {MAPPED: 0, CHANGED: 1, UNSUPPORTED: 2, NOT_NEEDED: 3}
    rows = sorted(rows, key=lambda r: order[r.status])
    cells = [(r.key, _short(r.value), r.status, r.target, r.note) for r in rows]
    header = ("InternEvo key", "value", "status", "evotune", "note")
    widths = [max(len(str(c[i])) for c in cells + [header]) for i in range(4)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths + [0])).rstrip()]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cell, widths + [0])).rstrip() for cell in cells]
    return "\n".join(out)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_table(rows: list[Row], plain: bool) -> None:
    if plain:
        print(format_table(rows))
        return
    from rich.console import Console
    from rich.table import Table

    colour = {MAPPED: "green", CHANGED: "yellow", UNSUPPORTED: "bold red", NOT_NEEDED: "dim"}
    order = {MAPPED: 0, CHANGED: 1, UNSUPPORTED: 2, NOT_NEEDED: 3}
    table = Table(title="InternEvo -> evotune")
    for name in ("InternEvo key", "value", "status", "evotune"):
        table.add_column(name, no_wrap=True)
    table.add_column("note", overflow="fold")
    for r in sorted(rows, key=lambda r: order[r.status]):
        table.add_row(r.key, _short(r.value), f"[{colour[r.status]}]{r.status}[/]", r.target, r.note)
    Console().print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the InternEvo training config (a Python file of constants)")
    parser.add_argument("-o", "--output", required=True, help="where to write the evotune config")
    parser.add_argument("--world-size", type=int,
                        help="GPUs the InternEvo job ran on (sets its data-parallel size and tokens per step)")
    parser.add_argument("--target-world-size", type=int,
                        help="GPUs evotune will train on (default: --world-size)")
    parser.add_argument("--sequence-parallel-size", type=int,
                        help="evotune's sequence parallel size (default: InternEvo's, raised if needed to fit)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file")
    parser.add_argument("--plain", action="store_true", help="print the table as plain text")


def main(args: argparse.Namespace) -> int:
    for name in ("world_size", "target_world_size", "sequence_parallel_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvotuneError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if os.path.exists(args.output) and not args.force:
        raise EvotuneError(f"'{args.output}' already exists; pass --force to overwrite it")
    result = migrate_internevo_config(args.config, args.world_size, args.target_world_size, args.sequence_parallel_size)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(result.text)
    import sys

    _print_table(result.rows, plain=args.plain or not sys.stdout.isatty())
    p = result.plan
    for note in result.assumptions:
        print(f"assumed: {note}")
    print(f"tokens per optimizer step: InternEvo {_fmt(p.internevo_tokens_per_step)} = evotune "
          f"{_fmt(p.tokens_per_step)} ({p.data_parallel_size} dp x {p.accumulative_counts} accumulation x "
          f"{p.max_length} tokens)")
    flag = f" --deepspeed {result.deepspeed}" if result.deepspeed else ""
    print(f"wrote {args.output}; train with: evotune train {args.output}{flag}")
    if result.unsupported:
        keys = ", ".join(r.key for r in result.unsupported)
        print(f"evotune: {len(result.unsupported)} InternEvo setting(s) have no evotune equivalent and were left out: "
              f"{keys}", file=sys.stderr)
        return 1
    return 0
