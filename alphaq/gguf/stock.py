"""What llama.cpp's own quantiser writes for one of its mixes: the file's size, and how long the
quantiser takes for the mix's types (an estimate from alphaq.gguf.speed's table).

Both come from llama.cpp's dry run (alphaq.gguf.quantize.stock_mix_types), which quantises nothing:
about 10 ms per mix on a 2-block Qwen3-30B-A3B-shaped model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from alphaq.gguf.io import quantised_header_bytes, read_tensors
from alphaq.gguf.qtypes import llama_quantizes, padded, tensor_bytes
from alphaq.gguf.quantize import STOCK_MIXES, stock_mix_types
from alphaq.gguf.speed import mean_quantise_ns


@dataclass(frozen=True)
class StockMix:
    name: str  # llama-quantize's name, e.g. "Q3_K_M"
    file_bytes: int  # the file llama.cpp writes, header included
    # llama.cpp's quantiser on the mix's types, mean ns per quantised weight, one thread, with an
    # importance matrix (what a llama.cpp user who passes --imatrix pays)
    quantise_ns: float


def stock_mix(float_gguf: Path, mix: str, alignment: int, header: int | None = None) -> StockMix:
    """llama.cpp's ``mix`` for ``float_gguf``: its dry run's types, padded tensor bytes, and the
    header it writes (``header``: quantised_header_bytes, when known)."""
    shapes = {t.name: t.shape for t in read_tensors(float_gguf)}
    types = {n: GGMLQuantizationType[t] for n, t in stock_mix_types(float_gguf, mix).items()}
    header = quantised_header_bytes(float_gguf) if header is None else header
    data = sum(padded(tensor_bytes(t, shapes[n]), alignment) for n, t in types.items())
    ns = mean_quantise_ns((math.prod(shapes[n]), t) for n, t in types.items() if llama_quantizes(n, shapes[n]))
    return StockMix(mix, header + data, ns)


def stock_size(float_gguf: Path, mix: str, alignment: int, header: int | None = None) -> int:
    """Size of the file llama.cpp's quantiser writes for ``mix`` (stock_mix)."""
    return stock_mix(float_gguf, mix, alignment, header).file_bytes


def stock_mixes(float_gguf: Path, alignment: int, mixes=STOCK_MIXES) -> dict[str, StockMix]:
    """Each of ``mixes`` (stock_mix), the header computed once."""
    header = quantised_header_bytes(float_gguf)
    return {mix: stock_mix(float_gguf, mix, alignment, header) for mix in mixes}


def stock_sizes(float_gguf: Path, alignment: int, mixes=STOCK_MIXES) -> dict[str, int]:
    """File size of each of ``mixes`` (stock_mix)."""
    return {m: s.file_bytes for m, s in stock_mixes(float_gguf, alignment, mixes).items()}
