"""InternEvo checkpoint folders (``model_config.pt`` + ``model_tp{t}_pp{p}.pt``), both directions.

InternEvo can only load weights saved with the tensor/pipeline split it trains
with; evotune reads any split and writes any split. Facts this module relies on
(docs/models.md, "InternEvo checkpoints", says more):

* shard keys have no ``model.`` prefix and layer indices restart at 0 in every
  pipeline stage; stages follow InternEvo's ``partition_uniform`` (extra layers
  go to the last stages). ``tok_embeddings`` lives in stage 0, ``norm`` and
  ``output`` in the last stage;
* tensor-parallel splits are decided by the key name (shapes can be square):
  ``wqkv`` (whole kv groups), ``w1``, ``w3``, ``output`` on dim 0; ``wo``, ``w2``
  on dim 1; ``tok_embeddings.weight`` on dim 1 (``embed_split_hidden``),
  ``tok_embeddings.word_embeddings.weight`` (vocab parallel) on dim 0; norms and
  row-parallel biases replicated;
* before 2024 InternEvo's MLP was ``w3(silu(w1 x) * w2 x)`` (w2 = up, w3 =
  down, split dims swapped accordingly): detected from the shard shapes, or set
  with ``ffn_layout``;
* ``adapt_hf=False`` / ``qk_interleaved=True`` store q and k GPT-J interleaved
  inside each head (HF row j = stored row 2j, HF row d/2+j = stored row 2j+1).
  A missing ``adapt_hf`` means True, InternEvo's model default (InternEvo's own
  converter defaults to False and so converts real checkpoints wrongly);
* ``norm_head=True`` normalises the head's rows at run time, so the exported
  head is the row-normalised weight (computed in float32).

Reading produces a plan (:mod:`evotune.checkpoint.plan`) in InternLM2 names,
so a conversion holds one pipeline stage's shards (memory-mapped) and the
tensor being written, never the whole model twice.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from evotune.checkpoint.atomic import AtomicDir
from evotune.checkpoint.internlm2 import INTERNLM2_AUTO_MAP
from evotune.checkpoint.plan import Planned
from evotune.dtypes import dtype_name, parse_dtype
from evotune.errors import EvotuneError

CONFIG_NAME = "model_config.pt"
SHARD_RE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_EMBED_KEYS = {"tok_embeddings.weight": 1, "tok_embeddings.word_embeddings.weight": 0}
FFN_LAYOUTS = ("auto", "w2_down", "w3_down")


# ---------------------------------------------------------------- model_config.pt


class _InternEvoConfig(dict):
    """Stands in for InternEvo's ``Config`` (a dict subclass) while unpickling."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data, torch dtypes and InternEvo's ``Config``; refuses every other class."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "object"),
        ("copyreg", "_reconstructor"),
        ("torch", "Size"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
    }

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 2 names
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module.startswith("internlm") and name == "Config":
            return _InternEvoConfig
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class _RestrictedPickle:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler is restricted."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "evotune_restricted_pickle"


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def load_model_config(folder) -> dict:
    """``model_config.pt`` as a plain dict, whether saved as a dict or as InternEvo's pickled ``Config``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise EvotuneError(f"{path} is missing: an InternEvo checkpoint folder needs model_config.pt")
    try:
        cfg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            cfg = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
        except pickle.UnpicklingError as e:
            raise EvotuneError(f"{path}: {e}; model_config.pt may only hold the model's settings") from e
    if not isinstance(cfg, dict):
        raise EvotuneError(f"{path} holds a {type(cfg).__name__}, not the model config dict InternEvo saves")
    return _plain(cfg)


def config_for_json(cfg: dict) -> dict:
    """``model_config.pt`` with its dtype as a string (so it can live in a JSON-able source record)."""
    return {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()}


# ---------------------------------------------------------------- layout


def partition_uniform(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """InternEvo's stage split (num_chunks=1): ``num_layers // pp`` each, the remainder on the last stages."""
    if pp < 1 or pp > num_layers:
        raise EvotuneError(f"pipeline size {pp} must be between 1 and the number of layers ({num_layers})")
    size, extra = divmod(num_layers, pp)
    first_big = pp - extra
    parts, start = [], 0
    for p in range(pp):
        end = start + size + (1 if p >= first_big else 0)
        parts.append((start, end))
        start = end
    return parts


def shard_grid(folder) -> tuple[int, int]:
    """(tp, pp) of a checkpoint folder; names the first missing ``model_tp{t}_pp{p}.pt``."""
    folder = Path(folder)
    found = set()
    for f in folder.iterdir():
        m = SHARD_RE.match(f.name)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    if not found:
        wp = sorted(f.name for f in folder.glob("model_wp*_pp*.pt"))
        if wp:
            raise EvotuneError(
                f"{folder} holds weight-parallel (ISP) shards such as {wp[0]}; evotune reads tensor-parallel "
                "checkpoints (model_tp{t}_pp{p}.pt): save the model with tensor mode 'mtp'/'msp'/'fsp'"
            )
        raise EvotuneError(f"{folder} has {CONFIG_NAME} but no model_tp{{t}}_pp{{p}}.pt shards")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    for p in range(pp):
        for t in range(tp):
            if (t, p) not in found:
                raise EvotuneError(
                    f"{folder / f'model_tp{t}_pp{p}.pt'} is missing (the folder has tp={tp}, pp={pp} shards): "
                    "copy every shard of the checkpoint"
                )
    return tp, pp


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvotuneError(f"{path}: cannot be read as a model shard ({e})") from e
    if not isinstance(sd, dict):
        raise EvotuneError(f"{path} holds a {type(sd).__name__}, not a state dict")
    if any(k.startswith("model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith(".inv_freq")}


class _Stages:
    """Shards of one pipeline stage at a time (memory-mapped), released when the next stage is asked for."""

    def __init__(self, folder: Path, tp: int):
        self.folder, self.tp = folder, tp
        self.stage: int | None = None
        self.shards: list[dict[str, torch.Tensor]] = []

    def get(self, p: int) -> list[dict[str, torch.Tensor]]:
        if self.stage != p:
            self.shards = []
            self.shards = [_load_shard(self.folder / f"model_tp{t}_pp{p}.pt") for t in range(self.tp)]
            self.stage = p
        return self.shards

    def release(self) -> None:
        self.shards, self.stage = [], None


def _interleaved(cfg: dict, where: Path) -> bool:
    adapt_hf = cfg.get("adapt_hf")
    qk = cfg.get("qk_interleaved")
    if adapt_hf is not None and qk is not None and bool(adapt_hf) == bool(qk):
        raise EvotuneError(
            f"{where}: adapt_hf={adapt_hf} and qk_interleaved={qk} contradict each other "
            "(adapt_hf=True means q/k are not interleaved); fix model_config.pt"
        )
    if qk is not None:
        return bool(qk)
    return not bool(True if adapt_hf is None else adapt_hf)


def deinterleave_qk(wqkv: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """GPT-J interleaved q/k rows inside each head -> rotate-half order (v untouched)."""
    g = heads // kv_heads
    d = wqkv.shape[0] // (kv_heads * (g + 2))
    grouped = wqkv.reshape(kv_heads, g + 2, d, *wqkv.shape[1:]).clone()
    qk = grouped[:, : g + 1]
    grouped[:, : g + 1] = torch.cat([qk[:, :, 0::2], qk[:, :, 1::2]], dim=2)
    return grouped.reshape(wqkv.shape)


# ---------------------------------------------------------------- reading


def split_dim(suffix: str, ffn_layout: str = "w2_down"):
    """Tensor-parallel dim of a layer weight (``attention.wo.weight`` ...): 0, 1, None (replicated) or 'unknown'."""
    down, up = ("w2", "w3") if ffn_layout == "w2_down" else ("w3", "w2")
    dims = {
        "attention.wqkv.weight": 0,
        "attention.wqkv.bias": 0,
        "attention.wo.weight": 1,
        "attention.wo.bias": None,
        "feed_forward.w1.weight": 0,
        f"feed_forward.{up}.weight": 0,
        f"feed_forward.{down}.weight": 1,
        "attention_norm.weight": None,
        "ffn_norm.weight": None,
    }
    return dims.get(suffix, "unknown")


class InternEvoCheckpoint:
    """An InternEvo checkpoint folder: its config, split, and a plan of the merged weights.

    ``ffn_layout``: 'auto' (detect the w2/w3 era from the shard shapes),
    'w2_down' (InternLM2 / InternEvo from 2024: w2 is the down projection) or
    'w3_down' (InternEvo before 2024: w3 is down, w2 is up).
    """

    def __init__(self, folder, ffn_layout: str = "auto"):
        self.folder = Path(folder)
        if ffn_layout not in FFN_LAYOUTS:
            raise EvotuneError(f"ffn_layout {ffn_layout!r}: use one of {', '.join(FFN_LAYOUTS)}")
        self.config = load_model_config(self.folder)
        self.tp, self.pp = shard_grid(self.folder)
        cfg, where = self.config, self.folder / CONFIG_NAME
        for key in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads"):
            if not isinstance(cfg.get(key), int):
                raise EvotuneError(f"{where}: key {key!r} is missing or not an integer")
        if cfg.get("num_chunks", 1) != 1:
            raise EvotuneError(
                f"{where}: num_chunks={cfg['num_chunks']} (interleaved pipeline) checkpoints are not supported; "
                "re-save with num_chunks=1"
            )
        if cfg.get("norm_type", "rmsnorm") != "rmsnorm" or cfg.get("apply_post_layer_norm", False):
            raise EvotuneError(f"{where}: only pre-norm RMSNorm InternLM2 models convert to Llama")
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_kv_attention_heads") or self.heads
        self.hidden = cfg["hidden_size"]
        self.head_dim = self.hidden // self.heads
        self.interleaved = _interleaved(cfg, where)
        self._stages = _Stages(self.folder, self.tp)
        self._scan(ffn_layout)

    def release(self) -> None:
        """Drop the memory-mapped shards still held (a plan's loaders map them again when called)."""
        self._stages.release()

    def _scan(self, ffn_layout: str) -> None:
        """Read every shard's key names and shapes (no tensor data) and check them against the config."""
        cfg, tp = self.config, self.tp
        self.stage_layers: list[int] = []
        self.shapes: list[list[dict[str, tuple]]] = []  # [p][t] -> key -> shape
        for p in range(self.pp):
            stage = self._stages.get(p)
            self.shapes.append([{k: tuple(v.shape) for k, v in sd.items()} for sd in stage])
            for t, sd in enumerate(stage):
                if set(sd) != set(stage[0]):
                    odd = sorted(set(sd) ^ set(stage[0]))[0]
                    raise EvotuneError(
                        f"{self.folder / f'model_tp{t}_pp{p}.pt'} and model_tp0_pp{p}.pt disagree on key {odd!r}: "
                        "the shards come from different checkpoints"
                    )
            layers = {int(m.group(1)) for k in stage[0] if (m := _LAYER_KEY.match(k))}
            if layers != set(range(len(layers))):
                raise EvotuneError(
                    f"{self.folder / f'model_tp0_pp{p}.pt'}: layer indices {sorted(layers)} are not 0..n-1 "
                    "(InternEvo numbers layers from 0 in every pipeline stage)"
                )
            self.stage_layers.append(len(layers))
        self._stages.release()
        if sum(self.stage_layers) != cfg["num_layers"]:
            raise EvotuneError(
                f"{self.folder}: the shards hold {sum(self.stage_layers)} layers ({self.stage_layers} per stage) "
                f"but {CONFIG_NAME} says num_layers={cfg['num_layers']}"
            )
        first, last = self.shapes[0][0], self.shapes[-1][0]
        embed = [k for k in _EMBED_KEYS if k in first]
        if len(embed) != 1:
            raise EvotuneError(
                f"{self.folder / 'model_tp0_pp0.pt'} has no tok_embeddings.weight or "
                "tok_embeddings.word_embeddings.weight: is this an InternLM2 checkpoint?"
            )
        self.embed_key = embed[0]
        self.dtype = self._stages.get(0)[0][self.embed_key].dtype
        self._stages.release()
        for key in ("norm.weight", "output.weight"):
            if key not in last:
                raise EvotuneError(f"{self.folder / f'model_tp0_pp{self.pp - 1}.pt'} has no {key} "
                                   "(the last pipeline stage holds it)")
        p = next(p for p in range(self.pp) if self.stage_layers[p])
        ffn = {w: self.shapes[p][0].get(f"layers.0.feed_forward.{w}.weight") for w in ("w1", "w2", "w3")}
        missing = [w for w, shape in ffn.items() if shape is None]
        if missing:
            raise EvotuneError(f"{self.folder / f'model_tp0_pp{p}.pt'}: layers.0.feed_forward.{missing[0]}.weight "
                               "is missing")
        self.ffn_layout = self._detect_ffn(ffn_layout, ffn["w2"], ffn["w3"])
        self.intermediate = ffn["w1"][0] * tp
        self._check_shapes()

    def _detect_ffn(self, ffn_layout: str, w2: tuple, w3: tuple) -> str:
        if ffn_layout != "auto":
            return ffn_layout
        hidden = self.hidden
        w2_down = w2[0] == hidden and w3[1] == hidden
        w3_down = w3[0] == hidden and w2[1] == hidden
        if w2_down and not w3_down:
            return "w2_down"
        if w3_down and not w2_down:
            return "w3_down"
        raise EvotuneError(
            f"{self.folder}: cannot tell from the shard shapes whether w2 or w3 is the down projection "
            f"(w2 {w2}, w3 {w3}); pass --ffn-layout w2_down (InternEvo from 2024, InternLM2) or "
            "w3_down (InternEvo before 2024)"
        )

    def _split_dim(self, suffix: str) -> int | None:
        dim = split_dim(suffix, self.ffn_layout)
        if dim == "unknown":
            raise EvotuneError(f"{self.folder}: unexpected shard key layers.N.{suffix} (not an InternLM2 weight)")
        return dim

    def _hf_suffix(self, suffix: str) -> str:
        if self.ffn_layout == "w3_down" and suffix in ("feed_forward.w2.weight", "feed_forward.w3.weight"):
            return "feed_forward.w3.weight" if suffix.endswith("w2.weight") else "feed_forward.w2.weight"
        return suffix

    def _expected(self, hf_suffix: str) -> tuple:
        H, nh, nkv, d, inter = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        return {
            "attention.wqkv.weight": ((nh + 2 * nkv) * d, H),
            "attention.wqkv.bias": ((nh + 2 * nkv) * d,),
            "attention.wo.weight": (H, nh * d),
            "attention.wo.bias": (H,),
            "feed_forward.w1.weight": (inter, H),
            "feed_forward.w3.weight": (inter, H),
            "feed_forward.w2.weight": (H, inter),
            "attention_norm.weight": (H,),
            "ffn_norm.weight": (H,),
        }[hf_suffix]

    def _merged_shape(self, p: int, key: str, dim: int | None) -> tuple:
        shapes = [self.shapes[p][t][key] for t in range(self.tp)]
        if dim is None:
            return shapes[0]
        out = list(shapes[0])
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)

    def _check_shapes(self) -> None:
        vocab, H = self.config["vocab_size"], self.hidden
        checks = [(0, self.embed_key, _EMBED_KEYS[self.embed_key], (vocab, H)),
                  (self.pp - 1, "norm.weight", None, (H,)),
                  (self.pp - 1, "output.weight", 0, (vocab, H))]
        for p in range(self.pp):
            for key in self.shapes[p][0]:
                m = _LAYER_KEY.match(key)
                if m:
                    dim = self._split_dim(m.group(2))
                    checks.append((p, key, dim, self._expected(self._hf_suffix(m.group(2)))))
                elif key not in _EMBED_KEYS and key not in ("norm.weight", "output.weight"):
                    raise EvotuneError(
                        f"{self.folder / f'model_tp0_pp{p}.pt'}: unexpected key {key!r} (not an InternLM2 weight)"
                    )
        for p, key, dim, want in checks:
            got = self._merged_shape(p, key, dim)
            if got != want:
                raise EvotuneError(
                    f"{self.folder / f'model_tp0_pp{p}.pt'}: {key} merges (over tp={self.tp}) to shape {got} "
                    f"but {CONFIG_NAME} implies {want}; the shards do not belong to this model_config.pt"
                )

    def _loader(self, p: int, key: str, dim: int | None, post=None):
        def load():
            parts = [sd[key] for sd in self._stages.get(p)]
            t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            return post(t) if post is not None else t

        return load

    def plan(self) -> dict[str, Planned]:
        """The merged weights in Hugging Face InternLM2 names, in stage order."""
        out: dict[str, Planned] = {}
        dim = _EMBED_KEYS[self.embed_key]
        out["model.tok_embeddings.weight"] = Planned(
            self._merged_shape(0, self.embed_key, dim), self.dtype, self._loader(0, self.embed_key, dim)
        )
        offset = 0
        qk_fix = (lambda t: deinterleave_qk(t, self.heads, self.kv_heads)) if self.interleaved else None
        for p in range(self.pp):
            for local in range(self.stage_layers[p]):
                prefix = f"layers.{local}."
                for key in sorted(k for k in self.shapes[p][0] if k.startswith(prefix)):
                    suffix = key[len(prefix):]
                    d = self._split_dim(suffix)
                    post = qk_fix if suffix.startswith("attention.wqkv.") else None
                    name = f"model.layers.{offset + local}.{self._hf_suffix(suffix)}"
                    out[name] = Planned(self._merged_shape(p, key, d), self.dtype, self._loader(p, key, d, post))
            offset += self.stage_layers[p]
        last = self.pp - 1
        out["model.norm.weight"] = Planned(self._merged_shape(last, "norm.weight", None), self.dtype,
                                           self._loader(last, "norm.weight", None))
        head_post = _normalize_rows if self.config.get("norm_head", False) else None
        out["output.weight"] = Planned(self._merged_shape(last, "output.weight", 0), self.dtype,
                                       self._loader(last, "output.weight", 0, head_post))
        return out

    def internlm2_config(self, max_position_embeddings: int | None = None, rope_scaling: dict | None = None,
                         dtype: torch.dtype | None = None) -> dict:
        """The InternLM2 ``config.json`` for this checkpoint (the published layout, with ``auto_map``)."""
        cfg = self.config
        out_dtype = dtype or parse_dtype(cfg.get("dtype"), self.dtype, what=f"{self.folder / CONFIG_NAME} dtype")
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "attn_implementation": "eager",
            "auto_map": dict(INTERNLM2_AUTO_MAP),
            "bias": not cfg.get("no_bias", True),
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": max_position_embeddings or cfg.get("max_position_embeddings") or 32768,
            "model_type": "internlm2",
            "num_attention_heads": self.heads,
            "num_hidden_layers": cfg["num_layers"],
            "num_key_value_heads": self.kv_heads,
            "pad_token_id": 2,
            "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
            "rope_scaling": rope_scaling,
            "rope_theta": cfg.get("rope_base", 10000),
            "tie_word_embeddings": False,
            "torch_dtype": dtype_name(out_dtype),
            "use_cache": True,
            "vocab_size": cfg["vocab_size"],
        }


def _normalize_rows(w: torch.Tensor) -> torch.Tensor:
    return F.normalize(w.float(), dim=-1).to(w.dtype)


# ---------------------------------------------------------------- writing


def internevo_model_config(cfg: dict, dtype: torch.dtype) -> dict:
    """``model_config.pt`` for an InternLM2 ``config.json`` dict, with the keys InternEvo's model takes."""
    out = {
        "num_attention_heads": cfg["num_attention_heads"],
        "embed_split_hidden": True,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_layers": cfg["num_hidden_layers"],
        "norm_type": "rmsnorm",
        "layer_norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
        "no_bias": not cfg.get("bias", False),
        "mlp_ratio": cfg["intermediate_size"] / cfg["hidden_size"],
        "num_kv_attention_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "dtype": dtype,
        "norm_head": False,
        "adapt_hf": True,
        "use_flash_attn": True,
        "rope_base": cfg.get("rope_theta", 10000),
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "num_chunks": 1,
    }
    scaling = cfg.get("rope_scaling")
    if scaling:
        out["rope_scaling"] = dict(scaling)
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that owns exactly its storage (torch.save writes a view's whole storage)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone()


def check_split(cfg: dict, tp: int, pp: int) -> None:
    """tp must split whole kv groups, the vocab, the hidden size and the FFN; pp at most num_layers."""
    if tp < 1:
        raise EvotuneError(f"--tp {tp}: must be at least 1")
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for what, n in (("num_key_value_heads", kv), ("vocab_size", cfg["vocab_size"]),
                    ("hidden_size", cfg["hidden_size"]), ("intermediate_size", cfg["intermediate_size"])):
        if n % tp:
            raise EvotuneError(f"--tp {tp} does not divide {what}={n}: choose a tp that divides it")
    partition_uniform(cfg["num_hidden_layers"], pp)


def write_internevo(plan: Mapping[str, Planned], cfg: dict, out_dir, tp: int, pp: int,
                    dtype=None, overwrite: bool = False) -> Path:
    """Write InternLM2-named weights as ``model_tp{t}_pp{p}.pt`` shards + ``model_config.pt``.

    ``cfg`` is the InternLM2 ``config.json`` dict. Memory: one shard's tensors
    (1/(tp*pp) of the model) plus the tensor being split.
    """
    check_split(cfg, tp, pp)
    floats = [p.dtype for p in plan.values() if p.dtype.is_floating_point]
    out_dtype = dtype or (floats[0] if floats else torch.float32)
    parts = partition_uniform(cfg["num_hidden_layers"], pp)
    layer_keys: dict[int, list[str]] = {}
    for name in plan:
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if m:
            layer_keys.setdefault(int(m.group(1)), []).append(m.group(2))
        elif name not in ("model.tok_embeddings.weight", "model.norm.weight", "output.weight"):
            raise EvotuneError(f"weight {name!r} has no place in an InternEvo InternLM2 checkpoint")
    def piece(name: str, dim: int | None, t: int) -> torch.Tensor:
        full = plan[name].load()
        if full.is_floating_point() and full.dtype != out_dtype:
            full = full.to(out_dtype)
        return _own(full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[t])

    with AtomicDir(out_dir, overwrite=overwrite) as tmp:
        torch.save(internevo_model_config(cfg, out_dtype), tmp / CONFIG_NAME)
        for p, (start, end) in enumerate(parts):
            for t in range(tp):
                shard: dict[str, torch.Tensor] = {}
                if p == 0:
                    shard["tok_embeddings.weight"] = piece("model.tok_embeddings.weight", 1, t)
                for i in range(start, end):
                    for suffix in layer_keys.get(i, []):
                        dim = split_dim(suffix)
                        if dim == "unknown":
                            raise EvotuneError(f"model.layers.{i}.{suffix} has no place in an InternEvo checkpoint")
                        shard[f"layers.{i - start}.{suffix}"] = piece(f"model.layers.{i}.{suffix}", dim, t)
                if p == pp - 1:
                    shard["norm.weight"] = piece("model.norm.weight", None, t)
                    shard["output.weight"] = piece("output.weight", 0, t)
                torch.save(shard, tmp / f"model_tp{t}_pp{p}.pt")
                del shard
    return Path(out_dir)
