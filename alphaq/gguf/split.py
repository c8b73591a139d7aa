"""Split a GGUF into parts exactly as llama.cpp's ``llama-gguf-split --split`` does.

Follows tools/gguf-split/gguf-split.cpp (split_strategy) of the llama.cpp that llama-cpp-python
0.3.36 vendors, so the parts are byte for byte the tool's (tests/test_split.py compares them):

* tensors keep the input's order; a new part starts before tensor ``i`` when
  ``--split-max-tensors N``: ``i > 0 and i % N == 0``;
  ``--split-max-size S``: the part's tensor data so far plus tensor ``i`` (each padded to 32 bytes)
  would exceed S bytes (the header is not counted; a single larger tensor gets a part of its own);
* every key/value of the input goes into the first part only; every part then gets
  ``split.no`` (u16, 0-based), ``split.tensors.count`` (i32, all parts' tensors) and ``split.count``
  (u16) in that order (gguf_set_val_* removes a key and appends it, and split.count is set last);
* part ``i`` of ``n`` is ``PREFIX-%05d-of-%05d.gguf`` with ``i + 1`` (llama_split_path);
* GGUF v3; a tensor info's dimension count is ggml_n_dims (trailing 1s dropped); data padded to
  the alignment with zeros.

``split_gguf_like`` writes the parts of llama-quantize's ``--keep-split`` instead: as many parts as
the split GGUF the output was made from, each tensor in the part that held it there, in that
part's order (llama-quant.cpp sorts by part and offset). The keys and part names are the same as
above (llama-quantize writes the split keys in the order no, count, tensors.count; the loader
reads them by name).

``SIZE`` is gguf-split's syntax: a positive whole number followed by ``M`` (10^6 bytes) or ``G``
(10^9 bytes), e.g. ``500M``, ``2G``.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from alphaq.errors import InputError, InternalError
from alphaq.gguf.io import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, file_header, shard_paths, split_path

def parse_split_size(text: str) -> int:
    """gguf-split's ``split_str_to_n_bytes``: N + 'M' (10^6 bytes) or 'G' (10^9 bytes), N > 0.

    One difference: gguf-split reads N with sscanf("%d"), so it takes '1.5G' as 1G; here anything
    but a whole number before the unit is refused."""
    if not text or text[-1] not in "MG":
        raise InputError(f"--split-max-size {text!r}: supported units are M (megabytes) or G (gigabytes), "
                          "e.g. 500M or 2G (llama-gguf-split's syntax)")
    if not re.fullmatch(r"[+-]?\d+", text[:-1]):
        raise InputError(f"--split-max-size {text!r}: give a whole number before M or G, e.g. 500M or 2G")
    n = int(text[:-1])
    if n <= 0:
        raise InputError(f"--split-max-size {text!r}: size must be a positive value")
    return n * (10**6 if text[-1] == "M" else 10**9)


@dataclass(frozen=True)
class SplitSpec:
    """How to split: exactly one of the two limits."""

    max_bytes: int | None = None  # --split-max-size
    max_tensors: int | None = None  # --split-max-tensors

    def __post_init__(self) -> None:
        if (self.max_bytes is None) == (self.max_tensors is None):
            raise InputError("give one of --split-max-size and --split-max-tensors")
        if self.max_tensors is not None and self.max_tensors < 1:
            raise InputError(f"--split-max-tensors {self.max_tensors} must be at least 1")


def assign_parts(tensor_bytes: list[int], spec: SplitSpec) -> list[list[int]]:
    """Indices of the tensors in each part (split_strategy's loop and should_split)."""
    parts: list[list[int]] = [[]]
    current = 0  # tensor data in the current part, each tensor padded to 32 bytes
    for i, n in enumerate(tensor_bytes):
        n_padded = -(-n // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT
        if spec.max_bytes is not None:
            new_part = current + n_padded > spec.max_bytes
        else:
            new_part = 0 < i < len(tensor_bytes) and i % spec.max_tensors == 0
        if new_part:
            if not parts[-1]:
                raise InputError("one of the split parts would have 0 tensors; the split limit is too small")
            parts.append([])
            current = n_padded
        else:
            current += n_padded
        parts[-1].append(i)
    return parts


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _split_kvs(no: int, count: int, n_tensors: int) -> bytes:
    return (_string(SPLIT_NO) + struct.pack("<IH", int(gguf.GGUFValueType.UINT16), no)
            + _string(SPLIT_TENSORS_COUNT) + struct.pack("<Ii", int(gguf.GGUFValueType.INT32), n_tensors)
            + _string(SPLIT_COUNT) + struct.pack("<IH", int(gguf.GGUFValueType.UINT16), count))


@dataclass(frozen=True)
class _Tensor:
    name: str
    info_head: bytes  # name, n_dims, ne, type (everything of the tensor info but the offset)
    data_offset: int  # in the source file
    n_bytes: int


def _source(mm, path: Path) -> tuple[list[tuple[str, bytes]], list[_Tensor], int]:
    """(key/values as (key, raw bytes), tensors, alignment) of the GGUF being split."""
    h = file_header(path)
    if any(k in h.keys for k in (SPLIT_NO, SPLIT_COUNT)):
        raise InputError(f"{path} is already a part of a split GGUF")
    kvs, off = [], 24
    for key, end in zip(h.keys, h.kv_ends):
        kvs.append((key, bytes(mm[off:end])))
        off = end
    tensors = []
    for rec in h.records:
        (n,) = struct.unpack_from("<Q", mm, off)
        (n_dims,) = struct.unpack_from("<I", mm, off + 8 + n)
        ne = struct.unpack_from(f"<{n_dims}Q", mm, off + 12 + n)
        (qtype,) = struct.unpack_from("<I", mm, off + 12 + n + 8 * n_dims)
        (rel,) = struct.unpack_from("<Q", mm, off + 16 + n + 8 * n_dims)
        kept = len(ne)
        while kept > 1 and ne[kept - 1] <= 1:  # ggml_n_dims
            kept -= 1
        head = (bytes(mm[off:off + 8 + n]) + struct.pack("<I", kept) + struct.pack(f"<{kept}Q", *ne[:kept])
                + struct.pack("<I", qtype))
        tensors.append(_Tensor(rec.name, head, h.data_start + rel, rec.n_bytes))
        off += 24 + n + 8 * n_dims  # name, n_dims, ne, type, offset
    return kvs, tensors, h.alignment


def split_gguf(src: Path, prefix: str | Path, spec: SplitSpec) -> list[Path]:
    """Write ``src`` as parts ``PREFIX-0000i-of-0000n.gguf``; returns their paths in order."""
    return _split(src, prefix, lambda tensors: assign_parts([t.n_bytes for t in tensors], spec))


def part_names(model: Path) -> list[list[str]]:
    """The tensor names of each part of the GGUF ``model`` (any part of it), in file order."""
    return [[r.name for r in file_header(p).records] for p in shard_paths(model)]


def split_gguf_like(src: Path, prefix: str | Path, like: list[list[str]]) -> list[Path]:
    """Write ``src`` in the parts ``like`` names (part_names of the model it was made from), as
    llama-quantize --keep-split; every tensor of ``src`` must be in one of them."""
    def layout(tensors: list[_Tensor]) -> list[list[int]]:
        index = {t.name: i for i, t in enumerate(tensors)}
        parts = [[index[n] for n in names if n in index] for names in like]
        placed = {i for part in parts for i in part}
        if len(placed) != len(tensors):
            missing = next(t.name for i, t in enumerate(tensors) if i not in placed)
            raise InternalError(f"--keep-split: {missing} is in no part of the input model")
        # (a part left without tensors, all of them dropped on the way, is not written)
        return [part for part in parts if part]

    return _split(src, prefix, layout)


def _split(src: Path, prefix: str | Path, layout) -> list[Path]:
    """Write ``src`` as parts ``PREFIX-0000i-of-0000n.gguf`` holding the tensors ``layout(tensors)``
    lists per part; returns their paths in order."""
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        kvs, tensors, alignment = _source(mm, src)
        if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:  # gguf-split pads data to 32 bytes whatever the alignment
            raise InputError(f"{src} has general.alignment {alignment}; gguf-split handles only 32")
        parts = layout(tensors)
        paths = [split_path(prefix, i, len(parts)) for i in range(len(parts))]
        for no, (indices, path) in enumerate(zip(parts, paths)):
            _write_part(path, mm, kvs if no == 0 else [], [tensors[i] for i in indices],
                        _split_kvs(no, len(parts), len(tensors)), alignment)
    return paths


def _write_part(path: Path, mm, kvs, tensors: list[_Tensor], split_kvs: bytes, alignment: int) -> None:
    kv_data = b"".join(raw for _, raw in kvs) + split_kvs
    infos, offset = [], 0
    for t in tensors:
        infos.append(t.info_head + struct.pack("<Q", offset))
        offset += -(-t.n_bytes // alignment) * alignment
    meta = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs) + 3) + kv_data + b"".join(infos)
    meta += bytes(-len(meta) % alignment)
    with open(path, "xb") as out:
        out.write(meta)
        for t in tensors:
            out.write(mm[t.data_offset:t.data_offset + t.n_bytes])
            out.write(bytes(-t.n_bytes % gguf.GGUF_DEFAULT_ALIGNMENT))
