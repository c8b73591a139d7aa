"""The default path's three forward stages in one place: self text -> importance -> damage.

    float GGUF ──sample──> own text ──eval callback──> importance matrix
               ──fake-quantise one tensor at a time──> KL on own text ──> damage table

Each stage's result is cached under ~/.cache/alphaq/{selftext,importance,damage}, keyed by the model's
content and every setting that changes it, so re-running a conversion (another budget, or after
an interruption) reuses the finished stages. The model is loaded into llama.cpp once for the
importance matrix and the measurements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from alphaq.damage import DamageConfig, DamageTable, Reference
from alphaq.damage.journal import Journal
from alphaq import memory
from alphaq.errors import AlphaQError
from alphaq.files import atomic_write_text, cache_root, fingerprint
from alphaq.importance.imatrix_file import Imatrix
from alphaq.pipeline.resume import pause_for_test
from alphaq.selftext import SelfTextConfig, cached_sample, load_sample, sample, sample_cache_path

log = logging.getLogger(__name__)


@dataclass
class SelfCalibration:
    """What the forward stages produced: the text, the importance matrix, the damage table."""

    tokens: np.ndarray  # (n_seq, n_ctx) the model's own text
    imatrix: Imatrix  # from that text (or the user's, when given)
    damage: DamageTable
    seconds: dict[str, float]
    imatrix_source: str  # "self" or the user's file
    reused: tuple[str, ...] = ()  # stages read from the cache: "self text", "importance", "damage"
    working_copy: str = "float"  # the model the stages ran on: "float" or "q8_0" (WORKING_COPIES)
    # the entries of imatrix that --include-weights / --exclude-weights keep: what the damage was
    # costed with and the quantiser gets (None: all of imatrix)
    used: Imatrix | None = None

    @property
    def quantiser_imatrix(self) -> Imatrix:
        return self.imatrix if self.used is None else self.used


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
                   progress: bool = False, use_cache: bool = True, n_threads: int | None = None,
                   working_copy: str = "float", work_dir: Path | None = None,
                   weight_filter: tuple[Sequence[str], Sequence[str]] = ((), ())) -> SelfCalibration:
    """Run (or reuse) the three stages on the float GGUF ``model`` for the weights ``names``.

    weight_filter: (--include-weights, --exclude-weights) strings; the damage is costed with the
    importance vectors of the weights they keep only (alphaq.importance.imatrix_file.select_weights).

    working_copy: "float" runs them on ``model`` itself; "q8_0" on a Q8_0 copy that llama.cpp's
    quantiser writes into ``work_dir`` first (models larger than RAM, as llama-imatrix users do:
    half the bytes to hold or re-read; see WORKING_COPIES), made only when a stage must run and
    deleted when they are done. Its stages are cached apart from the float model's."""
    from alphaq.damage.measure import measure
    from alphaq.runtime.forward import Session

    if working_copy not in WORKING_COPIES:
        raise AlphaQError(f"working copy {working_copy!r}: allowed {', '.join(WORKING_COPIES)}")
    seconds: dict[str, float] = {}
    reused: list[str] = []
    t0 = time.perf_counter()
    model_key = working_key(fingerprint(model), working_copy)
    with ExitStack() as stack:
        working = _lazy(lambda: stack.enter_context(_working_model(model, working_copy, work_dir, n_threads, seconds)))
        with memory.stage("self_text"):
            tokens = _self_text(working, text_cfg, model_key, use_cache, progress, reused)
        seconds["self_text"] = time.perf_counter() - t0 - seconds.get("working_copy", 0.0)
        # llama.cpp loads the model only for a stage that runs (not when both come from the cache)
        session = _lazy(lambda: stack.enter_context(Session(working(), text_cfg.n_ctx, n_threads=n_threads)))
        t0 = time.perf_counter()
        with memory.stage("importance"):
            imatrix = user_imatrix or _importance(session, tokens, text_cfg, model_key, use_cache, progress, reused)
        seconds["importance"] = time.perf_counter() - t0
        used = _filtered(imatrix, *weight_filter)
        key = _damage_key(model_key, text_cfg, cfg, names, candidates, per_expert, _imatrix_key(used or imatrix))
        path = damage_cache_path(key)
        with memory.stage("damage"):
            if use_cache and path.exists():
                log.info("damage: reusing %s", path)
                t0 = time.perf_counter()
                table = DamageTable.from_json(json.loads(path.read_text()))
                reused.append("damage")
                seconds["damage"] = time.perf_counter() - t0  # (the table's own seconds are the measurement's)
            else:
                pause_for_test("damage")
                t0 = time.perf_counter()
                ref = Reference(session(), tokens[: cfg.windows(names)])
                t_ref = time.perf_counter() - t0
                journal = Journal(journal_path(key), key) if use_cache else None
                costed = used or imatrix
                table = measure(session(), ref, names, candidates, cfg, imatrix=costed.means(),
                                tokens=costed.counts, per_expert=per_expert, progress=progress, journal=journal)
                table.seconds["reference"] = round(t_ref, 3)
                if use_cache:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, json.dumps(table.to_json(), sort_keys=True) + "\n")
                    journal.discard()
                # this run's own work (a resumed table's seconds include the stopped run's part)
                seconds["damage"] = time.perf_counter() - t0
    return SelfCalibration(tokens, imatrix, table, seconds, "self" if user_imatrix is None else imatrix_source,
                           tuple(reused), working_copy, used)


def _filtered(imatrix: Imatrix, include: Sequence[str], exclude: Sequence[str], quiet: bool = False) -> Imatrix | None:
    """The entries --include-weights / --exclude-weights keep (None when neither is given)."""
    if not include and not exclude:
        return None
    from alphaq.importance.imatrix_file import select_weights

    kept, unused = select_weights(imatrix.sums, include, exclude)
    if quiet:
        return imatrix.only(kept)
    flag = "--include-weights" if include else "--exclude-weights"
    for s in unused:
        log.warning("%s %s matches no weight of the importance matrix; it %s nothing", flag, s,
                    "includes" if include else "excludes")
    log.info("importance: %d of %d weights keep their importance vector (%s)", len(kept), len(imatrix.sums), flag)
    return imatrix.only(kept)


@dataclass(frozen=True)
class CachedStages:
    """What earlier runs of the same model and settings left in the cache for `self_calibrate`,
    as the pre-flight sees it (cached_stages)."""

    self_text: bool = False
    importance: bool = False
    damage: bool = False  # the whole table
    measured: tuple[int, int] = (0, 0)  # a stopped run's journal: (tensors measured, of those to measure)

    @property
    def damage_left(self) -> float:
        """The share of the damage stage still to run. Its forward passes, one per measured tensor,
        are most of it (README, "Conversion"), so a journal counts by its measured tensors."""
        if self.damage:
            return 0.0
        done, total = self.measured
        return 1.0 - done / total if total else 1.0

    def describe(self) -> str:
        done = [stage for stage, hit in (("self text", self.self_text), ("importance", self.importance),
                                         ("damage", self.damage)) if hit]
        if self.measured[0]:
            done.append(f"damage of {self.measured[0]} of {self.measured[1]} measured tensors (a stopped run's)")
        return ", ".join(done)


def cached_stages(float_key: str, names: Sequence[str], candidates: Sequence[GGMLQuantizationType], *,
                  text_cfg: SelfTextConfig = SelfTextConfig(), cfg: DamageConfig = DamageConfig(),
                  user_imatrix: Imatrix | None = None, per_expert: bool = False, working_copy: str = "float",
                  weight_filter: tuple[Sequence[str], Sequence[str]] = ((), ())) -> CachedStages:
    """What `self_calibrate` would take from the cache for the float model whose fingerprint is
    ``float_key`` (the same arguments), read without running or changing anything."""
    from alphaq.damage.anchors import depth_anchors
    from alphaq.damage.journal import read_records

    model_key = working_key(float_key, working_copy)
    tokens = load_sample(sample_cache_path(model_key, text_cfg))
    text = tokens is not None and tokens.shape == (text_cfg.n_seq, text_cfg.n_ctx)
    path = importance_cache_path(model_key, text_cfg)
    importance = user_imatrix is None and path.exists()
    imatrix = user_imatrix if user_imatrix is not None else _load_imatrix(path) if importance else None
    if imatrix is None:  # the damage is keyed by the importance matrix's content
        return CachedStages(text, importance)
    used = _filtered(imatrix, *weight_filter, quiet=True)
    key = _damage_key(model_key, text_cfg, cfg, names, candidates, per_expert, _imatrix_key(used or imatrix))
    if damage_cache_path(key).exists():
        return CachedStages(text, importance, damage=True)
    records = read_records(journal_path(key), key) or {}
    measured = depth_anchors(names, cfg.anchors).measured
    done = sum(1 for n in measured if n in records and records[n].damage is not None)
    return CachedStages(text, importance, measured=(done, len(measured)))


# what the forward stages can run: the float model, or its Q8_0 copy (the alphaq convert flag
# --working-copy; "auto" picks q8_0 when the float model does not fit in RAM, alphaq.pipeline.convert)
WORKING_COPIES = ("float", "q8_0")


@contextmanager
def _working_model(model: Path, working_copy: str, work_dir: Path | None, n_threads: int | None,
                   seconds: dict[str, float]):
    """The GGUF the forward stages load: ``model``, or its Q8_0 copy, written by llama.cpp's quantiser
    (its Q8_0 mix: every matrix Q8_0, norms F32) into ``work_dir`` and deleted afterwards."""
    if working_copy == "float":
        yield model
        return
    import tempfile

    from alphaq.gguf.quantize import QUANTISER_BUFFER_BYTES, quantize_stock

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".alphaq-q8_0-", dir=work_dir) as tmp:
        copy = Path(tmp) / "working-copy-q8_0.gguf"
        log.info("forward stages: writing a Q8_0 working copy of %s to %s", model.name, copy)
        quantize_stock(model, copy, "Q8_0", nthread=n_threads or 0, max_buf_size=QUANTISER_BUFFER_BYTES)
        seconds["working_copy"] = time.perf_counter() - t0
        yield copy


def _lazy(make):
    """A getter that calls ``make`` once, on first use."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]

    return get


def _self_text(model: Callable[[], Path], text_cfg: SelfTextConfig, model_key: str, use_cache: bool,
               progress: bool, reused: list[str]) -> np.ndarray:
    """``model``: a getter, so that a working copy is made only when the text is not cached."""
    if not use_cache:
        return sample(model(), text_cfg, progress=progress)
    tokens = load_sample(sample_cache_path(model_key, text_cfg))
    if tokens is not None and tokens.shape == (text_cfg.n_seq, text_cfg.n_ctx):
        log.info("self text: reusing %s", sample_cache_path(model_key, text_cfg))
        reused.append("self text")
        return tokens
    return cached_sample(model(), text_cfg, progress=progress, key=model_key)


def _importance(session: Callable[[], object], tokens: np.ndarray, text_cfg: SelfTextConfig, model_key: str,
                use_cache: bool, progress: bool, reused: list[str]) -> Imatrix:
    """The importance matrix of the model's own text, cached under ~/.cache/alphaq/importance keyed
    by the model's content and the text's settings (the text is a function of both)."""
    from alphaq.importance.collect import collect_imatrix

    dataset = _dataset_name(text_cfg)
    path = importance_cache_path(model_key, text_cfg)
    if use_cache and path.exists():
        log.info("importance: reusing %s", path)
        reused.append("importance")
        return _load_imatrix(path)
    pause_for_test("importance")
    imatrix = collect_imatrix(session(), tokens, progress=progress, dataset=dataset)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_imatrix(path, imatrix)
    return imatrix


def _dataset_name(text_cfg: SelfTextConfig) -> str:
    return f"alphaq self text {text_cfg.n_seq}x{text_cfg.n_ctx} seed {text_cfg.seed}"


def working_key(float_key: str, working_copy: str) -> str:
    """The cache key of the model the forward stages run: the float model's fingerprint, marked
    when they run its Q8_0 copy (whose stages are cached apart)."""
    return float_key + ("" if working_copy == "float" else f"+{working_copy}")


def importance_cache_path(model_key: str, text_cfg: SelfTextConfig) -> Path:
    """Keyed by the model's content and the text's settings (the text is a function of both)."""
    blob = json.dumps({"model": model_key, "text": asdict(text_cfg), "dataset": _dataset_name(text_cfg), "v": 1},
                      sort_keys=True)
    return cache_root() / "importance" / f"{hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()}.npz"


def damage_cache_path(key: str) -> Path:
    return cache_root() / "damage" / f"{key}.json"


def journal_path(key: str) -> Path:
    """The finished tensors of a damage stage still under way (alphaq.damage.journal)."""
    return damage_cache_path(key).with_name(f"{key}.partial.jsonl")


def _save_imatrix(path: Path, imatrix: Imatrix) -> None:
    """Exactly as collected (numpy's own format: no float32 rounding of the counts), atomically."""
    import io
    import os

    arrays = {f"sums/{n}": v for n, v in imatrix.sums.items()} | {f"counts/{n}": v for n, v in imatrix.counts.items()}
    meta = {"datasets": imatrix.datasets, "chunk_count": imatrix.chunk_count, "chunk_size": imatrix.chunk_size,
            "names": list(imatrix.sums)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _load_imatrix(path: Path) -> Imatrix:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        names = meta["names"]
        return Imatrix(sums={n: z[f"sums/{n}"] for n in names}, counts={n: z[f"counts/{n}"] for n in names},
                       datasets=meta["datasets"], chunk_count=meta["chunk_count"], chunk_size=meta["chunk_size"])
