"""``dataset_weights``: the share of packs each sub-dataset contributes to an epoch.

Names. A name is matched against the data files actually used (after
``min_length``), by their paths relative to the training folder:

* a relative folder path (``"en/books"``) or file path (``"en/books/b1.bin"``);
* or the base name of exactly one folder at any depth (``"books"``); a base name
  shared by several folders is an error that lists their full paths.

Each file belongs to the deepest named folder (or file) that contains it, so
``{"en": 1, "en/books": 2}`` gives ``en/books`` its own weight and the rest of
``en`` the other. A file under no name is an error: name its folder, with weight
0 to leave it out. A name that matches nothing is an error.

Sampling. An epoch keeps the unweighted size ``N`` (the number of packs). The
normalised weights ``p_i`` give sub-dataset ``i`` exactly ``c_i`` pack draws
(``p_i * N`` rounded by largest remainder, so the counts sum to ``N``). With
``n_i`` packs it contributes every pack ``c_i // n_i`` times plus ``c_i % n_i``
distinct packs chosen by ``numpy.random.default_rng((seed, epoch))``: packs
repeat (up-sampling) or are left out (down-sampling) deterministically. The
sampler then orders the epoch's ``N`` entries with its own permutation, as
without weights. The epoch's population is a pure function of (seed, epoch,
data), so a resumed run rebuilds it exactly from the sampler state.
"""

from __future__ import annotations

import difflib
import math

import numpy as np

from evotune.errors import EvotuneError


def _folders_of(rel_path: str) -> list[str]:
    """Every folder above a relative file path, outermost first."""
    parts = rel_path.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _resolve(name: str, folders: set[str], files: set[str]) -> str:
    key = name.strip().strip("/").replace("\\", "/")
    if key in folders or key in files:
        return key
    by_base = sorted(f for f in folders if f.rsplit("/", 1)[-1] == key)
    if len(by_base) == 1:
        return by_base[0]
    if len(by_base) > 1:
        raise EvotuneError(f"dataset_weights: name '{name}' matches several folders ({', '.join(by_base)}); "
                           "use the path relative to the training folder")
    close = difflib.get_close_matches(key, sorted(folders | files | {f.rsplit('/', 1)[-1] for f in folders}), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise EvotuneError(f"dataset_weights: name '{name}' matches no folder or data file of the training folder"
                       f"{hint}; names are paths relative to it, or a folder's unique base name")


def _largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    exact = p * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class Mixing:
    """The resolved weights of one packed dataset; ``epoch_packs(e)`` is epoch ``e``'s population."""

    def __init__(self, dataset, weights: dict, seed: int):
        if not isinstance(weights, dict):
            raise EvotuneError(f"dataset_weights must be a dict of sub-dataset name -> weight, got {weights!r}")
        files = [f.rel_path for f in dataset.folder.files]
        folders = {d for f in files for d in _folders_of(f)}
        keys: dict[str, float] = {}
        for name, w in weights.items():
            try:
                w = float(w)
            except (TypeError, ValueError):
                w = math.nan
            if not math.isfinite(w) or w < 0:
                raise EvotuneError(f"dataset_weights['{name}'] = {weights[name]!r}: a weight is a number >= 0")
            key = _resolve(str(name), folders, set(files))
            if key in keys:
                raise EvotuneError(f"dataset_weights: '{name}' and another name both mean '{key}'")
            keys[key] = w
        if sum(keys.values()) <= 0:
            raise EvotuneError("dataset_weights: all weights are 0; give at least one sub-dataset a positive weight")

        self.names = list(keys)
        members: list[list[int]] = [[] for _ in self.names]
        for fi, rel in enumerate(files):
            owner = next((k for k in [rel] + _folders_of(rel)[::-1] if k in keys), None)
            if owner is None:
                raise EvotuneError(f"dataset_weights: {rel} is under no named sub-dataset; add its folder "
                                   f"('{rel.rsplit('/', 1)[0] if '/' in rel else rel}') with a weight "
                                   "(0 leaves it out)")
            members[self.names.index(owner)].append(fi)
        offsets = dataset.pack_offsets
        self.packs = [np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in m] or [np.zeros(0, np.int64)])
                      .astype(np.int64) for m in members]
        w = np.array([keys[k] for k in self.names])
        for name, packs, weight in zip(self.names, self.packs, w):
            if weight > 0 and len(packs) == 0:
                raise EvotuneError(f"dataset_weights: '{name}' has weight {weight} but no full pack "
                                   f"(of {dataset.packed_length} tokens); add data or set its weight to 0")
        self.weights = w / w.sum()
        self.num_packs = len(dataset)
        self.counts = _largest_remainder(self.weights, self.num_packs)
        self.seed = int(seed)

    def epoch_packs(self, epoch: int) -> np.ndarray:
        """Global pack ids drawn for ``epoch`` (sorted; the sampler permutes them)."""
        rng = np.random.default_rng((self.seed % 2**63, int(epoch)))
        parts = []
        for packs, count in zip(self.packs, self.counts):
            if count == 0:
                continue
            repeats, extra = divmod(int(count), len(packs))
            parts.append(np.tile(packs, repeats))
            parts.append(rng.choice(packs, extra, replace=False))
        return np.sort(np.concatenate(parts))
