#!/usr/bin/env python3
"""Conversion time, memory and disk at real MoE shapes, and a projection to the full models.

    python scripts/bench_scale.py [--archs qwen3moe deepseek2-lite mixtral-8x7b] [--blocks 2 4]
                                  [--modes stock fast default] [--repeats 1] [--keep] [--json bench/scale.json]

For each architecture and each of two block counts it generates a seeded random checkpoint with
the real model's block shapes and checkpoint layout (scripts/make_large_random_moe.py; cached in
.cache/scale/, deleted after its runs unless --keep, so that at most one model is on disk at a
time), then times, alternating in every repeat:
  * stock:   llama.cpp's converter (BF16) + llama_model_quantize Q3_K_M (scripts/bench_convert.py's
             stock pipeline, with each of the two steps timed)
  * fast:    convert_alphaq.py MODEL --fast --like Q3_K_M
  * default: convert_alphaq.py MODEL --like Q3_K_M (only with --modes ... default: slow, about
             40 min at 4 Qwen3 blocks on a 2-core machine)
each with --no-cache, so every measurement is paid. It records wall time, the per-stage seconds
of the summary's ``time`` line, the peak RSS of the largest process and of the whole process tree
and their peak private memory (RssAnon + RssShmem: RSS without the pages of memory-mapped files,
which the OS may drop; bench_convert.measure), the output size, and the peak disk use of the run's work folder (every
temporary file goes there: TMPDIR points at it).

Seconds per block = (value at the larger count - value at the smaller) / (difference in blocks),
so fixed costs (start-up, embeddings, DeepSeek's dense block 0) drop out; fixed = value - rate x
blocks. "Blocks" are MoE blocks: a deepseek2-lite model of N blocks has N + 1 layers.

The projection table (printed, and stored in the JSON) extrapolates those rates to the full models;
every number in it is a projection, with its arithmetic. Assumptions, stated again in the output:
time is linear in MoE blocks; the real vocabulary's embedding and output matrices (this benchmark
uses a 1,024-piece vocabulary) cost the per-weight rate of a block; on 16 cores the
llama_model_quantize stages run 8x faster than on 2 (linear scaling in cores, an assumption) and
every other stage is not sped up at all; the default mode's damage stage is projected from its
parts in the summary (per measurement: fake quantisation + a forward pass over every block and
token; per tensor: weighted errors; one reference pass) with the default depth anchors: every
block measured on 16 windows up to 4 blocks, then 4 blocks per tensor kind on 4 windows
(alphaq.damage.anchors), so measurements stop growing with depth but each one still runs every block.
The DeepSeek-V3-class default (project_v3_default) takes its per-weight stages from the arch the stock
projection scales, and its forward-pass stages and damage stage from deepseek2-lite (same MLA block
and tensor kinds) scaled by the weights one token reads; it assumes the model stays in RAM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert  # noqa: E402  (the stock pipeline, the RSS sampler and the idle wait)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("qwen3moe", "deepseek2-lite", "mixtral-8x7b")
# Block counts that keep one model plus its work files within about 25 GB of disk.
DEFAULT_BLOCKS = {"qwen3moe": (2, 4), "deepseek2-lite": (2, 4), "mixtral-8x7b": (1, 2)}
EXTRA_LAYERS = {"deepseek2-lite": 1}  # the dense block 0 (first_k_dense_replace=1)
CORE_SCALED_STAGES = {"quantize", "quantise"}  # llama_model_quantize, multi-threaded C++
# The default mode's damage stage is (tensors) x (one forward pass), both proportional to the
# blocks: it is fitted as a x blocks^2 + c, not linearly.
QUADRATIC_STAGES = {"damage"}

# The full models: MoE blocks, real vocabulary x hidden (embedding + untied output), BF16 weights
# of the published checkpoint (parameters x 2 bytes, from the model cards: 30.5B, 15.7B, 46.7B, 671B).
FULL = {
    "qwen3moe": dict(name="Qwen3-30B-A3B", blocks=48, vocab=151936, hidden=2048, params=30.5e9),
    "deepseek2-lite": dict(name="DeepSeek-V2-Lite", blocks=26, vocab=102400, hidden=2048, params=15.7e9),
    "mixtral-8x7b": dict(name="Mixtral-8x7B", blocks=32, vocab=32000, hidden=4096, params=46.7e9),
}
# DeepSeek-V3: 61 layers (3 dense of width 18432, then 58 MoE of 256 routed + 1 shared expert of
# 2048 x 7168), MLA with 128 heads (q_lora 1536, kv_lora 512, qk 128 + 64, v 128), vocab 129280.
V3_MLA = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
V3 = dict(name="DeepSeek-V3-class", blocks=58, vocab=129280, hidden=7168, params=671e9,
          expert=3 * 2048 * 7168, block_weights=257 * 3 * 2048 * 7168 + 256 * 7168 + V3_MLA,
          dense_weights=3 * (3 * 18432 * 7168 + V3_MLA))
EXPERT_WEIGHTS = {"qwen3moe": 3 * 768 * 2048, "deepseek2-lite": 3 * 1408 * 2048, "mixtral-8x7b": 3 * 14336 * 4096}
# Weights one token reads in a MoE block (attention + router + top-k routed + shared experts): a
# forward pass's arithmetic. deepseek2-lite as scripts/make_large_random_moe.py builds it (query
# LoRA of rank 1536, as V3 has, at block counts other than 26/27).
_V2L_MLA = 2048 * 1536 + 1536 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048
ACTIVE_WEIGHTS = {"deepseek2-lite": _V2L_MLA + 64 * 2048 + (6 + 2) * 3 * 1408 * 2048,
                  "DeepSeek-V3-class": V3_MLA + 256 * 7168 + (8 + 1) * 3 * 2048 * 7168}
# V3's 3 dense blocks read 3 x 18432 x 7168 + MLA a token, as many as a MoE block (by design), and
# its output matrix vocab x hidden: forward-pass block equivalents of the whole model.
V3_FORWARD_BLOCKS = 61 + V3["vocab"] * V3["hidden"] / ACTIVE_WEIGHTS["DeepSeek-V3-class"]
# Tensors the damage stage sees in V3 beyond deepseek2-lite's per-block kinds: the 3 dense blocks'
# 6 attention kinds (shared with the MoE blocks: anchored) and 3 FFN kinds (3 blocks <= 4 anchors:
# all measured), + token_embd and output.
V3_DENSE_FFN_TENSORS, V3_DENSE_ATTN_TENSORS, V3_OUTSIDE = 3 * 3, 3 * 6, 2

MODE_ARGS = {"fast": ("--fast", "--like", "Q3_K_M"), "default": ("--like", "Q3_K_M")}


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass  # deleted while we walked
    return total


def run_mode(mode: str, model: Path, work: Path) -> dict:
    """One measured run in an empty ``work``; adds output bytes and the work folder's peak disk use."""
    work.mkdir(parents=True)
    peak, done = [0], threading.Event()

    def sample_disk():
        while not done.wait(0.5):
            peak[0] = max(peak[0], folder_bytes(work))

    if mode == "stock":
        cmd = [sys.executable, "-c", bench_convert._STOCK, str(model), str(work)]
    else:
        cmd = bench_convert.alphaq_cmd(ROOT, model, str(work), mode, MODE_ARGS[mode])
    sampler = threading.Thread(target=sample_disk, daemon=True)
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(work)  # the child's temporary files count in the work folder
    sampler.start()
    try:
        row = bench_convert.measure(cmd)
    finally:
        done.set()
        sampler.join()
        if old_tmp is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = old_tmp
    row["out_bytes"] = (work / f"{mode}.gguf").stat().st_size
    row["peak_disk_bytes"] = max(peak[0], folder_bytes(work))
    shutil.rmtree(work)
    return row


def make_model(arch: str, blocks: int, cache: Path) -> tuple[Path, float]:
    path = cache / f"{arch}-{blocks}blk"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_large_random_moe.py"), str(path), "--arch", arch,
                    "--layers", str(blocks + EXTRA_LAYERS.get(arch, 0))], check=True, cwd=ROOT)
    return path, time.perf_counter() - t


def bench_point(arch: str, blocks: int, modes: list[str], repeats: int, cache: Path, keep: bool) -> dict:
    model, gen_s = make_model(arch, blocks, cache)
    hf_bytes = sum(p.stat().st_size for p in model.glob("model*.safetensors"))
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for i in range(repeats):
            for mode in modes:
                rows[mode].append(run_mode(mode, model, cache / f"work-{arch}-{blocks}-{i}-{mode}"))
                r = rows[mode][-1]
                print(f"#   {arch} {blocks} blk {mode}: {r['wall']:.1f} s, peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB "
                      f"(tree {r['peak_tree_rss_kib'] / 2**20:.2f}), peak private {r['peak_private_kib'] / 2**20:.2f} GiB "
                      f"(tree {r['peak_tree_private_kib'] / 2**20:.2f}), stages {r['stages']}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(model)
    out = {"arch": arch, "blocks": blocks, "layers": blocks + EXTRA_LAYERS.get(arch, 0), "hf_bf16_bytes": hf_bytes,
           "generate_s": round(gen_s, 1), "runs": rows}
    out["median"] = {m: summarise(v) for m, v in rows.items()}
    return out


def summarise(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r["stages"]}
    return {"wall": statistics.median(r["wall"] for r in runs),
            "stages": {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in sorted(keys)},
            "peak_rss_bytes": max(r["peak_rss_kib"] for r in runs) * 1024,
            "peak_tree_rss_bytes": max(r["peak_tree_rss_kib"] for r in runs) * 1024,
            **{f"peak_{k}_bytes": max(r[f"peak_{k}_kib"] for r in runs) * 1024
               for k in ("private", "tree_private", "file", "tree_file")},
            "out_bytes": statistics.median(r["out_bytes"] for r in runs),
            "peak_disk_bytes": max(r["peak_disk_bytes"] for r in runs),
            "damage": {k: statistics.median(r["damage"][k] for r in runs) for k in runs[0].get("damage", {})},
            # alphaq's own process, per stage, from its summary (the stock pipeline has none)
            "stage_private_gib": {k: max(r.get("stage_private_gib", {}).get(k, 0.0) for r in runs)
                                  for k in runs[0].get("stage_private_gib", {})}}


def linear(a: tuple[int, float], b: tuple[int, float]) -> tuple[float, float]:
    """(per block, fixed) through two (blocks, value) points."""
    rate = (b[1] - a[1]) / (b[0] - a[0])
    return rate, a[1] - rate * a[0]


def per_block(lo: dict, hi: dict) -> dict:
    """For every mode: wall, stage seconds, output and peak disk bytes as (per block, fixed)."""
    out = {"block_weights": (hi["hf_bf16_bytes"] - lo["hf_bf16_bytes"]) / 2 / (hi["blocks"] - lo["blocks"])}
    for mode in lo["median"]:
        a, b = lo["median"][mode], hi["median"][mode]
        fit = lambda f: linear((lo["blocks"], f(a)), (hi["blocks"], f(b)))  # noqa: E731
        quad = {k: linear((lo["blocks"] ** 2, a["stages"][k]), (hi["blocks"] ** 2, b["stages"].get(k, 0.0)))
                for k in a["stages"] if k in QUADRATIC_STAGES}
        model = damage_model(lo, hi, mode)
        rest = lambda m: m["wall"] - sum(m["stages"].get(k, 0.0) for k in quad)  # noqa: E731
        out[mode] = {"wall": fit(lambda m: m["wall"]), "quadratic": {} if model else quad, "damage_model": model,
                     "wall_linear_part": fit(rest),
                     "stages": {k: fit(lambda m, k=k: m["stages"].get(k, 0.0)) for k in a["stages"]},
                     "out_bytes": fit(lambda m: m["out_bytes"]), "peak_disk_bytes": fit(lambda m: m["peak_disk_bytes"])}
    return out


def damage_model(lo: dict, hi: dict, mode: str) -> dict | None:
    """The damage stage's cost parts, from the two runs' summary lines, for projecting it to any depth
    under the default depth anchors (alphaq.damage.anchors): per measurement its fake quantisation and
    a forward pass over every block and token; per tensor its weighted errors; one reference pass."""
    a, b = lo["median"][mode].get("damage"), hi["median"][mode].get("damage")
    if not a or not b:
        return None
    tensors = lambda d: d["measured"] + d.get("interpolated", 0)  # noqa: E731  (weighted errors: every tensor)
    kinds = (tensors(b) - tensors(a)) / (hi["blocks"] - lo["blocks"])  # tensors per block
    # the deeper run already interpolates some blocks: every kind is at its anchor count, so any
    # deeper model measures as many tensors as it did (otherwise: kinds x min(anchors, blocks) + outside)
    capped = b["measured"] if b.get("interpolated") else None
    # (the anchor count that run used: the summary line does not say it; every run so far was made
    # under the default of then, 4)
    return {"kinds": kinds, "outside": tensors(b) - kinds * hi["blocks"], "measured_capped": capped,
            "capped_anchors": b.get("anchors", 4),
            "fake_per_measurement": b["fake_quantise"] / b["measured"],
            "forward_per_measurement_block_token": b["forward"] / (b["measured"] * hi["blocks"] * b["tokens"]),
            "reference_per_block_token": b["reference"] / (hi["blocks"] * b["tokens"]),
            "weighted_error_per_tensor": b["weighted_error"] / tensors(b), "measured_at": hi["blocks"]}


def project_damage(m: dict, blocks: float) -> tuple[float, str]:
    """The damage stage at ``blocks`` with the default anchors and windows, and its arithmetic."""
    from alphaq.damage import DamageConfig
    from alphaq.selftext import SelfTextConfig

    cfg = DamageConfig()
    capped = m.get("measured_capped") if m.get("capped_anchors", 4) == cfg.anchors else None
    measured = capped or m["kinds"] * min(cfg.anchors, blocks) + m["outside"]
    tensors = m["kinds"] * blocks + m["outside"]
    tokens = SelfTextConfig().n_ctx * cfg.windows_when(blocks <= cfg.anchors)
    fwd = measured * m["forward_per_measurement_block_token"] * blocks * tokens
    fake = measured * m["fake_per_measurement"]
    ref = m["reference_per_block_token"] * blocks * tokens
    err = tensors * m["weighted_error_per_tensor"]
    text = (f"damage: {measured:.0f} measurements x ({m['fake_per_measurement']:.1f} s fake quantisation + "
            f"{blocks:.1f} blocks x {tokens} tokens x {m['forward_per_measurement_block_token'] * 1e3:.3f} ms) + "
            f"reference {_dur(ref)} + {tensors:.0f} tensors x {m['weighted_error_per_tensor']:.1f} s weighted errors "
            f"= {_dur(fwd + fake + ref + err)}")
    return fwd + fake + ref + err, text


def _gib(n: float, digits: int = 1) -> str:
    return f"{n / 2**30:.{digits}f} GiB"


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def full_targets(fits: dict) -> list[tuple[str, dict, float, str]]:
    """(name, fit of the measured arch used, weight-equivalent blocks, how they were counted)."""
    out = []
    for arch, fit in fits.items():
        f = FULL[arch]
        vocab = (f["vocab"] - 1024) * f["hidden"] * 2 / fit["block_weights"]
        out.append((f["name"], fit, f["blocks"] + vocab,
                    f"{f['blocks']} blocks + {vocab:.2f} block-equivalents of vocabulary ({f['vocab']} x {f['hidden']} x 2)"))
    ref = min(fits, key=lambda a: abs(math.log(V3["expert"] / EXPERT_WEIGHTS[a])))
    w = fits[ref]["block_weights"]
    scale = V3["block_weights"] / w
    rest = (V3["dense_weights"] + V3["vocab"] * V3["hidden"] * 2) / w
    out.append((V3["name"], fits[ref], V3["blocks"] * scale + rest,
                f"rates of {ref} (the measured expert shape nearest 2048 x 7168 in weights): 58 blocks x "
                f"{V3['block_weights'] / 1e9:.2f}G / {w / 1e9:.3f}G weights a block = {V3['blocks'] * scale:.1f} "
                f"+ {rest:.2f} for 3 dense blocks and the vocabulary"))
    return out


def project(fit: dict, mode: str, blocks: float, cores: int, scaled: bool) -> tuple[float, str]:
    """Projected seconds and the arithmetic behind them. ``scaled``: ``blocks`` are weight
    equivalents of another arch's blocks, which says nothing of a quadratic stage's tensor count."""
    quad, model = fit[mode].get("quadratic", {}), fit[mode].get("damage_model")
    if model is not None:
        if scaled:
            return float("nan"), ("not projected: the damage stage's measurements count tensors, which scaling "
                                  "by weights does not capture")
        rate, fixed = fit[mode]["wall_linear_part"]
        d, d_text = project_damage(model, blocks)
        t2 = rate * blocks + fixed + d
        text = f"{rate:.2f} s/block x {blocks:.2f} + {fixed:.1f} s fixed + {d_text} = {_dur(t2)}"
        return _on_cores(fit, mode, blocks, cores, t2, text)
    if quad and scaled:
        return float("nan"), (f"not projected: the {', '.join(quad)} stage grows with tensors x forward pass, "
                              "which scaling by weights does not capture")
    rate, fixed = fit[mode]["wall_linear_part" if quad else "wall"]
    t2 = rate * blocks + fixed + sum(a * blocks ** 2 + c for a, c in quad.values())
    text = f"{rate:.2f} s/block x {blocks:.2f} + {fixed:.1f} s fixed"
    text += "".join(f" + {k} {a:.2f} s/block^2 x {blocks:.2f}^2 + {c:.1f} s" for k, (a, c) in quad.items())
    text += f" = {_dur(t2)}"
    return _on_cores(fit, mode, blocks, cores, t2, text)


PER_WEIGHT_STAGES = ("float model", "plan", "quantise")  # the default's stages that read every weight once
FORWARD_STAGES = ("self_text", "importance")  # the default's forward-pass stages (arithmetic: active weights)


def project_v3_default(fits: dict, cores: int) -> tuple[float, str]:
    """The default mode on the V3-class model: its per-weight stages at the per-weight rates of the
    arch the stock projection scales (nearest expert shape); its forward-pass stages and damage
    stage from deepseek2-lite (the same MLA block and tensor kinds), scaled by the weights a token
    reads; the damage stage's measurement count from V3's own tensors under the depth anchors."""
    lite = fits.get("deepseek2-lite", {}).get("default", {})
    model = lite.get("damage_model")
    if not model:
        return float("nan"), "not projected: needs the deepseek2-lite default run (same MLA block, same tensor kinds)"
    from alphaq.damage import DamageConfig
    from alphaq.selftext import SelfTextConfig

    name, fit, by_weight, _ = full_targets(fits)[-1]
    rates = {k: r for k, (r, _) in fit["default"]["stages"].items()} if "default" in fit else {}
    per_weight = sum(rates.get(k, 0.0) for k in PER_WEIGHT_STAGES) if rates else float("nan")
    q_rate = rates.get("quantise", 0.0) if rates else float("nan")
    act = ACTIVE_WEIGHTS[name] / ACTIVE_WEIGHTS["deepseek2-lite"]
    fwd_blocks = V3_FORWARD_BLOCKS * act  # deepseek2-lite block-equivalents of arithmetic per token
    forward_stages = sum(lite["stages"].get(k, (0.0, 0.0))[0] for k in FORWARD_STAGES) * fwd_blocks
    cfg = DamageConfig()
    kinds = model["kinds"]
    measured = kinds * cfg.anchors + V3_DENSE_FFN_TENSORS + V3_OUTSIDE
    tensors = kinds * V3["blocks"] + V3_DENSE_ATTN_TENSORS + V3_DENSE_FFN_TENSORS + V3_OUTSIDE
    tokens = SelfTextConfig().n_ctx * cfg.windows_when(False)
    per_token = model["forward_per_measurement_block_token"] * fwd_blocks * tokens
    fake = model["fake_per_measurement"] * V3["block_weights"] / fits["deepseek2-lite"]["block_weights"]
    ref = model["reference_per_block_token"] * fwd_blocks * tokens
    damage = measured * (fake + per_token) + ref + tensors * model["weighted_error_per_tensor"]
    fixed = lite["wall_linear_part"][1]
    t2 = per_weight * by_weight + forward_stages + damage + fixed
    text = (f"per-weight stages ({', '.join(PER_WEIGHT_STAGES)}) {per_weight:.2f} s/block x {by_weight:.1f} weight "
            f"block-equivalents + forward stages ({', '.join(FORWARD_STAGES)}) of deepseek2-lite x {fwd_blocks:.0f} "
            f"(61 layers + output = {V3_FORWARD_BLOCKS:.1f} blocks x {act:.2f}, the weights a token reads against "
            f"deepseek2-lite's) = {_dur(forward_stages)} + damage: {measured:.0f} measurements x (fake quantisation "
            f"{fake:.0f} s, deepseek2-lite's x block weights + forward {_dur(per_token)}) + reference {_dur(ref)} + "
            f"{tensors:.0f} tensors x {model['weighted_error_per_tensor']:.1f} s weighted errors = {_dur(damage)} + "
            f"{fixed:.0f} s fixed = {_dur(t2)}; assumes the BF16 model stays in RAM (every forward pass reads it all)")
    if cores == 2 or math.isnan(t2):
        return t2, text
    q = q_rate * by_weight
    t = t2 - q * (1 - 2 / cores)
    return t, f"{_dur(t2)} - quantise {_dur(q)} x (1 - 2/{cores}) = {_dur(t)}"


def _on_cores(fit: dict, mode: str, blocks: float, cores: int, t2: float, text: str) -> tuple[float, str]:
    """2-core seconds to ``cores``: only llama_model_quantize's stage assumed to scale."""
    if cores == 2 or math.isnan(t2):
        return t2, text
    q = sum(r * blocks + f for k, (r, f) in fit[mode]["stages"].items() if k in CORE_SCALED_STAGES - QUADRATIC_STAGES)
    t = t2 - q * (1 - 2 / cores)
    return t, f"{_dur(t2)} - quantize {_dur(q)} x (1 - 2/{cores}) = {_dur(t)}"


def projection_table(fits: dict, modes: list[str]) -> list[dict]:
    print("\n## PROJECTIONS (not measurements): full models, extrapolated from the per-block rates above")
    print("# assumptions: time, output and work-folder disk are linear in MoE blocks; the real vocabulary's embedding and")
    print("# output matrices cost the per-weight rate of a block; on 16 cores only llama_model_quantize gets faster,")
    print("# by 16/2 = 8x (ASSUMED linear scaling in cores, not measured); every other stage is kept as on 2 cores.")
    print("# the default mode's damage stage: measurements (at most DamageConfig.anchors blocks per tensor kind) x a forward pass over")
    print("# every block, + weighted errors per tensor, from the parts the summary reports (see project_damage).")
    print("# DeepSeek-V3-class default: per-weight stages by weights, forward-pass stages and damage from deepseek2-lite")
    print("# scaled by the weights a token reads (project_v3_default); the BF16 model assumed to stay in RAM.")
    print("| model (projection) | blocks counted as | mode | projected time, 2 cores | projected time, 16 cores | "
          "projected output | projected peak work-folder disk | BF16 weights (params x 2) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, fit, blocks, how in full_targets(fits):
        scaled = name == V3["name"]
        params = next((f["params"] for f in [*FULL.values(), V3] if f["name"] == name))
        for mode in modes:
            if scaled and mode == "default":
                (t2, a2), (t16, a16) = project_v3_default(fits, 2), project_v3_default(fits, 16)
            else:
                (t2, a2), (t16, a16) = project(fit, mode, blocks, 2, scaled), project(fit, mode, blocks, 16, scaled)
            out = fit[mode]["out_bytes"][0] * blocks + fit[mode]["out_bytes"][1]
            disk = fit[mode]["peak_disk_bytes"][0] * blocks + fit[mode]["peak_disk_bytes"][1]
            print(f"| {name} | {how} | {mode} | {a2} | {a16} | {_gib(out)} | {_gib(disk)} | {_gib(params * 2)} |")
            seconds = [None if math.isnan(t) else t for t in (t2, t16)]
            rows.append({"model": name, "mode": mode, "blocks_equivalent": blocks, "how": how,
                         "projected_s_2core": seconds[0], "arithmetic_2core": a2,
                         "projected_s_16core": seconds[1], "arithmetic_16core": a16,
                         "projected_out_bytes": out, "projected_peak_disk_bytes": disk, "bf16_bytes": params * 2})
    return rows


def report_measured(points: list[dict], fits: dict, modes: list[str]) -> None:
    print("\n## Measured")
    print("| arch | MoE blocks | mode | wall | stages (s) | peak RSS, largest process | peak RSS, process tree | "
          "peak private, largest process | peak private, process tree | output | peak work-folder disk |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        for mode, m in p["median"].items():
            st = ", ".join(f"{k} {v:.1f}" for k, v in m["stages"].items())
            print(f"| {p['arch']} | {p['blocks']} | {mode} | {m['wall']:.1f} s | {st} | {_gib(m['peak_rss_bytes'], 2)} | "
                  f"{_gib(m['peak_tree_rss_bytes'], 2)} | {_gib(m['peak_private_bytes'], 2)} | "
                  f"{_gib(m['peak_tree_private_bytes'], 2)} | {_gib(m['out_bytes'])} | {_gib(m['peak_disk_bytes'])} |")
    print("\n## Peak RSS and peak private memory against block count (target: flat, at most 4 GiB for every process)")
    for arch in fits:
        lo, hi = [p for p in points if p["arch"] == arch]
        for mode in lo["median"]:
            for what in ("rss", "private"):
                print(f"# {arch} {mode}: {against_blocks(lo, hi, mode, what)}")
    print("\n## Seconds per MoE block (difference between the two block counts / difference in blocks)")
    print("| arch | weights a block | mode | wall s/block (fixed s) | ratio to stock, per block | stages s/block |")
    print("|---|---|---|---|---|---|")
    for arch, fit in fits.items():
        for mode in modes:
            rate, fixed = fit[mode]["wall"]
            ratio = rate / fit["stock"]["wall"][0] if "stock" in fit and fit["stock"]["wall"][0] > 0 else float("nan")
            st = ", ".join(f"{k} {r:.2f}" for k, (r, _) in fit[mode]["stages"].items())
            print(f"| {arch} | {fit['block_weights'] / 1e6:.0f}M | {mode} | {rate:.2f} ({fixed:.1f}) | {ratio:.2f}x | {st} |")


def against_blocks(lo: dict, hi: dict, mode: str, what: str) -> str:
    """The largest process's peak ``what`` ("rss" or "private") at the two block counts, against 4 GiB."""
    a, b = (p["median"][mode][f"peak_{what}_bytes"] for p in (lo, hi))
    return (f"largest process, peak {'RSS' if what == 'rss' else 'private'} {_gib(a, 2)} at {lo['blocks']} blocks, "
            f"{_gib(b, 2)} at {hi['blocks']} ({b / a:.2f}x); {'within' if max(a, b) <= 4 * 2**30 else 'OVER'} 4 GiB")


def reproject(path: Path) -> int:
    """Fits and projections again from a result file's measured points (after a change to the
    projection's arithmetic); the points, and the commit that measured them, stay as they were."""
    data = json.loads(path.read_text())
    fits = {}
    for arch in dict.fromkeys(p["arch"] for p in data["points"]):
        lo, hi = sorted((p for p in data["points"] if p["arch"] == arch), key=lambda p: p["blocks"])
        fits[arch] = per_block(lo, hi)
    data["per_block"], data["projections"] = fits, projection_table(fits, data["modes"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    data["reprojected"] = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path.write_text(json.dumps(data, indent=1))
    print(f"# wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--blocks", nargs=2, type=int, metavar=("A", "B"),
                   help=f"MoE block counts for every arch (default per arch: {DEFAULT_BLOCKS})")
    p.add_argument("--modes", nargs="+", choices=("stock", "fast", "default"), default=["stock", "fast"],
                   help="pipelines to time (default: %(default)s; 'default' is slow)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per pipeline; medians (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the generated models in .cache/scale/")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "scale.json")
    p.add_argument("--label", default="", help="stored in the JSON, e.g. 'smoke run on a loaded machine'")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for the CPUs to be idle (shared machine)")
    p.add_argument("--reproject", action="store_true",
                   help="measure nothing: recompute the per-block fits and projections of --json from its points")
    args = p.parse_args()
    if args.reproject:
        return reproject(args.json)
    if args.blocks and (min(args.blocks) < 1 or args.blocks[0] == args.blocks[1]):
        raise SystemExit(f"--blocks {args.blocks[0]} {args.blocks[1]}: need two different counts >= 1")
    bench_convert.IDLE["wait_s"] = args.wait_idle
    tempfile.tempdir = tempfile.gettempdir()  # fix ours now: the children get TMPDIR=<work folder>, deleted after
    cache = ROOT / ".cache" / "scale"
    cache.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in load0)}; {os.cpu_count()} CPUs; modes {args.modes}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    def save(points: list[dict], **more) -> None:  # after every point, so a run cut short keeps what it measured
        args.json.write_text(json.dumps({
            "label": args.label, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(), "load_before": load0, "modes": args.modes, "repeats": args.repeats,
            "points": points, **more}, indent=1))

    points, fits = [], {}
    for arch in args.archs:
        lo, hi = sorted(args.blocks or DEFAULT_BLOCKS[arch])
        pair = []
        for n in (lo, hi):
            pair.append(bench_point(arch, n, args.modes, args.repeats, cache, args.keep))
            save(points + pair)
        points += pair
        fits[arch] = per_block(*pair)
    report_measured(points, fits, args.modes)
    proj = projection_table(fits, args.modes)
    load1 = os.getloadavg()
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in load1)}")
    save(points, load_after=load1, per_block=fits, projections=proj)
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
