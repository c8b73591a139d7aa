"""How long llama.cpp's quantiser takes per weight for each type, and what a set of types costs.

The final quantise stage's time is set by the types a plan picks: ggml quantises Q3_K in tens of ns
per weight and the IQ grid types in hundreds (quantise_speed.json, one thread, measured by
scripts/bench_qtype_speed.py with the ggml that llama_model_quantize uses). The table is data in
the package, not a reading of the machine a plan is made on, so that a plan with a time cap is
the same on every machine (`PlanConfig.max_quantise_ns`); on another CPU the absolute times
differ, the ratios between types much less.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path

from gguf import GGMLQuantizationType

from alphaq.errors import AlphaQError

TABLE = Path(__file__).with_name("quantise_speed.json")


@functools.cache
def _rates() -> dict[str, dict]:
    return json.loads(TABLE.read_text())["types"]


def quantise_ns(t: GGMLQuantizationType, imatrix: bool = True) -> float:
    """ns per weight, one thread, that llama.cpp's quantiser takes to write type ``t`` (with an
    importance vector when ``imatrix``, as the default path always passes one)."""
    row = _rates().get(GGMLQuantizationType(t).name)
    if row is None:
        raise AlphaQError(f"no measured quantiser speed for type {GGMLQuantizationType(t).name} in {TABLE.name}; "
                          "run scripts/bench_qtype_speed.py")
    plain = row.get("without_imatrix_ns")
    return float(row["with_imatrix_ns"] if imatrix or plain is None else plain)


def mean_quantise_ns(parts: Iterable[tuple[int, GGMLQuantizationType]], imatrix: bool = True) -> float:
    """Mean ns per weight (quantise_ns) over ``parts``, (weights, written type) pairs; NaN for none."""
    parts = list(parts)
    weights = sum(n for n, _ in parts)
    return sum(n * quantise_ns(t, imatrix) for n, t in parts) / weights if weights else math.nan


def measured_types() -> list[str]:
    return list(_rates())
