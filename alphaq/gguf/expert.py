"""The expert-granular GGUF: per-expert quant types that the patched llama.cpp runs.

Stock GGUF stores each MoE projection as one 3-D tensor (``blk.N.ffn_up_exps.weight``), so all
its experts share one type. When a plan gives the experts of a projection several types, that
projection is written instead as one 3-D tensor per type group plus a map (docs/FORMAT.md):

    blk.N.ffn_up_exps.g0.weight   experts of group 0 (lowest ggml type id), ascending expert order
    blk.N.ffn_up_exps.g1.weight   ...
    blk.N.ffn_up_exps.map         I32, ne = [n_expert, n_groups]: map[g][e] = slot of e in g, or -1

A projection whose experts share one type stays exactly as stock writes it, so a file in which
every projection is uniform is a stock file. Stock llama.cpp fails on a grouped file with
"missing tensor 'blk.N.ffn_up_exps.weight'" rather than loading garbage.

Each expert of a group is quantised by ggml_quantize_chunk with the same importance rule as
llama_model_quantize (all-ones only where llama.cpp requires an imatrix), so an expert's bytes are
the bytes a uniform tensor of that type would hold.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from alphaq.gguf import ggml
from alphaq.gguf.io import release_pages, writer_with_metadata
from alphaq.gguf.qtypes import padded, tensor_bytes
from alphaq.model.weights import open_model

FORMAT_NAME = "expert-groups"
FORMAT_VERSION = 1
FORMAT_KEYS = {
    "alphaq.format": (FORMAT_NAME, GGUFValueType.STRING),
    "alphaq.format_version": (FORMAT_VERSION, GGUFValueType.UINT32),
}
PATCHED_RUNTIME = "patched llama.cpp (alphaq ggml-patches)"
STOCK_RUNTIME = "stock llama.cpp"


def _base(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def group_name(tensor: str, g: int) -> str:
    return f"{_base(tensor)}.g{g}.weight"


def map_name(tensor: str) -> str:
    return f"{_base(tensor)}.map"


@dataclass(frozen=True)
class ExpertGroups:
    """How one merged expert tensor is split into type groups."""

    tensor: str  # the stock name, e.g. "blk.0.ffn_up_exps.weight"
    shape: tuple[int, int, int]  # numpy order (n_expert, rows, cols) of the merged tensor
    types: tuple[GGMLQuantizationType, ...]  # one per group, ascending ggml type id
    experts: tuple[tuple[int, ...], ...]  # the experts of each group, ascending

    @property
    def n_expert(self) -> int:
        return self.shape[0]

    def group_shape(self, g: int) -> tuple[int, int, int]:
        return (len(self.experts[g]), self.shape[1], self.shape[2])

    def group_bytes(self, g: int) -> int:
        return tensor_bytes(self.types[g], self.group_shape(g))

    def map(self) -> np.ndarray:
        """(n_groups, n_expert) int32: slot of each expert inside each group, -1 elsewhere."""
        m = np.full((len(self.types), self.n_expert), -1, dtype=np.int32)
        for g, experts in enumerate(self.experts):
            m[g, list(experts)] = np.arange(len(experts), dtype=np.int32)
        return m

    def type_of(self, expert: int) -> GGMLQuantizationType:
        for t, experts in zip(self.types, self.experts):
            if expert in experts:
                return t
        raise KeyError(expert)


def group_layouts(expert_types: dict[tuple[str, int], GGMLQuantizationType],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, ExpertGroups]:
    """The grouped projections of a plan: merged expert tensors whose experts got >1 type."""
    per_tensor: dict[str, dict[int, GGMLQuantizationType]] = defaultdict(dict)
    for (tensor, expert), t in expert_types.items():
        per_tensor[tensor][expert] = GGMLQuantizationType(t)
    out = {}
    for tensor, by_expert in per_tensor.items():
        types = sorted(set(by_expert.values()), key=int)
        if len(types) < 2:
            continue
        shape = tuple(shapes[tensor])
        if len(shape) != 3 or sorted(by_expert) != list(range(shape[0])):
            raise ValueError(f"{tensor}: expert types must cover experts 0..{shape[0] - 1} of a 3-D tensor")
        experts = tuple(tuple(e for e in sorted(by_expert) if by_expert[e] == t) for t in types)
        out[tensor] = ExpertGroups(tensor, shape, tuple(types), experts)
    return out


def layout_bytes(layout: ExpertGroups, alignment: int) -> int:
    """Tensor-data bytes of a grouped projection: padded groups plus the padded map."""
    return (sum(padded(layout.group_bytes(g), alignment) for g in range(len(layout.types)))
            + padded(4 * layout.n_expert * len(layout.types), alignment))


def layout_info_bytes(layout: ExpertGroups) -> int:
    """Extra header bytes of a grouped projection's tensor infos over the one stock tensor info."""
    def info(name: str, n_dims: int) -> int:  # name length + name + n_dims + dims + type + offset
        return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8

    groups = sum(info(group_name(layout.tensor, g), 3) for g in range(len(layout.types)))
    return groups + info(map_name(layout.tensor), 2) - info(layout.tensor, 3)


def read_layouts(path: Path) -> dict[str, ExpertGroups]:
    """The grouped projections of an expert-granular GGUF (empty for a stock file)."""
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in by_name.items():
        if not name.endswith(".map") or f"{name.removesuffix('.map')}.g0.weight" not in by_name:
            continue
        base = name.removesuffix(".map")
        m = np.asarray(t.data, dtype=np.int32).reshape(int(t.shape[1]), int(t.shape[0]))
        groups = [by_name[f"{base}.g{g}.weight"] for g in range(m.shape[0])]
        g0 = [int(d) for d in groups[0].shape]
        experts = tuple(tuple(int(e) for e in np.flatnonzero(row >= 0)[np.argsort(row[row >= 0])])
                        for row in m)
        out[f"{base}.weight"] = ExpertGroups(
            f"{base}.weight", (m.shape[1], g0[1], g0[0]),
            tuple(GGMLQuantizationType(g.tensor_type) for g in groups), experts)
    return out


def _expert_imatrix(imatrix, name: str, expert: int, cols: int):
    if not imatrix or name not in imatrix:
        return "auto"
    return np.asarray(imatrix[name][expert * cols:(expert + 1) * cols], dtype=np.float32)


def runtime_for(path: Path) -> str:
    return PATCHED_RUNTIME if read_layouts(path) else STOCK_RUNTIME


def write_expert_gguf(quantised: Path, float_gguf: Path, layouts: dict[str, ExpertGroups],
                      extra: dict[str, tuple[object, GGUFValueType]], dst: Path, *,
                      progress: bool = False, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """``dst`` = ``quantised`` with each grouped projection replaced by its groups and map.

    quantised: llama_model_quantize's output, every other tensor in its planned type (grouped
      projections may hold anything: they are re-quantised per expert from ``float_gguf``).
    extra: key/values to add (the alphaq.* keys); the format keys are added here.
    imatrix: flat importance vectors (n_expert * cols) by tensor name; each expert is quantised
      with its own slice, as llama.cpp does for a merged tensor. Without one: "auto" (all-ones
      where llama.cpp requires an imatrix).
    """
    reader = GGUFReader(quantised)
    writer = writer_with_metadata(reader, dst, {**extra, **(FORMAT_KEYS if layouts else {})})

    for t in reader.tensors:
        lay = layouts.get(t.name)
        if lay is None:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            continue
        for g, qt in enumerate(lay.types):
            n, rows, cols = lay.group_shape(g)
            byte_shape = (n, rows, ggml.row_size(qt, cols))
            writer.add_tensor_info(group_name(t.name, g), byte_shape, np.dtype(np.uint8),
                                   lay.group_bytes(g), qt)
        m = lay.map()
        writer.add_tensor_info(map_name(t.name), m.shape, m.dtype, m.nbytes, GGMLQuantizationType.I32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    from tqdm import tqdm

    with ExitStack() as stack:
        slices = {}
        if layouts:
            weights = stack.enter_context(open_model(float_gguf))
            slices = {(m.tensor, m.expert): m for m in weights.matrices() if m.tensor in layouts}
        bar = stack.enter_context(tqdm(total=sum(lay.n_expert for lay in layouts.values()),
                                       desc="expert groups", unit="expert",
                                       disable=not (progress and layouts), dynamic_ncols=True))
        for t in reader.tensors:
            lay = layouts.get(t.name)
            if lay is None:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                release_pages(reader, t.data)
                continue
            for g, qt in enumerate(lay.types):
                rows = [ggml.quantize(slices[(t.name, e)].load(), qt, _expert_imatrix(imatrix, t.name, e, lay.shape[-1]))
                        for e in lay.experts[g]]
                writer.write_tensor_data(np.stack(rows), tensor_endianess=reader.endianess)
                bar.update(len(rows))
            writer.write_tensor_data(lay.map(), tensor_endianess=reader.endianess)
    writer.close()
