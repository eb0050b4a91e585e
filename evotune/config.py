"""Load, override, validate and build XTuner-style Python configs.

A config is a plain Python file; its top-level names are the config. Two rules
make configs safe to edit:

* ``--cfg-options key=value`` on a top-level *setting* rewrites that assignment
  in the source before it runs, so every later line that uses the setting
  (``packed_length=max_length``) sees the new value. Dotted keys
  (``train_dataloader.num_workers=4``) are applied to the result afterwards.
* Every top-level name must be a known key, and every ``type=`` dict's keys must
  be parameters of its callable; a typo is an :class:`EvotuneError` naming the
  key and the closest valid one, never silently ignored.

Nested ``type=`` dicts are not built automatically (as in XTuner/mmengine): the
callable that receives one builds it with :func:`build`. Plain dicts
(``optim_wrapper``, ``train_dataloader``, ...) and the values are checked by
:func:`evotune.settings.resolve`, the one reader of the result.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import traceback
import os
from typing import Any

import evotune
from evotune.errors import EvotuneError
from evotune.xtuner_compat import config_builtins

# Every top-level key a config may define. SETTINGS are read by evotune/settings.py (each is a
# place of a field there); FILE_VARIABLES act only through the lines of the file that use them
# (warm_up_ratio in param_scheduler), so setting one that no line uses is an error.
SETTINGS = {
    # model
    "pretrained_model_name_or_path", "use_varlen_attn", "label_smoothing",
    # data
    "dataset_folder", "data_order_path", "min_length", "max_length", "max_length_per_sample",
    "pack_sample_into_one", "pack_to_max_length", "dataset_weights", "seed", "batch_size",
    # optimisation
    "accumulative_counts", "max_epochs", "max_steps", "lr", "betas", "eps", "weight_decay", "max_norm",
    "loss_reduction", "max_consecutive_skips", "max_skipped_fraction",
    # parallel
    "sequence_parallel_size", "activation_checkpointing", "torch_compile",
    # saving, logging, evaluation
    "save_steps", "save_total_limit", "save_format", "save_merged", "log_interval", "valid_folder",
    "evaluation_freq", "evaluation_inputs", "max_new_tokens", "prompt_template", "SYSTEM", "visualizer",
}
FILE_VARIABLES = {"warm_up_ratio", "torch_dtype",
                  "optim_type", "dataloader_num_workers"}  # XTuner's names: optimizer=dict(type=optim_type, ...)
PARTS = {
    "tokenizer", "model", "train_dataset", "train_dataloader", "optim_wrapper",
    "param_scheduler", "train_cfg", "checkpoint", "randomness", "work_dir",
    # XTuner's runtime part (evotune/xtuner_compat.py reads the hooks)
    "custom_hooks", "default_hooks", "env_cfg", "log_level", "log_processor", "load_from", "resume",
}
KNOWN_KEYS = SETTINGS | FILE_VARIABLES | PARTS


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _parse_value(text: str) -> Any:
    """Parse an override value as a Python literal, falling back to a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_options(options: list[str] | None) -> dict[str, Any]:
    parsed = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvotuneError(f"--cfg-options: '{item}' is not key=value (for example max_length=4096)")
        parsed[key.strip()] = _parse_value(value.strip())
    return parsed


class _Override(ast.NodeTransformer):
    """Replace the value of top-level ``name = ...`` assignments; note the names the file reads."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self.seen: set[str] = set()
        self.used: set[str] = set()

    def visit_Module(self, node: ast.Module) -> ast.Module:
        self.used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                name = stmt.targets[0].id
                if name in self.values:
                    stmt.value = ast.parse(repr(self.values[name]), mode="eval").body
                    self.seen.add(name)
        return node


def _execute(path: str, source: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], _Override]:
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise EvotuneError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    transformer = _Override(overrides)
    tree = ast.fix_missing_locations(transformer.visit(tree))
    # XTuner's and mmengine's imports resolve to evotune's names while the file runs, nowhere else
    namespace: dict[str, Any] = {"__file__": os.path.abspath(path), "__name__": "evotune_config",
                                 "__builtins__": config_builtins(path)}
    try:
        exec(compile(tree, path, "exec"), namespace)
    except NameError as e:
        name = getattr(e, "name", None) or str(e).split("'")[1]
        raise EvotuneError(
            f"{path}: name '{name}' is not defined{suggest(name, evotune.__all__)} "
            f"(types come from 'from evotune import ...')"
        ) from None
    except ImportError as e:
        raise EvotuneError(f"{path}: {e}") from None
    except EvotuneError:
        raise
    except Exception as e:  # noqa: BLE001 - any error raised by the file's own code is the file's
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise EvotuneError(f"{path}:{line}: the config raised {type(e).__name__}: {e}; fix that line") from None
    return namespace, transformer


def _is_config_value(name: str, value: Any) -> bool:
    return not name.startswith("_") and not inspect.ismodule(value) and not (
        callable(value) and not isinstance(value, dict) and name not in KNOWN_KEYS
    )


def load_config(path: str | os.PathLike, cfg_options: list[str] | None = None) -> dict[str, Any]:
    """Run the config file and return its validated top-level names.

    Names starting with ``_`` are private helpers and are dropped; imported
    callables are dropped too. ``cfg_options`` are ``key=value`` strings. Two
    private keys are added: ``_config_path`` and ``_cfg_options`` (the parsed
    overrides). :func:`evotune.settings.resolve` turns the result into typed settings.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvotuneError(f"config file '{path}' does not exist (see `evotune list-cfg`)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    overrides = _parse_options(cfg_options)
    top = {k: v for k, v in overrides.items() if "." not in k}
    namespace, transformer = _execute(path, source, top)
    cfg = {k: v for k, v in namespace.items() if not k.startswith("__") and _is_config_value(k, v)}
    # a name evotune does not read that later lines use (XTuner's data_files, optim_type, alpaca_en, ...)
    # acts through those lines; only a name nothing reads is an error (validate)
    cfg = {k: v for k, v in cfg.items() if k in KNOWN_KEYS or k not in transformer.used}
    for key, value in top.items():
        if key not in transformer.seen:
            if key not in KNOWN_KEYS:
                raise EvotuneError(f"--cfg-options: unknown key '{key}'{suggest(key, KNOWN_KEYS | set(cfg))}")
            cfg[key] = value
    for key, value in overrides.items():
        if "." in key:
            _set_dotted(cfg, key, value)
    validate(cfg, path)
    for key in sorted(FILE_VARIABLES & set(cfg) - transformer.used):
        where = "--cfg-options" if key in top else path
        raise EvotuneError(f"{where}: {key} is set but no line of {os.path.basename(path)} uses it; it acts only "
                           f"where the config passes it on (e.g. in param_scheduler or model), so pass it on or "
                           f"remove it")
    cfg["_config_path"] = os.path.abspath(path)
    cfg["_cfg_options"] = overrides  # evotune.settings names them as the source of a value
    return cfg


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            where = ".".join(parts[: i + 1])
            options = node.keys() if isinstance(node, dict) else []
            raise EvotuneError(f"--cfg-options: '{where}' is not in the config{suggest(part, options)}")
    last = parts[-1]
    if isinstance(node, dict) and last not in node and "type" in node:
        check_type_keys(node | {last: value}, key)
    node[last] = value


def validate(cfg: dict[str, Any], where: str = "config") -> None:
    """Reject unknown top-level keys and ``type=`` dicts with unknown parameters."""
    for key in cfg:
        if key.startswith("_"):
            continue
        if key not in KNOWN_KEYS:
            raise EvotuneError(
                f"{where}: unknown key '{key}'{suggest(key, KNOWN_KEYS)} "
                f"(prefix private helper names with '_')"
            )
    for key, value in cfg.items():
        _walk_types(value, key)


def _walk_types(value: Any, where: str) -> None:
    if isinstance(value, dict):
        if "type" in value:
            check_type_keys(value, where)
        for k, v in value.items():
            _walk_types(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk_types(v, f"{where}[{i}]")


def _resolve_type(spec_type: Any, where: str):
    if isinstance(spec_type, str):
        if spec_type not in evotune.__all__:
            raise EvotuneError(f"{where}.type: unknown type '{spec_type}'{suggest(spec_type, evotune.__all__)}")
        return getattr(evotune, spec_type)
    if not callable(spec_type):
        raise EvotuneError(f"{where}.type: {spec_type!r} is not callable")
    return spec_type


def check_type_keys(spec: dict, where: str) -> None:
    """Every key of a ``type=`` dict is a parameter of its callable (unless it takes ``**kwargs``)."""
    fn = _resolve_type(spec["type"], where)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for key in spec:
        if key != "type" and key not in params:
            name = getattr(fn, "__name__", str(fn))
            raise EvotuneError(f"{where}: '{key}' is not a parameter of {name}{suggest(key, params)}")


def build(spec: Any, **extra: Any) -> Any:
    """Call ``spec['type'](**rest, **extra)`` for a type dict; return anything else unchanged."""
    if not (isinstance(spec, dict) and "type" in spec):
        return spec
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    kwargs.update(extra)
    return _resolve_type(spec["type"], "config")(**kwargs)
