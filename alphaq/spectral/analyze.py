"""Model-level driver of the spectral stage: weights -> list[MatrixStats] -> CSV.

`analyze_model` streams every quantisable matrix / expert slice of an HF checkpoint or a float
GGUF file (`alphaq.model.weights`), one in memory at a time, through `alphaq.spectral.alpha.analyze_matrix`.
Results are cached on disk, keyed by a BLAKE2 hash of the float32 matrix bytes and shape plus the
estimator settings (`SpectralConfig.cache_fields`), so a changed tensor or setting never reuses a
stale alpha. The CSV (`write_csv` / `read_csv`) has one row per MatrixStats.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from alphaq.spectral import native
from alphaq.errors import AlphaQError, InputError
from alphaq.files import atomic_write_text
from alphaq.records import MatrixStats
from alphaq.spectral.alpha import SpectralConfig, SpectralResult, analyze_matrix, cap_binds, pinned_threads
from alphaq.model.weights import FP8_VALUES_FROM_GGUF, HF_FP8_DTYPES, WeightMatrix, open_model, sampled_experts

logger = logging.getLogger(__name__)

CSV_COLUMNS = [f.name for f in fields(MatrixStats)]  # tensor, block, expert, kind, rows, ...


def default_cache_dir() -> Path:
    """~/.cache/alphaq/spectral (or $XDG_CACHE_HOME/alphaq/spectral), read at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alphaq" / "spectral"


class SpectralCache:
    """One small JSON file per (tensor content, estimator settings) key."""

    def __init__(self, root: Path, cfg: SpectralConfig):
        self.root = Path(root)
        self._cfg = cfg
        self._settings = self._blob(cfg)
        # a matrix the FARMS block cap does not bind on has the every-block result: the same key
        self._uncapped = self._blob(replace(cfg, max_blocks=None))

    @staticmethod
    def _blob(cfg: SpectralConfig) -> bytes:
        return json.dumps({**cfg.cache_fields(), "numerics": native.backend()}, sort_keys=True).encode()

    def key(self, w: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(self._settings if w.ndim == 2 and cap_binds(*w.shape, self._cfg) else self._uncapped)
        h.update(repr((w.dtype.str, w.shape)).encode())
        h.update(memoryview(np.ascontiguousarray(w)).cast("B"))
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> SpectralResult | None:
        p = self._path(key)
        try:
            data = json.loads(p.read_text())
            return SpectralResult(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # corrupt entry: recompute
            logger.warning("ignoring unreadable cache entry %s (%s)", p, exc)
            return None

    def put(self, key: str, result: SpectralResult) -> None:
        p = self._path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p, json.dumps(asdict(result)))
        except OSError as exc:
            logger.warning("could not write cache entry %s (%s)", p, exc)


def analyze_weight(m: WeightMatrix, cfg: SpectralConfig, cache: SpectralCache | None) -> MatrixStats:
    w = m.load()  # (rows, cols) float32
    key = cache.key(w) if cache else None
    res = cache.get(key) if cache else None
    if res is None:
        res = analyze_matrix(w, name=m.label, cfg=cfg)
        if cache:
            cache.put(key, res)
    return MatrixStats(
        tensor=m.tensor,
        block=m.block,
        expert=m.expert,
        kind=m.kind,
        rows=m.rows,
        cols=m.cols,
        params=m.params,
        alpha=res.alpha,
        variance=res.variance,
        k=res.k,
        n_eigs=res.n_eigs,
        signal=res.signal,
    )


class Throttle:
    """How many matrices `analyze_model` may analyse at once; changeable while it runs.

    `alphaq.pipeline.convert` analyses an HF checkpoint while llama.cpp's converter (one busy core) runs
    beside it: it sets the limit to one matrix until the converter exits, then lifts it, so the
    converter, which the rest of the pipeline waits for, is not slowed down. With ``background``,
    a thread analysing under a limit also drops to the lowest CPU priority (nice 19; Linux, where
    a thread's priority is its own), so that it takes only the cycles the converter leaves: on
    the 1.2 GB benchmark model the converter then ran in 13-14 s instead of 17-19 s. Lifting the
    limit restores the priority where the OS allows it (an unprivileged process may not raise
    it again; the analysis then stays at nice 19, which only matters on a busy machine).
    `cancel` makes the analysis stop at the next matrix with `Cancelled` (e.g. when the
    converter failed)."""

    def __init__(self, limit: int | None = None, background: bool = False):
        self._cv = threading.Condition()
        self._limit = limit  # None: as many as there are workers
        self._active = 0
        self._cancelled = False
        self._background = background and sys.platform == "linux"
        self._lowered: dict[int, int] = {}  # native thread id -> its priority before

    def set_limit(self, limit: int | None) -> None:
        with self._cv:
            self._limit = limit
            self._cv.notify_all()

    def cancel(self) -> None:
        with self._cv:
            self._cancelled = True
            self._cv.notify_all()

    @contextmanager
    def slot(self):
        with self._cv:
            self._cv.wait_for(lambda: self._cancelled or self._limit is None or self._active < self._limit)
            if self._cancelled:
                raise Cancelled("analysis cancelled")
            self._active += 1
            limited = self._limit is not None
        if self._background:
            self._set_priority(lower=limited)
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def _set_priority(self, lower: bool) -> None:
        tid = threading.get_native_id()
        try:
            if lower and tid not in self._lowered:
                before = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, 19)
                self._lowered[tid] = before
            elif not lower and tid in self._lowered:
                os.setpriority(os.PRIO_PROCESS, tid, self._lowered.pop(tid))
        except PermissionError:
            self._lowered.pop(tid, None)  # may not raise it again: stays low, never retried
        except OSError as exc:  # e.g. a kernel without per-thread priorities
            logger.debug("thread priority unchanged (%s)", exc)
            self._background = False


class Cancelled(Exception):
    """Raised by `analyze_model` after `Throttle.cancel`."""


def analyze_model(
    path: str | Path,
    cfg: SpectralConfig = SpectralConfig(),
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    select: Callable[[WeightMatrix], bool] | None = None,
    known: Callable[[WeightMatrix], MatrixStats | None] | None = None,
    throttle: Throttle | None = None,
    report: bool = True,
) -> list[MatrixStats]:
    """MatrixStats of every quantisable matrix / expert slice of ``path``, in model order.

    ``cache_dir`` defaults to `default_cache_dir()`; ``use_cache=False`` neither reads nor writes.
    ``select`` restricts the analysis to the matrices it accepts (the others are left out of the
    result), as ``cfg.max_experts`` does to a sample of each merged tensor's experts; ``known``
    returns an already computed result for a matrix, or None to analyse it; ``throttle`` limits
    how many matrices are analysed at once; ``report=False`` leaves out the closing count of
    matrices without a signal (for a partial pass whose results a later call reuses).

    Matrices are analysed in parallel, one single-threaded matrix per core (torch's intra-op
    thread count), with at most that many loaded at a time; results keep model order and are
    the same bits as a serial run (every matrix is computed independently).
    """
    cache = SpectralCache(Path(cache_dir) if cache_dir else default_cache_dir(), cfg) if use_cache else None
    with open_model(path) as model:
        mats = model.matrices()
        if not mats:
            raise AlphaQError(f"{path}: no quantisable weight matrices found")
        sampled = _in_sample(mats, cfg.max_experts)
        mats = [m for m in mats if sampled(m) and (select is None or select(m))]
        fp8 = [m for m in mats if m.dtype in HF_FP8_DTYPES]
        if fp8:  # before the first matrix: their values exist only after llama.cpp's converter dequantises them
            raise InputError(f"{path}: {len(fp8)} matrices are FP8 ({fp8[0].label}, ...); {FP8_VALUES_FROM_GGUF}")
        out = _analyze_all(mats, cfg, cache, progress, known, throttle)
    n_bad = sum(not s.signal for s in out)
    if n_bad and report:
        logger.warning("%d of %d matrices have no spectral signal (alpha = NaN)", n_bad, len(out))
    return out


def _in_sample(mats: list[WeightMatrix], max_experts: int | None) -> Callable[[WeightMatrix], bool]:
    """Whether a matrix is in the analysis under ``max_experts``: every matrix that is not an
    expert slice, and each merged tensor's evenly spaced experts (alphaq.model.weights.sampled_experts,
    out of the expert count the model's slices of that tensor show)."""
    if max_experts is None:
        return lambda m: True
    n_experts: dict[str, int] = {}
    for m in mats:
        if m.expert is not None:
            n_experts[m.tensor] = max(n_experts.get(m.tensor, 0), m.expert + 1)
    keep = {t: set(sampled_experts(n, max_experts) or range(n)) for t, n in n_experts.items()}
    return lambda m: m.expert is None or m.expert in keep[m.tensor]


def _analyze_all(mats: list[WeightMatrix], cfg: SpectralConfig, cache: SpectralCache | None, progress: bool,
                 known, throttle: Throttle | None) -> list[MatrixStats]:
    given = [known(m) if known else None for m in mats]
    todo = [m for m, g in zip(mats, given) if g is None]

    def one(m: WeightMatrix) -> MatrixStats:
        if throttle is None:
            return analyze_weight(m, cfg, cache)
        with throttle.slot():
            return analyze_weight(m, cfg, cache)

    with tqdm(total=len(todo), desc="alpha", unit="matrix", disable=not progress or not todo,
              dynamic_ncols=True) as bar:
        done = _run_in_order(one, todo, bar.update)
    it = iter(done)
    return [g if g is not None else next(it) for g in given]


def _run_in_order(fn, items: list, tick) -> list:
    """``[fn(x) for x in items]``, one item per core at a time when there are several."""
    if len(items) == 1:  # outside the pinned section: the one matrix's blocks run in parallel
        out = [fn(items[0])]
        tick(1)
        return out
    out = []
    with pinned_threads() as n_workers:
        if n_workers <= 1:
            for x in items:
                out.append(fn(x))
                tick(1)
            return out
        pool = ThreadPoolExecutor(n_workers)
        try:
            futures = [pool.submit(fn, x) for x in items]
            for f in futures:  # in order: the first failing item is the error raised
                out.append(f.result())
                tick(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v)  # round-trips exactly; "nan" for no signal
    return str(v)


def write_csv(stats: list[MatrixStats], path: str | Path, force: bool = False) -> None:
    """Write one row per MatrixStats; refuses to overwrite without ``force``; atomic."""
    path = Path(path)
    if path.exists() and not force:
        raise AlphaQError(f"{path} exists; pass --force (force=True) to overwrite it")
    if not path.parent.is_dir():
        raise AlphaQError(f"directory {path.parent} does not exist")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in stats:
        writer.writerow([_fmt(getattr(s, c)) for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())
    logger.info("wrote %d rows to %s", len(stats), path)


def _parse_opt_int(v: str) -> int | None:
    return None if v == "" else int(v)


def read_csv(path: str | Path) -> list[MatrixStats]:
    path = Path(path)
    if not path.exists():
        raise AlphaQError(f"alpha CSV {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        required = [c for c in CSV_COLUMNS if c != "signal"]
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise AlphaQError(f"{path} lacks column(s) {', '.join(missing)}")
        out = []
        for line, row in enumerate(reader, start=2):
            try:
                alpha = float(row["alpha"]) if row["alpha"] != "" else math.nan
                signal = row.get("signal", "")
                out.append(
                    MatrixStats(
                        tensor=row["tensor"],
                        block=_parse_opt_int(row["block"]),
                        expert=_parse_opt_int(row["expert"]),
                        kind=row["kind"],
                        rows=int(row["rows"]),
                        cols=int(row["cols"]),
                        params=int(row["params"]),
                        alpha=alpha,
                        variance=float(row["variance"]),
                        k=int(row["k"]),
                        n_eigs=int(row["n_eigs"]),
                        signal=(signal in ("1", "True", "true")) if signal != "" else math.isfinite(alpha),
                    )
                )
            except (ValueError, KeyError) as exc:
                raise AlphaQError(f"{path}:{line}: bad row ({exc})") from exc
    return out
