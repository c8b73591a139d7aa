"""The default mode's cap on llama.cpp's quantiser time (`--max-quantise-ns auto`).

Why a cap by default: the damage mode picks the IQ grid types wherever they buy the most, and
llama.cpp's quantiser writes them at 250-800 ns per weight against 14-45 for Q3_K
(quantise_speed.json). At Qwen3-30B-A3B's shapes that made the final quantise stage the largest
part of the conversion: 211 s of 483 s at 2 blocks on 2 cores, against about 50 s for the whole
stock pipeline (README, "Conversion"). On the zoo, a cap of 150 ns per weight cost a median KL
ratio of 1.025 against the uncapped plan and still beat the better stock file in all 20 cells
(bench/SELFCAL.md, "A cap on the quantiser's time"), while 100 ns lost two cells.

The rule: cap = max(FLOOR_NS, what llama.cpp's quantiser takes for its own mix at this size with
an importance matrix), the mix being the one the budget names (--like MIX), else the largest of
llama.cpp's mixes whose file fits in the budget (of equal sizes the slower one). Below 2.5 bpw
llama.cpp's own mixes are IQ types too (IQ2_XXS: 340-380 ns on the zoo), and there the uncapped
plan costs no more than they do, so the IQ types stay where the cap would hurt most (IQ2_XXS size: 1.22-1.28x the KL under a flat 150). A plan already within the cap is kept as
it is; `--max-quantise-ns none` gives the uncapped plan, a number a fixed cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from alphaq.allocate.plan import Plan, PlanConfig
from alphaq.errors import BudgetError

log = logging.getLogger(__name__)

FLOOR_NS = 150.0  # ns per weight, one thread: the measured cap (bench/selfcal-cap.json)


@dataclass(frozen=True)
class AutoCap:
    """What the auto cap decided, for the summary and the plan JSON."""

    cap_ns: float  # the cap: max(FLOOR_NS, mix_ns)
    mix: str  # llama.cpp's mix at this size
    mix_ns: float  # its quantiser time with an importance matrix, ns per weight
    uncapped_ns: float  # the uncapped plan's quantiser time
    uncapped_damage: float  # the uncapped plan's objective (predicted damage)
    bound: bool  # whether the cap changed the plan
    reason: str = ""  # why an uncapped plan was kept although it is over the cap

    def describe(self, damage: float) -> str:
        """One line: the cap, where it comes from, and what it cost (``damage``: the final plan's objective)."""
        line = (f"auto cap {self.cap_ns:.0f} ns (the larger of {FLOOR_NS:.0f} and llama.cpp's {self.mix} with an "
                f"importance matrix, {self.mix_ns:.0f})")
        if self.reason:
            return line + f"; not applied: {self.reason}"
        if not self.bound:
            return line + "; the plan is within it"
        more = damage / self.uncapped_damage - 1 if self.uncapped_damage > 0 else 0.0
        return (line + f": down from {self.uncapped_ns:.0f} ns per weight, for {more:.1%} more predicted damage "
                "(--max-quantise-ns none lifts it)")


def reference_mix(mixes: dict, budget_bytes: float):
    """The largest mix (alphaq.gguf.stock.StockMix by name) whose file fits in ``budget_bytes``, of
    mixes of that same size the one llama.cpp's quantiser takes longest for (IQ3_S and Q3_K_S
    are both 3.44 bpw); the smallest mix when none fits."""
    fitting = [m for m in mixes.values() if m.file_bytes <= budget_bytes]
    if not fitting:
        return min(mixes.values(), key=lambda m: m.file_bytes)
    return max(fitting, key=lambda m: (m.file_bytes, m.quantise_ns))


def auto_capped_plan(solve: Callable[[PlanConfig], Plan], cfg: PlanConfig, float_gguf: Path,
                     like: str | None = None) -> tuple[Plan, AutoCap]:
    """The plan ``solve(cfg)``, re-solved under the auto cap when its types are slower than the cap;
    ``like``: the mix the budget was named by (--like), which is then the reference mix itself."""
    from alphaq.gguf.quantize import ALL_MIXES
    from alphaq.gguf.stock import stock_mixes

    plan = solve(cfg)
    if like is not None:
        mix = stock_mixes(float_gguf, cfg.alignment, (like.upper(),))[like.upper()]
    else:
        budget = cfg.budget if cfg.budget_mode == "size" else plan.totals.predicted_file_bytes
        mix = reference_mix(stock_mixes(float_gguf, cfg.alignment, ALL_MIXES), budget)
    cap = max(FLOOR_NS, mix.quantise_ns)
    uncapped = plan.totals.quantise_ns_per_weight
    note = AutoCap(cap, mix.name, mix.quantise_ns, uncapped, plan.totals.objective, bound=uncapped > cap)
    if not note.bound:
        return plan, note
    try:
        return solve(replace(cfg, max_quantise_ns=cap)), note
    except BudgetError as exc:  # even the fastest types the budget allows are slower: keep the plan
        log.info("auto quantiser cap not applied: %s", exc)
        return plan, replace(note, bound=False, reason=str(exc))
