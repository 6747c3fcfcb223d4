"""Small index records shared by the tests of the vector store and of Milvus: unit vectors of DIM
dimensions, the settings of an index of them, and a slide's record of a row of patches."""
from __future__ import annotations

import numpy as np

from histo_retrieval.search.index import IndexSettings, SourceRecord

DIM = 8
SETTINGS = IndexSettings("model.pth", "0" * 64, "m", {}, 32, DIM, 1.0, 32, 0.5)


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def record(path: str, vectors: np.ndarray) -> SourceRecord:
    boxes = np.array([[64 * i, 0, 64, 64] for i in range(len(vectors))], np.int64).reshape(-1, 4)
    return SourceRecord(path, "slide", vectors, boxes, file_size=1, mtime=1.0)
