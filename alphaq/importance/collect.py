"""Stage 2 of the default path: the importance matrix, from the model's own text, through llama.cpp.

The statistic is llama.cpp's (``tools/imatrix/imatrix.cpp``, ``collect_imatrix``): for every
weight, the sum of squared input activations per input column and the number of tokens, per
matrix. A merged expert tensor has one matrix per expert and only the tokens routed to an expert
count for it (``MUL_MAT_ID``: one entry per token and selected expert). It is collected with the
same hook ``llama-imatrix`` uses, the scheduler's eval callback, on a model llama.cpp runs itself,
so no float copy of the model is ever built here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from alphaq.errors import AlphaQError
from alphaq.runtime.forward import GGML_TYPE_F32, GGMLTensor, Session, ops, tensor_array
from alphaq.importance.imatrix_file import Imatrix

log = logging.getLogger(__name__)


def weight_name(raw: bytes) -> str:
    """llama-imatrix's filter_tensor_name: the part between '#' marks when there are any."""
    name = raw.decode()
    if "#" in name:
        name = name.split("#")[1]
    return name


class Collector:
    """Accumulates llama.cpp's imatrix statistic from eval callbacks (float64 sums)."""

    def __init__(self, names: Iterable[str]):
        self.names = set(names)
        self.sums: dict[str, np.ndarray] = {}  # (n_mat, ne0)
        self.counts: dict[str, np.ndarray] = {}  # (n_mat,)
        o = ops()
        self._mul_mat, self._mul_mat_id = o["MUL_MAT"], o["MUL_MAT_ID"]

    def wants(self, t: GGMLTensor) -> bool:
        if t.op not in (self._mul_mat, self._mul_mat_id):
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        return src1.type == GGML_TYPE_F32 and weight_name(src0.name) in self.names

    def _slot(self, name: str, n_mat: int, ne0: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, ne0))
            self.counts[name] = np.zeros(n_mat)
        if self.sums[name].shape != (n_mat, ne0):
            raise RuntimeError(f"{name}: inconsistent imatrix shape {self.sums[name].shape} vs {(n_mat, ne0)}")
        return self.sums[name], self.counts[name]

    def __call__(self, t: GGMLTensor) -> None:
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(src0.name)
        x = tensor_array(src1).astype(np.float64)  # (ne3, ne2, ne1, ne0)
        if t.op == self._mul_mat_id:
            self._add_routed(name, src0, x, tensor_array(t.src[2].contents))
        else:
            self._add_dense(name, src0, x)

    def _add_routed(self, name: str, src0: GGMLTensor, x: np.ndarray, ids: np.ndarray) -> None:
        # src1: (1, n_tokens, ne1, cols) with ne1 = 1 (shared input) or n_expert_used; ids: (1, 1, n_tokens, n_ids)
        n_as = int(src0.ne[2])
        sums, counts = self._slot(name, n_as, x.shape[-1])
        ids = ids[0, 0]
        sq = x[0] ** 2  # (n_tokens, ne1, cols)
        for j in range(ids.shape[1]):
            ex = ids[:, j]
            if ex.min() < 0 or ex.max() >= n_as:
                raise RuntimeError(f"{name}: expert id out of range in MUL_MAT_ID")
            onehot = (ex[:, None] == np.arange(n_as)[None, :]).astype(np.float64)  # (n_tokens, n_as)
            sums += onehot.T @ sq[:, j % sq.shape[1], :]
            counts += onehot.sum(axis=0)

    def _add_dense(self, name: str, src0: GGMLTensor, x: np.ndarray) -> None:
        ne2, ne3 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = ne2 * ne3
        sums, counts = self._slot(name, n_mat, x.shape[-1])
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                sums[(i3 % ne3) * ne2 + (i2 % ne2)] += (x[i3, i2] ** 2).sum(axis=0)
        counts += x.shape[0] * x.shape[1] * x.shape[2] / n_mat

    def result(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        bad = [n for n, s in self.sums.items() if not np.isfinite(s).all()]
        if bad:
            raise AlphaQError(f"non-finite activations entering {bad[0]}: the model produces inf/NaN on its own text")
        return Imatrix(sums={n: s.astype(np.float32) for n, s in sorted(self.sums.items())},
                       counts={n: self.counts[n].copy() for n in sorted(self.sums)},
                       datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)


def collect_imatrix(session: Session, windows: np.ndarray, *, dataset: str = "alphaq self text",
                    progress: bool = False) -> Imatrix:
    """llama.cpp's importance matrix of every weight matrix the model multiplies with (all
    ``blk.*`` weights and the output head; token embeddings are looked up, not multiplied)."""
    from tqdm import tqdm

    names = [n for n in session.weights if n.startswith("blk.") or n == "output.weight"]
    if not names:
        raise AlphaQError(f"{session.path} has no weights llama.cpp multiplies with")
    col = Collector(names)
    with session.watch(col.wants, col):
        for w in tqdm(windows, desc="importance", unit="window", disable=not progress, dynamic_ncols=True):
            session.logits([int(t) for t in w])
    missing = sorted(set(names) - set(col.sums))
    if missing:
        log.info("no matrix multiplication seen for %d weights (e.g. %s); they get no importance vector",
                 len(missing), missing[0])
    return col.result([dataset], len(windows), int(windows.shape[1]))
