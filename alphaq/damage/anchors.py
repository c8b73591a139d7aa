"""Which tensors the damage stage runs through the model, and how the others get their damage.

Measuring a tensor costs a forward pass over the whole model, so measuring every tensor is
quadratic in depth: 30 tensors at 4 Qwen3-30B-A3B blocks took 27 minutes on 2 cores, the full 48
blocks would take days. Under ``anchors = A`` only A blocks per tensor kind (``attn_q.weight``,
``ffn_down_exps.weight``, ...) are measured: the first, the last and evenly spaced ones between.
Every other tensor of that kind gets the damage per unit of importance-weighted error that its
kind shows at the anchors, interpolated linearly over the block index, times its own weighted
error (which already carries its own weights and its own inputs' scale):

    damage(i, t) = interp_depth(KL(a, t) / E_w(a, t) over the anchors a of kind(i)) * E_w(i, t)

The number of forward passes is then at most A x kinds + the tensors outside blocks, whatever the
depth. Tensors outside blocks (token_embd, output) and kinds with at most A blocks are always
measured, so a model of up to A blocks gets exactly the full measurement.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def block_and_kind(name: str) -> tuple[int, str] | None:
    """(block index, tensor kind) of a GGUF weight name inside a block, else None."""
    m = _BLOCK.match(name)
    return None if m is None else (int(m[1]), m[2])


def anchor_positions(n: int, anchors: int) -> list[int]:
    """Indices of the anchors among n blocks in depth order: first, last, evenly between (one:
    the middle one)."""
    if n <= anchors:
        return list(range(n))
    if anchors == 1:
        return [(n - 1) // 2]
    return sorted(set(np.linspace(0, n - 1, anchors).round().astype(int).tolist()))


@dataclass(frozen=True)
class DepthAnchors:
    measured: frozenset[str]
    # kind -> [(block, anchor tensor)] in depth order, for the kinds that have unmeasured tensors
    anchors: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def of(self, name: str) -> list[str]:
        """The anchor tensors an unmeasured tensor's damage is interpolated from."""
        return [a for _, a in self.anchors[block_and_kind(name)[1]]]

    def interpolate(self, name: str, values: Mapping[str, float]) -> float:
        """The anchors' values (by anchor tensor name) linearly interpolated to this tensor's block;
        outside the anchors' range, the nearest anchor's value."""
        block, kind = block_and_kind(name)
        xs = [b for b, _ in self.anchors[kind]]
        return float(np.interp(block, xs, [values[a] for _, a in self.anchors[kind]]))

    def damage(self, name: str, rates: Mapping[str, Mapping[str, float]],
               errors: Mapping[str, float]) -> dict[str, float]:
        """An unmeasured tensor's damage per type: its kind's damage per unit of weighted error at
        the anchors (``rates``: anchor tensor -> type -> rate), interpolated to its block, times its
        own weighted error (``errors``: type -> error)."""
        return {t: self.interpolate(name, {a: rates[a][t] for a in self.of(name)}) * e for t, e in errors.items()}


def depth_anchors(names: Sequence[str], anchors: int | None) -> DepthAnchors:
    """The tensors to measure, of ``names``, with at most ``anchors`` blocks per kind (None: all)."""
    if anchors is None:
        return DepthAnchors(frozenset(names))
    measured, by_kind = set(), defaultdict(list)
    for name in names:
        where = block_and_kind(name)
        if where is None:
            measured.add(name)
        else:
            by_kind[where[1]].append((where[0], name))
    interpolated = {}
    for kind, items in by_kind.items():
        items.sort()
        chosen = [items[i] for i in anchor_positions(len(items), anchors)]
        measured.update(n for _, n in chosen)
        if len(chosen) < len(items):
            interpolated[kind] = chosen
    return DepthAnchors(frozenset(measured), interpolated)
