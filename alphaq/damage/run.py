"""The default path's three forward stages in one place: self text -> importance -> damage.

    float GGUF ──sample──> own text ──eval callback──> importance matrix
               ──fake-quantise one tensor at a time──> KL on own text ──> damage table

Each stage's result is cached under ~/.cache/alphaq/{selftext,damage}, keyed by the model's
content and every setting that changes it, so re-running a conversion (another budget, or after
an interruption) reuses the finished stages. The model is loaded into llama.cpp once for the
importance matrix and the measurements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from alphaq.damage import DamageConfig, DamageTable, Reference
from alphaq.files import atomic_write_text, cache_root, fingerprint
from alphaq.importance.imatrix_file import Imatrix
from alphaq.selftext import SelfTextConfig, cached_sample, sample

log = logging.getLogger(__name__)


@dataclass
class SelfCalibration:
    """What the forward stages produced: the text, the importance matrix, the damage table."""

    tokens: np.ndarray  # (n_seq, n_ctx) the model's own text
    imatrix: Imatrix  # from that text (or the user's, when given)
    damage: DamageTable
    seconds: dict[str, float]
    imatrix_source: str  # "self" or the user's file


def _damage_key(model_key: str, text_cfg: SelfTextConfig, cfg: DamageConfig, names: Sequence[str],
                candidates: Sequence[GGMLQuantizationType], per_expert: bool, imatrix_key: str) -> str:
    blob = json.dumps({"model": model_key, "text": asdict(text_cfg), "damage": asdict(cfg), "names": list(names),
                       "types": [t.name for t in candidates], "per_expert": per_expert, "imatrix": imatrix_key,
                       "v": 1}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _imatrix_key(imatrix: Imatrix) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(imatrix.sums):
        h.update(name.encode())
        h.update(np.ascontiguousarray(imatrix.sums[name], dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(imatrix.counts[name], dtype=np.float64).tobytes())
    return h.hexdigest()


def self_calibrate(model: Path, names: Sequence[str], candidates: Sequence[GGMLQuantizationType], *,
                   text_cfg: SelfTextConfig = SelfTextConfig(), cfg: DamageConfig = DamageConfig(),
                   user_imatrix: Imatrix | None = None, imatrix_source: str = "self", per_expert: bool = False,
                   progress: bool = False, use_cache: bool = True, n_threads: int | None = None) -> SelfCalibration:
    """Run (or reuse) the three stages on the float GGUF ``model`` for the weights ``names``."""
    from alphaq.damage.measure import measure
    from alphaq.forward import Session
    from alphaq.importance.collect import collect_imatrix

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model_key = fingerprint(model)
    if use_cache:
        tokens = cached_sample(model, text_cfg, progress=progress, key=model_key)
    else:
        tokens = sample(model, text_cfg, progress=progress)
    seconds["self_text"] = time.perf_counter() - t0
    with Session(model, text_cfg.n_ctx, n_threads=n_threads) as session:
        t0 = time.perf_counter()
        imatrix = user_imatrix or collect_imatrix(session, tokens, progress=progress,
                                                  dataset=f"alphaq self text {text_cfg.n_seq}x{text_cfg.n_ctx} seed {text_cfg.seed}")
        seconds["importance"] = time.perf_counter() - t0
        key = _damage_key(model_key, text_cfg, cfg, names, candidates, per_expert, _imatrix_key(imatrix))
        path = cache_root() / "damage" / f"{key}.json"
        if use_cache and path.exists():
            log.info("damage: reusing %s", path)
            table = DamageTable.from_json(json.loads(path.read_text()))
        else:
            t0 = time.perf_counter()
            ref = Reference(session, tokens[: cfg.n_windows])
            table = measure(session, ref, names, candidates, cfg, imatrix=imatrix.means(),
                            tokens=imatrix.counts, per_expert=per_expert, progress=progress)
            table.seconds["reference"] = round(time.perf_counter() - t0 - sum(table.seconds.values()), 3)
            if use_cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(table.to_json(), sort_keys=True) + "\n")
        seconds["damage"] = sum(table.seconds.values())
    return SelfCalibration(tokens, imatrix, table, seconds, "self" if user_imatrix is None else imatrix_source)
