"""Small GGUF helpers on top of gguf-py: inspect a file, and re-write it with extra metadata.

llama_model_quantize copies the source's key/values but cannot add long strings (its kv_overrides
hold at most 128 bytes), so the ``alphaq.*`` keys, which include the whole plan as JSON, are added
by re-writing the quantised file: same tensors, same bytes, one more group of keys.
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from alphaq.gguf.qtypes import ggml_n_dims

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})


@dataclass(frozen=True)
class TensorRecord:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (n_expert, rows, cols) for merged experts
    n_elements: int
    n_bytes: int


def read_tensors(path: Path) -> list[TensorRecord]:
    """Every tensor's name, type, shape and size, from the header alone; of every part of a split
    GGUF (`shard_paths`), in part order."""
    return [r for shard in shard_paths(path) for r in _read_header(shard)[0]]


def quantised_weights(tensors: list[TensorRecord]) -> list[TensorRecord]:
    """The weights (2-D or more) of ``tensors`` that are not F32/F16/BF16."""
    return [r for r in tensors if len(r.shape) >= 2 and r.type not in FLOAT_TYPES]


def warn_requantised(path: Path, qtype: str) -> None:
    log.warning("%s holds %s weights: they are read dequantised, so their rounding is part of everything "
                "measured on them (the HF checkpoint or a BF16 GGUF avoids it)", path, qtype)


def note_requantised(model: Path) -> None:
    """warn_requantised for a command's MODEL argument, when it is a readable GGUF file with
    quantised weights (anything else is the model reader's to refuse, with its own message)."""
    model = Path(model)
    if model.is_file() and model.suffix.lower() == ".gguf":
        try:
            quantised = quantised_weights(read_tensors(model))
        except (ValueError, OSError, struct.error, UnicodeDecodeError, KeyError, IndexError):
            return
        from alphaq.model.weights import REQUANTISABLE_TYPES

        if quantised and all(r.type in REQUANTISABLE_TYPES for r in quantised):  # (others: refused right after)
            warn_requantised(model, quantised[0].type.name)


def check_gguf(path: Path) -> list[TensorRecord]:
    """read_tensors, with an InputError naming the file when it is missing or not a readable GGUF."""
    from alphaq.errors import InputError

    if not path.is_file():
        raise InputError(f"model {path} does not exist" if not path.exists() else f"model {path} is not a file")
    try:
        tensors = read_tensors(path)
    except (ValueError, OSError, struct.error, UnicodeDecodeError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({' '.join(str(exc).split())})") from None
    if not tensors:
        raise InputError(f"{path}: a GGUF file without tensors")
    need, size = header_bytes(path) + sum(t.n_bytes for t in tensors), model_bytes(path)  # a split GGUF: all parts
    if size < need:  # (a lower bound: the padding between tensors is not counted)
        raise InputError(f"{path} is truncated: {size} bytes, its tensors alone need {need}")
    return tensors


# byte sizes of GGUF's fixed-size value types (GGUFValueType: UINT8 .. FLOAT64)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY), int(GGUFValueType.UINT32)
_UINT16, _INT32 = int(GGUFValueType.UINT16), int(GGUFValueType.INT32)

# llama.cpp's split keys (LLM_KV_SPLIT_NO / _COUNT / _TENSORS_COUNT, src/llama-arch.cpp): u16, u16, i32
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, \
    gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
_SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)


@dataclass(frozen=True)
class GGUFHeader:
    """What the tools here need from one GGUF file's header."""

    records: list[TensorRecord]
    data_start: int  # bytes before the tensor data (padded to the alignment)
    kv_end: int  # where the tensor-info table starts
    info_bytes: int  # size of the tensor-info table
    alignment: int
    split_no: int | None  # split.no, None when absent
    split_count: int | None  # split.count, None when absent
    split_kv_bytes: int  # bytes of the split.* key/values in this file
    keys: tuple[str, ...] = ()  # every key, in file order
    kv_ends: tuple[int, ...] = ()  # where each key/value record ends


def _read_header(path: Path) -> tuple[list[TensorRecord], int]:
    """(tensor records, bytes before the tensor data) of one GGUF file."""
    h = file_header(path)
    return h.records, h.data_start


def file_header(path: Path) -> GGUFHeader:
    """The header of one little-endian GGUF v2/v3 file (one part of a split GGUF: not resolved).

    gguf-py's reader builds a numpy view for every part of every key/value (~0.17 s per file
    even for a small model, and the converter pipeline reads each header several times); here
    values are skipped, only the tensor infos, ``general.alignment`` and the split keys are decoded.
    A file this does not handle (big-endian, or an older version) goes to gguf-py's reader."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF" or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
            return _read_header_gguf_py(path)
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        off = 24
        ints: dict[str, int] = {}  # general.alignment and the split keys
        split_kv_bytes = 0
        keys, kv_ends = [], []

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, at)
            return mm[at + 8 : at + 8 + n].decode("utf-8"), at + 8 + n

        def skip(vtype: int, at: int) -> int:
            if vtype == _STRING:
                return at + 8 + struct.unpack_from("<Q", mm, at)[0]
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", mm, at)
                at += 12
                if etype in _SCALAR_BYTES:
                    return at + count * _SCALAR_BYTES[etype]
                for _ in range(count):
                    at = skip(etype, at)
                return at
            return at + _SCALAR_BYTES[vtype]

        wanted = {gguf.Keys.General.ALIGNMENT: ("<I", _UINT32), SPLIT_NO: ("<H", _UINT16),
                  SPLIT_COUNT: ("<H", _UINT16), SPLIT_TENSORS_COUNT: ("<i", _INT32)}
        for _ in range(n_kv):
            kv_start = off
            key, off = string(off)
            keys.append(key)
            (vtype,) = struct.unpack_from("<I", mm, off)
            off += 4
            if key in wanted and vtype == wanted[key][1]:
                (ints[key],) = struct.unpack_from(wanted[key][0], mm, off)
            off = skip(vtype, off)
            kv_ends.append(off)
            if key in _SPLIT_KEYS:
                split_kv_bytes += off - kv_start
        kv_end = off
        alignment = ints.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        records = []
        for _ in range(n_tensors):
            name, off = string(off)
            (n_dims,) = struct.unpack_from("<I", mm, off)
            ne = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)  # ggml order, ne0 first
            qtype = GGMLQuantizationType(struct.unpack_from("<I", mm, off + 4 + 8 * n_dims)[0])
            off += 4 + 8 * n_dims + 4 + 8  # dims, type, data offset
            n_elements = math.prod(ne)
            block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
            records.append(TensorRecord(name, qtype, tuple(reversed(ne)), n_elements,
                                        n_elements // block * type_bytes))
        return GGUFHeader(records, -(-off // alignment) * alignment, kv_end, off - kv_end, alignment,
                          ints.get(SPLIT_NO), ints.get(SPLIT_COUNT), split_kv_bytes, tuple(keys), tuple(kv_ends))


def _read_header_gguf_py(path: Path) -> GGUFHeader:
    reader = GGUFReader(path)
    out = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # ggml order, ne0 first
        out.append(TensorRecord(t.name, GGMLQuantizationType(t.tensor_type), tuple(reversed(ne)),
                                int(t.n_elements), int(t.n_bytes)))
    kv_end = min((t.field.offset for t in reader.tensors), default=int(reader.data_offset))
    info_bytes = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in reader.tensors)

    def field(key):
        f = reader.get_field(key)
        return None if f is None else int(f.contents())

    split_kv_bytes = sum(sum(int(p.nbytes) for p in reader.fields[k].parts) for k in _SPLIT_KEYS if k in reader.fields)
    kv = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return GGUFHeader(out, int(reader.data_offset), kv_end, info_bytes, int(reader.alignment),
                      field(SPLIT_NO), field(SPLIT_COUNT), split_kv_bytes, tuple(kv),
                      tuple(f.offset + sum(int(p.nbytes) for p in f.parts) for f in kv.values()))


# ---- split GGUFs (llama.cpp: src/llama.cpp llama_split_path / llama_split_prefix, src/llama-model-loader.cpp)

SPLIT_SUFFIX = "-{:05d}-of-{:05d}.gguf"


def split_path(prefix: str | Path, split_no: int, split_count: int) -> Path:
    """llama_split_path: part ``split_no`` (0-based) of ``split_count`` is PREFIX-%05d-of-%05d.gguf."""
    return Path(f"{prefix}{SPLIT_SUFFIX.format(split_no + 1, split_count)}")


def split_prefix(path: Path, split_no: int, split_count: int) -> str | None:
    """llama_split_prefix: PREFIX of part ``split_no`` of ``split_count``, None when ``path`` is not
    named PREFIX-%05d-of-%05d.gguf with exactly those numbers."""
    suffix = SPLIT_SUFFIX.format(split_no + 1, split_count)
    text = str(path)
    return text[: -len(suffix)] if len(text) > len(suffix) and text.endswith(suffix) else None


def shard_paths(path: Path) -> list[Path]:
    """The files of the GGUF model ``path``: ``[path]`` for an ordinary file; every part of a split
    GGUF in order, given any one of its parts.

    llama.cpp loads a split model only from its first part (split.no 0) and finds the others by
    name (llama_split_prefix + llama_split_path, for split.count parts); here any part is accepted
    and resolves to the same list (the first part is ``[0]``, the path to hand to llama.cpp)."""
    from alphaq.errors import InputError

    path = Path(path)
    h = file_header(path)
    if not h.split_count or h.split_count <= 1:
        return [path]
    no = h.split_no or 0
    prefix = split_prefix(path, no, h.split_count)
    if prefix is None:
        raise InputError(f"{path} is part {no + 1} of a split GGUF of {h.split_count} (split.no, split.count), "
                          f"but its name does not end in {SPLIT_SUFFIX.format(no + 1, h.split_count)}, so the "
                          "other parts cannot be found (llama.cpp's naming)")
    parts = [split_path(prefix, i, h.split_count) for i in range(h.split_count)]
    for i, part in enumerate(parts):
        if not part.is_file():
            raise InputError(f"split GGUF part {part} is missing (split.count {h.split_count} in {path})")
        part_no = h.split_no if part == path else file_header(part).split_no
        if (part_no or 0) != i:
            raise InputError(f"{part} has split.no {part_no}, expected {i}: not a part of the same split GGUF")
    return parts


def first_shard(path: Path) -> Path:
    """The file llama.cpp must be given to load the model ``path`` (its first part when split)."""
    return shard_paths(path)[0]


def model_bytes(path: Path) -> int:
    """Size on disk of the GGUF model ``path``: the sum over its parts."""
    return sum(p.stat().st_size for p in shard_paths(path))


def read_field(path: Path, key: str):
    """A key's value (of the first part of a split GGUF: the only one with the model's keys)."""
    reader = GGUFReader(first_shard(path))
    field = reader.get_field(key)
    return None if field is None else field.contents()


def quantised_header_bytes(path: Path) -> int:
    """Bytes before the tensor data of the file llama_model_quantize writes from the float GGUF
    ``path`` (any part of a split GGUF: the single file it stands for), without --override-kv.
    llama-quant.cpp copies the key/values without the split keys and sets
    general.quantization_version and general.file_type (u32, added when absent); ggml writes each
    tensor info with ggml_n_dims dimensions, so trailing ne of 1 that gguf-py's writer keeps (a
    (1, n) router of a shared expert) are dropped; padded to the alignment."""
    heads = [file_header(p) for p in shard_paths(path)]
    first = heads[0]
    added = sum(8 + len(key.encode()) + 4 + 4 for key in (gguf.Keys.General.QUANTIZATION_VERSION,
                                                           gguf.Keys.General.FILE_TYPE) if key not in first.keys)
    infos = sum(8 + len(r.name.encode()) + 4 + 8 * ggml_n_dims(r.shape) + 4 + 8 for h in heads for r in h.records)
    size = first.kv_end - first.split_kv_bytes + added + infos
    return -(-size // first.alignment) * first.alignment


def header_bytes(path: Path) -> int:
    """Bytes before the tensor data: magic, key/values, tensor infos, alignment padding. For a split
    GGUF: of the single file it stands for (the first part's key/values without the split keys, as
    llama_model_quantize writes them, and every part's tensor infos)."""
    parts = shard_paths(path)
    if len(parts) == 1:
        return _read_header(path)[1]
    heads = [file_header(p) for p in parts]
    first = heads[0]
    size = first.kv_end - first.split_kv_bytes + sum(h.info_bytes for h in heads)
    return -(-size // first.alignment) * first.alignment


def writer_with_metadata(reader: GGUFReader, dst: Path, extra: dict[str, tuple[object, GGUFValueType]]) -> GGUFWriter:
    """A writer for ``dst`` holding ``reader``'s key/values plus ``extra`` (replacing same-named
    ones); the caller adds the tensors."""
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs every file at INFO
    writer = GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # GGUF.* are virtual (version, counts); the writer adds general.architecture itself
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE or field.name in extra:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key in sorted(extra):
        value, vtype = extra[key]
        writer.add_key_value(key, value, vtype)
    return writer


def copy_with_metadata(src: Path, dst: Path, extra: dict[str, tuple[object, GGUFValueType]]) -> None:
    """Write ``dst`` = ``src`` plus the ``extra`` keys (replacing same-named ones)."""
    reader = GGUFReader(src)
    writer = writer_with_metadata(reader, dst, extra)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        release_pages(reader, t.data)
    writer.close()


def release_pages(reader: GGUFReader, view) -> None:
    """Drop the pages behind ``view`` (a slice of the reader's memory map) from this process.
    Touched pages of a file mapping count towards RSS until unmapped; a read-only file mapping
    just re-reads them from the file if they are touched again."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = view.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length = min(len(mm) - first, view.nbytes + start - first)
    if length > 0:
        mm.madvise(mmap.MADV_DONTNEED, first, length)


def check_finite(path: Path) -> None:
    """Every float tensor of a GGUF (and every Q8_0 tensor's scales) holds only finite values; the
    first that does not is named.

    The default path runs the model before anything else reads its weights, and a NaN weight
    would surface there as a NaN activation far from its cause."""
    from alphaq.errors import InputError

    for part in shard_paths(path):
        _check_finite_file(part, InputError)


def _check_finite_file(path: Path, error) -> None:
    reader = GGUFReader(path)
    for t in reader.tensors:
        if t.tensor_type not in FLOAT_TYPES | {GGMLQuantizationType.Q8_0}:
            continue
        flat = np.asarray(t.data).reshape(-1)
        if t.tensor_type == GGMLQuantizationType.Q8_0:  # blocks of an F16 scale and 32 int8: only the scale
            flat = flat.view(np.uint8).reshape(-1, 34)[:, :2].copy().view(np.float16).reshape(-1)  # can be NaN
        n_bad = 0
        for s in range(0, flat.size, 1 << 24):  # chunks: no bool copy of a whole expert tensor
            part = flat[s:s + (1 << 24)]
            if t.tensor_type == GGMLQuantizationType.BF16:
                n_bad += int(np.count_nonzero((part.view(np.uint16) & 0x7F80) == 0x7F80))  # exponent all ones
            else:
                n_bad += int(np.count_nonzero(~np.isfinite(part)))
        if n_bad:
            raise error(f"tensor {t.name} has {n_bad} NaN or Inf weights; the model cannot be quantised")
