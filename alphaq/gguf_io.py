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

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})


@dataclass(frozen=True)
class TensorRecord:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (n_expert, rows, cols) for merged experts
    n_elements: int
    n_bytes: int


def read_tensors(path: Path) -> list[TensorRecord]:
    """Every tensor's name, type, shape and size, from the header alone."""
    return list(_read_header(path)[0])


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
    need, size = header_bytes(path) + sum(t.n_bytes for t in tensors), path.stat().st_size
    if size < need:  # (a lower bound: the padding between tensors is not counted)
        raise InputError(f"{path} is truncated: {size} bytes, its tensors alone need {need}")
    return tensors


# byte sizes of GGUF's fixed-size value types (GGUFValueType: UINT8 .. FLOAT64)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY), int(GGUFValueType.UINT32)


def _read_header(path: Path) -> tuple[list[TensorRecord], int]:
    """(tensor records, bytes before the tensor data) of a little-endian GGUF v2/v3 file.

    gguf-py's reader builds a numpy view for every part of every key/value (~0.17 s per file
    even for a small model, and the converter pipeline reads each header several times); here
    values are skipped, only the tensor infos and ``general.alignment`` are decoded. A file this
    does not handle (big-endian, or an older version) goes to gguf-py's reader."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF" or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
            return _read_header_gguf_py(path)
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        off = 24
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT

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

        for _ in range(n_kv):
            key, off = string(off)
            (vtype,) = struct.unpack_from("<I", mm, off)
            off += 4
            if key == gguf.Keys.General.ALIGNMENT and vtype == _UINT32:
                (alignment,) = struct.unpack_from("<I", mm, off)
            off = skip(vtype, off)
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
        return records, -(-off // alignment) * alignment


def _read_header_gguf_py(path: Path) -> tuple[list[TensorRecord], int]:
    reader = GGUFReader(path)
    out = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # ggml order, ne0 first
        out.append(TensorRecord(t.name, GGMLQuantizationType(t.tensor_type), tuple(reversed(ne)),
                                int(t.n_elements), int(t.n_bytes)))
    return out, int(reader.data_offset)


def read_field(path: Path, key: str):
    reader = GGUFReader(path)
    field = reader.get_field(key)
    return None if field is None else field.contents()


def header_bytes(path: Path) -> int:
    """Bytes before the tensor data: magic, key/values, tensor infos, alignment padding."""
    return _read_header(path)[1]


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
    """Every float tensor of a GGUF holds only finite values; the first that does not is named.

    The default path runs the model before anything else reads its weights, and a NaN weight
    would surface there as a NaN activation far from its cause."""
    from alphaq.errors import AlphaQError

    reader = GGUFReader(path)
    for t in reader.tensors:
        if t.tensor_type not in FLOAT_TYPES:
            continue
        flat = np.asarray(t.data).reshape(-1)
        n_bad = 0
        for s in range(0, flat.size, 1 << 24):  # chunks: no bool copy of a whole expert tensor
            part = flat[s:s + (1 << 24)]
            if t.tensor_type == GGMLQuantizationType.BF16:
                n_bad += int(np.count_nonzero((part.view(np.uint16) & 0x7F80) == 0x7F80))  # exponent all ones
            else:
                n_bad += int(np.count_nonzero(~np.isfinite(part)))
        if n_bad:
            raise AlphaQError(f"tensor {t.name} has {n_bad} NaN or Inf weights; the model cannot be quantised")
