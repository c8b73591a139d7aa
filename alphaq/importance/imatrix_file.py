"""llama.cpp importance-matrix files: read and write both formats ``llama-quantize --imatrix`` takes.

* GGUF (``tools/imatrix/imatrix.cpp`` ``save_imatrix``): ``general.type = "imatrix"``, the keys
  ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and
  per weight two F32 tensors, ``<name>.in_sum2`` with ne = (ne0, n_mat) holding the raw sums of
  squared input activations and ``<name>.counts`` with ne = (1, n_mat) holding the tokens per matrix
  (expert). Names are sorted. ``llama-quantize`` refuses a GGUF imatrix without all three keys.
* legacy ``.dat`` (``save_imatrix_legacy``), all little-endian: i32 n_entries; per entry i32 len,
  name bytes, i32 ncall, i32 nval, nval f32; then i32 chunk_count, i32 len, dataset name bytes.
  The values are not raw sums but ``sums / count * ncall`` with
  ``ncall = ceil(max(count) / chunk_size)`` (an unseen expert stores ``ncall``), so that
  ``value / ncall`` is the mean; the per-expert counts are lost.

Representation of a legacy file once read: ``sums`` = the stored values as one matrix
(1, nval) and ``counts`` = ``[ncall]``, ``chunk_size`` = 0 (as ``common_imatrix_load`` reports).
Then ``means()`` is ``stored / ncall``, which is what ``quantize.cpp`` ``load_imatrix`` computes.
Where ``ncall <= 0`` quantize uses the stored values unchanged, so we record count 1 instead
(the only detail a legacy round trip does not keep).
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

from alphaq.errors import AlphaQError

log = logging.getLogger(__name__)

# common/imatrix-loader.h
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
GGML_MAX_NAME = 64  # gguf.cpp rejects tensor names of this length or longer
_I32 = struct.Struct("<i")


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # weight name -> float32 (n_mat, ne0): sum of squared inputs per column
    counts: dict[str, np.ndarray]  # weight name -> (n_mat,): tokens that reached each matrix (expert)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # tokens per chunk; 0 for a legacy file (its counts are then in chunks)

    def means(self) -> dict[str, np.ndarray]:
        """What ``llama-quantize`` hands the quantiser: float32 (n_mat * ne0,), expert-major,
        sums / count per matrix and all ones for a matrix no token reached."""
        out = {}
        for name, sums in self.sums.items():
            sums = np.asarray(sums, dtype=np.float32)
            # the loader rounds the stored counts to integers (lround) before dividing in float
            counts = _lround(np.asarray(self.counts[name], dtype=np.float64)).astype(np.float32)
            mean = np.ones_like(sums)
            seen = counts > 0
            mean[seen] = sums[seen] / counts[seen, None]
            out[name] = mean.reshape(-1)
        return out


    def only(self, names) -> Imatrix:
        """The same matrix with the entries of ``names`` only."""
        keep = [n for n in self.sums if n in set(names)]
        return replace(self, sums={n: self.sums[n] for n in keep}, counts={n: self.counts[n] for n in keep})


def select_weights(names, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """llama-quantize's --include-weights / --exclude-weights (quantize.cpp prepare_imatrix): of an
    importance matrix's weight ``names``, those whose vectors are used: without every name that
    contains an excluded string, or only those that contain an included one (substring match, as
    std::string::find). Returns (kept names, the strings that match no name: llama-quantize says
    nothing of those, alphaq warns)."""
    names = list(names)
    strings = list(include or exclude)
    unused = [s for s in strings if not any(s in n for n in names)]
    if include:
        return [n for n in names if any(s in n for s in include)], unused
    return [n for n in names if not any(s in n for s in exclude)], unused


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: halves away from zero (np.rint would round them to even)."""
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5))


def _fail(path: Path, problem: str) -> AlphaQError:
    return AlphaQError(f"{path}: {problem}")


# ---------------------------------------------------------------- reading


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy imatrix file; the format is told by the GGUF magic, as llama.cpp's
    loader effectively does (it tries GGUF first and falls back to legacy)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return _read_gguf(path)
            f.seek(0)
            raw = f.read()  # legacy files are small: parse them from memory
    except OSError as e:
        raise _fail(path, f"cannot read imatrix file: {e.strerror or e}") from None
    return _read_legacy(path, raw)


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise _fail(path, f"not a readable GGUF imatrix file (truncated or garbled?): {e}") from None
    if not reader.tensors:
        raise _fail(path, "no data in imatrix file (no tensors)")
    pairs = _pair_tensors(path, reader)
    imatrix = Imatrix(sums={}, counts={}, datasets=_gguf_datasets(reader),
                      chunk_count=_gguf_u32(path, reader, KEY_CHUNK_COUNT),
                      chunk_size=_gguf_u32(path, reader, KEY_CHUNK_SIZE))
    for name, (sums_t, counts_t) in sorted(pairs.items()):
        sums, counts = _tensor_values(path, sums_t), _tensor_values(path, counts_t)
        if counts.size < 1 or sums.size % counts.size:
            raise _fail(path, f"{name}: {sums.size} sums do not split into {counts.size} matrices")
        imatrix.sums[name] = sums.reshape(counts.size, -1)
        imatrix.counts[name] = counts.astype(np.float64)
    if not imatrix.sums:  # e.g. a model GGUF given as the importance matrix
        raise _fail(path, f"no importance entries (no NAME{SUMS_SUFFIX} / NAME{COUNTS_SUFFIX} tensor pairs): "
                          "not a llama.cpp imatrix file")
    return imatrix


def check_imatrix_fits(imatrix: Imatrix, path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """A user's importance matrix against the model it will weigh (``shapes``: weight name ->
    (matrices, columns), experts counted), before any work: llama.cpp's quantiser refuses a vector
    of the wrong size, and a file of another model names none of these weights."""
    known = [n for n in imatrix.sums if n in shapes]
    if not known:
        raise _fail(path, f"none of its {len(imatrix.sums)} importance entries names a weight of this model "
                          f"(e.g. {next(iter(imatrix.sums))}): an importance matrix of another model?")
    for name in known:
        n_mat, cols = shapes[name]
        if imatrix.sums[name].size != n_mat * cols:
            raise _fail(path, f"{name} has {imatrix.sums[name].size} importance values, this model's needs "
                              f"{n_mat} x {cols}: an importance matrix of another model?")


def _pair_tensors(path: Path, reader: gguf.GGUFReader) -> dict[str, list]:
    """weight name -> [in_sum2 tensor, counts tensor]; other tensors are ignored like llama.cpp does."""
    pairs: dict[str, list] = {}
    for t in reader.tensors:
        for slot, suffix in enumerate((SUMS_SUFFIX, COUNTS_SUFFIX)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    for name, (sums_t, counts_t) in pairs.items():
        if sums_t is None or counts_t is None:
            raise _fail(path, f"mismatched sums and counts for {name} (one of {name}{SUMS_SUFFIX}, "
                              f"{name}{COUNTS_SUFFIX} is missing)")
    return pairs


def _tensor_values(path: Path, t) -> np.ndarray:
    if t.tensor_type != gguf.GGMLQuantizationType.F32:
        raise _fail(path, f"tensor {t.name} is {t.tensor_type.name}, imatrix sums and counts must be F32")
    data = np.asarray(t.data)
    # GGUFReader's reshape already fails on short data today; keep the check independent of it
    if data.size != int(t.n_elements):
        raise _fail(path, f"tensor {t.name} is truncated ({data.size} of {int(t.n_elements)} values)")
    return np.array(data, dtype=np.float32).reshape(-1)


def _gguf_datasets(reader: gguf.GGUFReader) -> list[str]:
    # llama.cpp only takes the key when it is an array of strings, and ignores it otherwise
    f = reader.get_field(KEY_DATASETS)
    if f is None or f.types[:1] != [gguf.GGUFValueType.ARRAY] or f.types[-1] != gguf.GGUFValueType.STRING:
        return []
    return [str(s) for s in f.contents()]


def _gguf_u32(path: Path, reader: gguf.GGUFReader, key: str) -> int:
    f = reader.get_field(key)
    if f is None:
        return 0  # llama-quantize itself refuses such a file ("missing imatrix metadata")
    if f.types != [gguf.GGUFValueType.UINT32]:
        raise _fail(path, f"{key} must be a uint32, found {[t.name for t in f.types]}")
    return int(f.contents())


class _Cursor:
    """Sequential little-endian reads from a legacy file that fail with a one-line error."""

    def __init__(self, path: Path, raw: bytes):
        self.path, self.raw, self.pos = path, raw, 0

    def left(self) -> int:
        return len(self.raw) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _fail(self.path, f"truncated legacy imatrix file: {what} needs {n} bytes at offset "
                                   f"{self.pos}, {self.left()} left")
        self.pos += n
        return self.raw[self.pos - n: self.pos]

    def i32(self, what: str) -> int:
        return _I32.unpack(self.take(4, what))[0]

    def text(self, n: int, what: str) -> str:
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"garbled legacy imatrix file: {what} is not UTF-8") from None


def _read_legacy(path: Path, raw: bytes) -> Imatrix:
    cur = _Cursor(path, raw)
    n_entries = cur.i32("the entry count") if cur.left() >= 4 else 0
    if n_entries < 1:
        raise _fail(path, "no data in imatrix file (not GGUF, and no legacy entries)")
    imatrix = Imatrix(sums={}, counts={})
    for i in range(n_entries):
        name, ncall, values = _legacy_entry(cur, i)
        if name in imatrix.sums:
            raise _fail(path, f"garbled legacy imatrix file: entry {name!r} appears twice")
        imatrix.sums[name] = values.reshape(1, -1)
        # quantize.cpp: mean = value / ncall, or the value itself when ncall <= 0 (= a count of 1)
        imatrix.counts[name] = np.array([ncall if ncall > 0 else 1], dtype=np.float64)
    _legacy_trailer(cur, imatrix)
    return imatrix


def _legacy_entry(cur: _Cursor, i: int) -> tuple[str, int, np.ndarray]:
    length = cur.i32(f"entry {i + 1}'s name length")
    if length < 1:
        raise _fail(cur.path, f"garbled legacy imatrix file: entry {i + 1} has name length {length}")
    name = cur.text(length, f"entry {i + 1}'s name")
    ncall = cur.i32(f"{name}'s call count")
    nval = cur.i32(f"{name}'s value count")
    if nval < 1:
        raise _fail(cur.path, f"garbled legacy imatrix file: {name} has {nval} values")
    values = np.frombuffer(cur.take(4 * nval, f"{name}'s {nval} values"), dtype="<f4").astype(np.float32)
    return name, ncall, values


def _legacy_trailer(cur: _Cursor, imatrix: Imatrix) -> None:
    """The optional chunk count and dataset name; a partial trailer is a truncated file."""
    if cur.left() == 0:
        return
    imatrix.chunk_count = cur.i32("the chunk count")
    if cur.left() == 0:
        return
    length = cur.i32("the dataset name length")
    if length > 0:
        imatrix.datasets.append(cur.text(length, "the dataset name"))
    if cur.left():
        raise _fail(cur.path, f"garbled legacy imatrix file: {cur.left()} unexpected bytes at the end")


# ---------------------------------------------------------------- writing


def write_imatrix(path: str | os.PathLike, imatrix: Imatrix, *, legacy: bool = False) -> None:
    """Write ``imatrix`` as llama.cpp's GGUF imatrix (default) or legacy ``.dat``, atomically."""
    path = Path(path)
    _check(path, imatrix, legacy)
    with _atomic_output(path) as tmp:
        if legacy:
            tmp.write_bytes(_legacy_bytes(path, imatrix))
        else:
            _write_gguf(tmp, imatrix)


def _check(path: Path, imatrix: Imatrix, legacy: bool) -> None:
    if set(imatrix.sums) != set(imatrix.counts):
        odd = sorted(set(imatrix.sums) ^ set(imatrix.counts))[0]
        raise _fail(path, f"mismatched sums and counts for {odd}: it has only one of them")
    if not imatrix.sums:
        raise _fail(path, "an imatrix needs at least one entry")
    for name, sums in imatrix.sums.items():
        counts = np.asarray(imatrix.counts[name])
        if not name:
            raise _fail(path, "an imatrix entry has an empty name")
        if np.ndim(sums) != 2 or 0 in np.shape(sums):
            raise _fail(path, f"{name}: sums must be a non-empty (n_mat, ne0) array, got shape {np.shape(sums)}")
        if counts.shape != (np.shape(sums)[0],):
            raise _fail(path, f"{name}: counts shape {counts.shape} does not match sums {np.shape(sums)}")
        if not legacy and len((name + SUMS_SUFFIX).encode()) >= GGML_MAX_NAME:
            raise _fail(path, f"{name}{SUMS_SUFFIX} is too long for a GGUF tensor name "
                              f"(at most {GGML_MAX_NAME - 1} bytes)")
    if not 0 <= imatrix.chunk_count < 2**31 or not 0 <= imatrix.chunk_size < 2**31:
        raise _fail(path, f"chunk_count {imatrix.chunk_count} / chunk_size {imatrix.chunk_size} out of range")


@contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` that replaces it only once completely written."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # created by hand rather than with mkstemp so that it gets the umask's mode, not 0600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise _fail(path, f"cannot write imatrix file: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ImatrixWriter(gguf.GGUFWriter):
    """GGUFWriter that can write an empty string array: llama.cpp always writes imatrix.datasets
    and llama-quantize refuses a file without it, but gguf-py rejects empty arrays."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _write_gguf(tmp: Path, imatrix: Imatrix) -> None:
    w = _ImatrixWriter(tmp, arch="imatrix")
    # save_imatrix writes no general.architecture (the PyPI gguf 0.19.0 has no remove_key)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type("imatrix")
    w.add_key_value(KEY_DATASETS, list(imatrix.datasets), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.sums):
        # numpy (n_mat, ne0) is ggml ne = (ne0, n_mat); counts (n_mat, 1) is ne = (1, n_mat)
        sums = np.ascontiguousarray(imatrix.sums[name], dtype=np.float32)
        counts = np.asarray(imatrix.counts[name], dtype=np.float32).reshape(-1, 1)
        w.add_tensor(name + SUMS_SUFFIX, sums)
        w.add_tensor(name + COUNTS_SUFFIX, counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _legacy_bytes(path: Path, imatrix: Imatrix) -> bytes:
    """save_imatrix_legacy: entries no token reached at all are skipped, names sorted."""
    names = [n for n in sorted(imatrix.sums) if _lround(np.asarray(imatrix.counts[n], dtype=np.float64)).any()]
    for skipped in sorted(set(imatrix.sums) - set(names)):
        log.warning("imatrix entry %s has no data - not stored in the legacy file", skipped)
    if not names:
        raise _fail(path, "no imatrix entry has data (all counts 0); llama.cpp would not load the file")
    out = [_I32.pack(len(names))]
    for name in names:
        out.append(_legacy_entry_bytes(path, name, imatrix))
    dataset = imatrix.datasets[-1].encode() if imatrix.datasets else b""  # the last one, like llama-imatrix
    out += [_I32.pack(imatrix.chunk_count), _I32.pack(len(dataset)), dataset]
    return b"".join(out)


def _legacy_entry_bytes(path: Path, name: str, imatrix: Imatrix) -> bytes:
    counts = _lround(np.asarray(imatrix.counts[name], dtype=np.float64))
    # chunk_size 0 (a legacy file read back) means the counts already are in chunks
    chunk = max(int(imatrix.chunk_size), 1)
    ncall = (int(counts.max()) + chunk - 1) // chunk  # ceiling division, as llama.cpp
    if ncall >= 2**31 or imatrix.sums[name].size >= 2**31:
        raise _fail(path, f"{name}: too large for the legacy format's 32-bit counts")
    sums = np.asarray(imatrix.sums[name], dtype=np.float32)
    count = np.repeat(counts.astype(np.float32), sums.shape[1]).reshape(sums.shape)
    unseen = count == 0
    # float32 arithmetic in llama.cpp's order; an unseen expert stores 1 * ncall (mean 1)
    value = np.where(unseen, np.float32(1), sums) / np.where(unseen, np.float32(1), count)
    value = (value * np.float32(ncall)).astype("<f4")
    encoded = name.encode()
    return b"".join([_I32.pack(len(encoded)), encoded, _I32.pack(ncall), _I32.pack(value.size), value.tobytes()])
