"""Write InternEvo tokenized files (``.bin`` + ``.bin.meta``), streaming.

One document per line, ``{"tokens": [...]}``; the meta file is an ``np.save``d
``(N, 2)`` int64 array of (byte offset, token count), saved without the
``.npy`` suffix as InternEvo names it. int64 offsets never wrap, unlike the
int32 meta that InternEvo's own tokenizer writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np


class BinWriter:
    """Append documents to ``path`` one at a time; ``close()`` writes the meta.

    Memory stays bounded: only two integers per document are kept.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "wb")
        self._rows: list[tuple[int, int]] = []
        self._offset = 0

    def write(self, tokens: Sequence[int], **extra) -> None:
        """Write one document; ``extra`` keys are stored beside ``tokens`` (InternEvo ignores them)."""
        line = (json.dumps({"tokens": [int(t) for t in tokens], **extra}, ensure_ascii=False) + "\n").encode()
        self._file.write(line)
        self._rows.append((self._offset, len(tokens)))
        self._offset += len(line)

    def close(self) -> None:
        self._file.close()
        meta = np.asarray(self._rows, dtype=np.int64).reshape(-1, 2)
        with open(self.path + ".meta", "wb") as f:
            np.save(f, meta)

    def __enter__(self) -> "BinWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_bin(path: str | os.PathLike, documents: Iterable[Sequence[int]]) -> None:
    """Write a whole ``.bin`` + ``.bin.meta`` pair from token lists."""
    with BinWriter(path) as w:
        for doc in documents:
            w.write(doc)
