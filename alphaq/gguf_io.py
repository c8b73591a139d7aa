"""Small GGUF helpers on top of gguf-py: inspect a file, and re-write it with extra metadata.

llama_model_quantize copies the source's key/values but cannot add long strings (its kv_overrides
hold at most 128 bytes), so the ``alphaq.*`` keys, which include the whole plan as JSON, are added
by re-writing the quantised file: same tensors, same bytes, one more group of keys.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from pathlib import Path

import gguf
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
    reader = GGUFReader(path)
    out = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # ggml order, ne0 first
        out.append(TensorRecord(t.name, GGMLQuantizationType(t.tensor_type), tuple(reversed(ne)),
                                int(t.n_elements), int(t.n_bytes)))
    return out


def read_field(path: Path, key: str):
    reader = GGUFReader(path)
    field = reader.get_field(key)
    return None if field is None else field.contents()


def header_bytes(path: Path) -> int:
    """Bytes before the tensor data: magic, key/values, tensor infos, alignment padding."""
    return int(GGUFReader(path).data_offset)


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
