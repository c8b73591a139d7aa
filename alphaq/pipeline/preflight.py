"""Before any heavy work: the disk a conversion needs, and about how long it takes.

`alphaq convert` prints this first (``--dry-run`` prints it and writes nothing) and stops with one
line when a filesystem cannot hold its peak need. Sizes come from the model's headers only (HF:
the safetensors headers; GGUF: its header), nothing is loaded.

Disk, per filesystem (the temporary files go in a hidden directory beside the output):

* the float GGUF the stages read: an HF checkpoint is converted to BF16 first (the *intermediate*,
  estimated: 2 bytes per matrix weight, 4 per other weight, plus the tokenizer); a GGUF input is
  read where it is;
* the output, at most: every quantised tensor in the largest type the plan may give it (candidates,
  fixed types and pins, after llama.cpp's shape fallback), the others as in the float model, the header
  and the plan keys; with ``--target-size`` the target, if smaller;
* the peak in the output's directory: llama.cpp's quantiser writes the output once and alphaq
  rewrites it once more with its keys (and, when splitting, once more as parts), so two copies of
  the output coexist; the intermediate is deleted as soon as the quantiser has read it, unless
  kept (``--keep-bf16``) or needed by the expert-groups writer (``--granularity expert``).

A BF16 intermediate kept by an interrupted run (alphaq.pipeline.resume), which this run reuses, is already on
disk: its bytes are not needed again, and its conversion takes no time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType

from alphaq.damage.run import WORKING_COPIES, CachedStages
from alphaq.allocate.plan import POLICY_DEFAULTS, TensorInfo, format_size, plan_pins, policy_type
from alphaq.allocate.quantise_cap import FLOOR_NS
from alphaq.gguf.qtypes import effective_type, llama_quantizes, resolve_type, tensor_bytes
from alphaq.model.weights import RECURRENT_ARCHS, REQUANTISABLE_TYPES
from alphaq.pipeline.speed_probe import MachineSpeed, machine_speed

REQUANTISABLE_NAMES = frozenset(t.name for t in REQUANTISABLE_TYPES)

# Seconds per transformer block for each stage, measured by scripts/bench_scale.py on
# Qwen3-30B-A3B's block shapes (4 blocks, random weights, 2-core CPU, --like Q3_K_M --no-cache; the
# value at 4 blocks / 4, so fixed costs are spread over the blocks): bench/scale-head-qwen3.json
# (code of f2fc327), except the uncapped quantise stage (bench/scale-default.json, older code; the
# default caps it, QUANTISE_WALL_PER_ESTIMATE). A model's estimate scales them by its quantisable
# weights per block over REFERENCE_WEIGHTS_PER_BLOCK. Update the table when a stage changes speed.
# experts 3 x 128 x 2048 x 768 + attention q, o 2 x 4096 x 2048 + k, v 2 x 512 x 2048
REFERENCE_WEIGHTS_PER_BLOCK = 622_854_144
# what one token reads of that block (8 of the 128 experts + attention): the damage stage's forward
# passes scale with it, not with the block's weights. Measured ms per block and token in the damage
# stage (bench/scale-head.json): 0.83 on Qwen3-30B-A3B shapes (56.6M read a block), 6.43 on
# Mixtral-8x7B's (394M), 1.38 on DeepSeek-V2-Lite's (84.7M): 14.7-16.3 ps per weight read. Scaling
# by a block's weights instead put Mixtral-8x7B's damage stage at 9.9 min for 2 blocks, measured 20.3
# (bench/scale-autocap-others.json).
REFERENCE_ACTIVE_PER_BLOCK = 8 * 3 * 2048 * 768 + 2 * 4096 * 2048 + 2 * 512 * 2048
STAGE_SECONDS_PER_BLOCK = {
    "float model": 23.4 / 4,  # llama.cpp's converter to BF16 (HF input only)
    "self text": 29.1 / 4,  # 16 sequences of 256 tokens sampled from the model
    "importance": 24.7 / 4,  # the importance matrix on that text
    "quantise": 576.4 / 4,  # llama.cpp's quantiser with the uncapped plan's (mostly IQ) types
    # --paper (every expert's alpha): the whole run minus the stock converter's time (102.0 - 28.2 s at 4 blocks)
    "spectral + quantise": (102.0 - 28.2) / 4,
    # --fast (16 sampled experts, bench/scale-fast-sample-qwen3.json, 836d0ad): 70.9 - 32.6 s at 4 blocks
    "spectral + quantise, sampled experts": (70.9 - 32.6) / 4,
}
# The damage stage from its parts in the same run (bench/scale-head-qwen3.json, 4 blocks: 30
# measurements on 16 windows of 256 tokens, every block measured): per measurement the fake
# quantisation (168.0 s / 30) and a forward pass over every block and token (410.1 s / (30 x 4
# blocks x 4096 tokens)), one reference pass (13.9 s / (4 x 4096)), and each tensor's weighted
# errors (40.3 s / 30).
DAMAGE_PARTS = {"fake_per_measurement": 168.0 / 30, "forward_per_measurement_block_token": 410.1 / (30 * 4 * 4096),
                "reference_per_block_token": 13.9 / (4 * 4096), "weighted_error_per_tensor": 40.3 / 30}
KINDS_PER_BLOCK, TENSORS_OUTSIDE_BLOCKS = 7, 2  # Qwen3-MoE: q, k, v, o, gate/up/down experts; embedding, output
# The quantise stage under --max-quantise-ns: wall seconds per (weight x the plan's estimated ns per
# weight x 1e-9), i.e. against the one-thread table estimate, on this 2-core machine. Qwen3-30B-A3B
# shapes, 2 blocks, 1.25G weights (bench/quantise-cap.json): 102.0 s at an estimated 146.2 ns, 68.0 s
# at 93.5 (and 247.6 s at the uncapped default's 371.1). The larger ratio of the two capped runs.
QUANTISE_WALL_PER_ESTIMATE = max(102.0 / (146.2e-9 * 1_250_984_608), 68.0 / (93.5e-9 * 1_250_984_608))
# private memory of the forward stages besides the weight being fake-quantised: Python, numpy,
# llama.cpp's compute buffers for a 256-token window (bench/mapped-memory.json: 0.55 GB peak anonymous
# at Qwen3-30B-A3B shapes with a 0.40 GB expert tensor copied on write)
PRIVATE_OVERHEAD_BYTES = 200 << 20
# a Q8_0 working copy of a 16-bit model: 34 bytes per 32 weights instead of 64 (norms stay F32)
Q8_0_BYTES_PER_FLOAT_BYTE = 34 / 64
# llama.cpp's quantiser writing that copy, reading and writing included, on this 2-core machine:
# 14.4 s for 2.50 GB of BF16 at Qwen3-30B-A3B shapes (bench/working-copy-memory.json)
Q8_0_SECONDS_PER_WEIGHT = 14.4 / (2_501_969_312 / 2)
WORKING_COPY_CHOICES = ("auto", *WORKING_COPIES)  # what --working-copy takes: auto picks one of them
PLAN_KEY_BYTES_PER_ITEM = 1024  # the alphaq.plan key holds every item's costs as JSON
SPLIT_PART_OVERHEAD = 256  # per part: GGUF header, split keys, padding


@dataclass(frozen=True)
class Preflight:
    n_blocks: int
    weights_per_block: int
    float_bytes: int  # the float GGUF the stages read (HF input: an estimate of the intermediate)
    intermediate: bool  # the float GGUF is written by this run (HF input)
    output_bytes: int  # upper bound of the output, all parts
    needs: dict[Path, int]  # a directory per filesystem -> peak bytes needed there
    free: dict[Path, int]
    speed: MachineSpeed  # this machine against the benchmark's: stage_seconds are already divided by it
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reused: Path | None = None  # the intermediate an interrupted run kept, reused
    forward: bool = False  # the run has forward stages (the default mode), which map the float model
    largest_weight_bytes: int = 0  # the largest float weight: private while it is fake-quantised
    ram_available: int | None = None  # MemAvailable, where the OS says
    working_copy: str = "float"  # what the forward stages run: the float model, or a Q8_0 copy of it
    recurrent: bool = False  # the model has recurrent blocks, whose forward rate no benchmark measured
    source_type: str | None = None  # a quantised GGUF source's weight type (Q8_0, --allow-requantize)
    # what earlier runs cached for the forward stages (their time is left out); None: not known
    # before converting (an HF checkpoint this machine has not converted), or --no-cache
    cached: CachedStages | None = None

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())

    def shortfalls(self) -> list[str]:
        return [f"{d} has {format_size(self.free[d])} free; the conversion needs up to {format_size(n)} there"
                for d, n in self.needs.items() if self.free[d] < n]

    def format(self, keep_bf16: Path | None, parts: str = "") -> str:
        kept = (f"kept at {keep_bf16}" if keep_bf16 else "deleted once quantised; --keep-bf16 PATH keeps it")
        lines = [f"pre-flight  {self.n_blocks} blocks, {self.weights_per_block:,} quantisable weights per block",
                 (f"  disk      BF16 intermediate {format_size(self.float_bytes)}, kept by an interrupted run "
                  f"and reused: {self.reused} ({kept})" if self.reused else
                  f"  disk      BF16 intermediate about {format_size(self.float_bytes)} ({kept})" if self.intermediate
                  else f"  disk      {self.source_type or 'float'} model {format_size(self.float_bytes)} (read in place)"),
                 f"            output at most {format_size(self.output_bytes)}{parts}"]
        for d, n in self.needs.items():
            lines.append(f"            peak need in {d}: {format_size(n)} (temporary files included); "
                         f"free {format_size(self.free[d])}")
        if self.forward:
            lines.append(self._memory_line())
        stages = ", ".join(f"{k} {_duration(v)}" for k, v in self.stage_seconds.items())
        lines.append(f"  time      about {_duration(self.seconds)} at the benchmark's rates (bench/scale-head-qwen3.json) "
                     f"scaled to {self.speed.describe()}: {stages}")
        if self.forward and self.cached is not None and self.cached.describe():
            lines.append(f"            left out, as an earlier run cached it: {self.cached.describe()}")
        if self.recurrent and self.forward:
            lines.append("            (the rates are an attention model's; how this model's recurrent blocks change the "
                         "forward stages' time no benchmark here has measured)")
        return "\n".join(lines)


    def _memory_line(self) -> str:
        """RAM for the forward stages: the mapped model is page cache (alphaq.runtime.mapped); private
        memory is the one weight copied while it is measured plus llama.cpp's compute buffers."""
        q8 = self.working_copy == "q8_0"
        what, mapped = forward_model(self.float_bytes, self.working_copy, self.source_type)
        private = (working_copy_bytes(self.largest_weight_bytes) if q8 else self.largest_weight_bytes)
        private += PRIVATE_OVERHEAD_BYTES
        what = (f"{what} (--working-copy; about {format_size(mapped)}, written beside the output and deleted "
                "after the forward stages)" if q8 else f"{what} ({format_size(mapped)})")
        if self.ram_available is None:
            fits = ""
        elif self.ram_available >= mapped + private:
            fits = f"; available RAM {format_size(self.ram_available)} holds it"
        else:
            fits = (f"; available RAM {format_size(self.ram_available)} does not hold it: every forward pass "
                    "reads the missing part from disk again, much slower (bench/mapped-memory.json)")
        return (f"  memory    the forward stages memory-map {what}{fits}; private memory about "
                f"{format_size(private)} (the largest weight, copied while it is measured, and compute buffers)")


def forward_model(float_bytes: int, working_copy: str | None, source_type: str | None = None) -> tuple[str, int]:
    """The model the forward stages run, in words, and its bytes: the float model or its Q8_0 copy
    (``source_type``: a quantised source, which runs itself)."""
    if working_copy == "q8_0":
        return "a Q8_0 working copy of the float model", working_copy_bytes(float_bytes)
    return f"the {source_type or 'float'} model", float_bytes


def working_copy_bytes(float_bytes: int) -> int:
    """About the bytes of a Q8_0 copy of a 16-bit model of ``float_bytes`` (an F32 model's is smaller)."""
    return int(float_bytes * Q8_0_BYTES_PER_FLOAT_BYTE)


def choose_working_copy(choice: str, float_bytes: int, private_bytes: int, ram: int | None,
                        source_type: str | None = None) -> str:
    """--working-copy auto: the float model when it fits in available RAM with the stages' private
    memory (or when the OS does not say), else a Q8_0 copy: mapped, a model larger than RAM is read
    from disk again on every forward pass (measured: decode steps 13x slower under a limit of half
    the model, bench/mapped-memory.json), and the copy holds half the bytes. A Q8_0 source
    (``source_type``) is its own copy, whatever was asked."""
    if source_type is not None:
        return "float"
    if choice != "auto":
        return choice
    return "q8_0" if ram is not None and float_bytes + private_bytes > ram else "float"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def stage_seconds(cfg, source: str, n_blocks: int, weights_per_block: int,
                  active_per_block: int | None = None) -> dict[str, float]:
    """The stage-rate table applied to this model and these settings (alphaq.pipeline.convert.ConvertConfig).
    ``active_per_block``: the weights one token reads in a block (block_weights); None
    takes the reference model's share of its weights."""
    weight_ratio = weights_per_block / REFERENCE_WEIGHTS_PER_BLOCK
    scale = n_blocks * weight_ratio
    read_ratio = weight_ratio if active_per_block is None else active_per_block / REFERENCE_ACTIVE_PER_BLOCK
    rate = STAGE_SECONDS_PER_BLOCK
    out = {"float model": rate["float model"] * scale} if source == "hf" else {}
    if cfg.plan.noise != "damage":
        # (a model with no more experts per tensor than the sample is analysed whole; at Mixtral-8x7B's
        # shapes, with --fast's 256-block FARMS cap, 17.0 ns a weight against this rate's 15.4:
        # bench/scale-fast-farms-mixtral.json)
        sampled = cfg.spectral.max_experts is not None
        out["spectral + quantise"] = rate["spectral + quantise" + (", sampled experts" if sampled else "")] * scale
        return out
    out["self text"] = rate["self text"] * scale
    if cfg.imatrix is None:
        out["importance"] = rate["importance"] * scale
    damage = damage_seconds(cfg.damage, n_blocks, cfg.selftext.n_ctx, weight_ratio, read_ratio)
    if cfg.damage.method == "direct":  # one measurement per candidate type instead of one per tensor
        damage *= len(cfg.plan.types)
    out["damage"] = damage
    out["quantise"] = rate["quantise"] * scale
    cap = cfg.plan.max_quantise_ns
    if cap is None and cfg.auto_quantise_cap:  # the auto cap is at least FLOOR_NS; more below ~2.5 bpw, where
        cap = FLOOR_NS  # llama.cpp's own mixes are IQ types (alphaq.allocate.quantise_cap): an underestimate there
    if cap is not None:  # the cap bounds the quantiser's time from above
        capped = QUANTISE_WALL_PER_ESTIMATE * cap * 1e-9 * n_blocks * weights_per_block
        out["quantise"] = min(out["quantise"], capped)
    return out


def damage_seconds(damage_cfg, n_blocks: int, n_ctx: int, weight_ratio: float = 1.0, read_ratio: float = 1.0) -> float:
    """The damage stage for the reference model's kinds of tensor: measured tensors (every block, or
    the anchors) x (fake quantisation + a forward pass over n_blocks and the windows' tokens), one
    reference pass, and every tensor's weighted errors. The forward passes scale by ``read_ratio``
    (weights a token reads a block, against the reference's), the rest by ``weight_ratio``."""
    anchors = damage_cfg.anchors
    blocks_measured = n_blocks if anchors is None else min(anchors, n_blocks)
    tokens = damage_cfg.windows_when(blocks_measured == n_blocks) * n_ctx
    measured = KINDS_PER_BLOCK * blocks_measured + TENSORS_OUTSIDE_BLOCKS
    p = DAMAGE_PARTS
    forward = (measured * p["forward_per_measurement_block_token"] + p["reference_per_block_token"]) * n_blocks * tokens
    per_weight = (measured * p["fake_per_measurement"]
                  + (KINDS_PER_BLOCK * n_blocks + TENSORS_OUTSIDE_BLOCKS) * p["weighted_error_per_tensor"])
    return forward * read_ratio + per_weight * weight_ratio


def block_weights(model) -> tuple[int, int]:
    """(quantisable weights, weights one token reads) per block of ``model``
    (alphaq.model.weights.ModelWeights). A token reads every matrix and the routed experts' slices
    at experts_used of their count; all of them when the model does not say how many it uses."""
    blocks = [m for m in model.matrices() if m.block is not None]
    slices = Counter(m.tensor for m in blocks if m.expert is not None)
    used = model.experts_used
    read = sum(m.params * (min(used, slices[m.tensor]) / slices[m.tensor] if used and m.expert is not None else 1)
               for m in blocks)
    n = max(1, model.n_blocks)
    return sum(m.params for m in blocks) // n, int(read) // n


def _largest_bytes(name: str, shape: tuple[int, ...], types: list[GGMLQuantizationType]) -> int:
    return max(tensor_bytes(effective_type(t, shape[-1]), shape) for t in types)


def plan_types(cfg) -> list[GGMLQuantizationType]:
    """Every type the plan may give a tensor: candidates, fixed types and pins."""
    p = cfg.plan
    pins = [p.output_tensor_type, p.token_embedding_type, *(t for _, t in p.tensor_types)]
    policy = [policy_type(p, name).name for name in POLICY_DEFAULTS]
    return [resolve_type(t) for t in (*p.types, *policy, *pins) if t]


@dataclass(frozen=True)
class Sizes:
    float_bytes: int  # the float GGUF (HF input: an estimate of the converter's BF16 output)
    output_bound: int  # the output at most, without the plan keys
    items: int  # plan items (tensors; expert slices count one each)
    tensors: int  # tensors of the output, at most


def gguf_sizes(path: Path, cfg) -> Sizes:
    """Sizes of a float GGUF (any part of a split one)."""
    from alphaq.gguf.io import header_bytes, model_bytes, read_tensors

    types = plan_types(cfg)
    out, items = header_bytes(path), 0
    records = read_tensors(path)
    for t in records:
        if llama_quantizes(t.name, t.shape):
            out += _largest_bytes(t.name, t.shape, types)
            items += t.shape[0] if len(t.shape) == 3 else 1
        else:
            out += t.n_bytes
        out += cfg.plan.alignment
    return Sizes(model_bytes(path), out, items, len(records))


def hf_sizes(model, cfg) -> Sizes:
    """Sizes of an HF checkpoint (alphaq.model.weights.ModelWeights: its matrices are the ones llama.cpp
    quantises)."""
    types = plan_types(cfg)
    mats = model.matrices()
    matrix_weights = sum(m.params for m in mats)
    n_stored, stored_weights = _safetensors_weights(model.path)
    other = max(0, stored_weights - matrix_weights)
    header = sum(p.stat().st_size for p in model.path.glob("tokenizer*") if p.is_file()) + (1 << 20)
    out = header + 4 * other + sum(_largest_bytes(m.tensor, (m.rows, m.cols), types) for m in mats)
    n_tensors = n_stored + len({m.tensor for m in mats})  # every stored tensor, and the merged ones
    return Sizes(header + 2 * matrix_weights + 4 * other, out + n_tensors * cfg.plan.alignment, len(mats), n_tensors)


def _safetensors_weights(path: Path) -> tuple[int, int]:
    """(tensors, weights) in the safetensors files of the checkpoint (from their headers)."""
    index = path / "model.safetensors.index.json"
    files = (sorted({path / s for s in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else [path / "model.safetensors"])
    tensors = weights = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
        tensors += len(shapes)
        weights += sum(math.prod(s) for s in shapes)
    return tensors, weights


def _filesystem_dirs(dirs: list[Path]) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for d in dirs:
        out.setdefault(os.stat(d).st_dev, d)
    return out


def damage_names(tensors: list[TensorInfo], plan_cfg) -> list[str]:
    """The tensors whose damage the forward stages measure: every one llama.cpp quantises that no
    pin fixes, in the float model's order."""
    pinned = plan_pins(tensors, plan_cfg).types
    return [t.name for t in tensors if llama_quantizes(t.name, t.shape) and t.name not in pinned]


def _float_tensors(cfg, model, reused: Path | None) -> tuple[str, list[TensorInfo]] | None:
    """(fingerprint, tensors) of the float model the forward stages will read, where known before
    converting: a GGUF input, a kept intermediate, or a checkpoint converted here before."""
    from alphaq.files import fingerprint
    from alphaq.gguf.io import read_tensors

    path = cfg.model if model.source == "gguf" else reused
    if path is not None:
        return fingerprint(path), [TensorInfo(t.name, t.shape, t.type.name) for t in read_tensors(path)]
    from alphaq.model.weights import converter_mtp_args
    from alphaq.pipeline.resume import noted_float

    noted = noted_float(cfg.model, converter_mtp_args(cfg.model))
    return None if noted is None else (noted[0], [TensorInfo(*t) for t in noted[1]])


def cached_work(cfg, model, reused: Path | None, working: str, user_imatrix=None) -> CachedStages | None:
    """What the forward stages of this run would take from the cache (None: cannot tell yet)."""
    from alphaq.damage.run import cached_stages

    known = _float_tensors(cfg, model, reused) if cfg.use_cache and cfg.plan.noise == "damage" else None
    if known is None:
        return None
    key, tensors = known
    return cached_stages(key, damage_names(tensors, cfg.plan), cfg.plan.candidates, text_cfg=cfg.selftext,
                         cfg=cfg.damage, user_imatrix=user_imatrix, per_expert=cfg.plan.granularity == "expert",
                         working_copy=working, weight_filter=(cfg.include_weights, cfg.exclude_weights))


def _without_cached(seconds: dict[str, float], cached: CachedStages | None) -> dict[str, float]:
    """The stage times less what the cache holds (a working copy is made only for a stage that runs)."""
    if cached is None:
        return seconds
    out = dict(seconds)
    for stage, hit in (("self text", cached.self_text), ("importance", cached.importance)):
        if hit and stage in out:
            out[stage] = 0.0
    if "damage" in out:
        out["damage"] *= cached.damage_left
    if "working copy" in out and all(out.get(k, 0.0) == 0.0 for k in ("self text", "importance", "damage")):
        out["working copy"] = 0.0
    return out


def preflight(cfg, model, reused: Path | None = None, user_imatrix=None) -> Preflight:
    """Disk and time for converting ``model`` (alphaq.model.weights.ModelWeights of cfg.model) with
    ``cfg`` (alphaq.pipeline.convert.ConvertConfig); ``reused``: the BF16 intermediate of an interrupted run,
    which this one reuses; ``user_imatrix``: --imatrix's matrix (it keys the cached damage)."""
    sizes = hf_sizes(model, cfg) if model.source == "hf" else gguf_sizes(model.path, cfg)
    float_bytes = reused.stat().st_size if reused else sizes.float_bytes
    out = sizes.output_bound + PLAN_KEY_BYTES_PER_ITEM * sizes.items + (1 << 16)
    out += sum(o.gguf_bytes for o in cfg.kv_overrides)  # --override-kv's keys
    if cfg.plan.budget_mode == "size" and cfg.like is None:
        out = min(out, int(cfg.plan.budget))
    out += SPLIT_PART_OVERHEAD * max_parts(cfg, sizes.tensors, out)
    out_dir = cfg.output.parent
    dirs = _filesystem_dirs([out_dir] + ([cfg.keep_bf16.parent] if cfg.keep_bf16 else []))
    needs = {d: 0 for d in dirs.values()}
    intermediate = model.source == "hf"
    float_dir = dirs[os.stat(cfg.keep_bf16.parent if cfg.keep_bf16 else out_dir).st_dev] if intermediate else None
    out_fs = dirs[os.stat(out_dir).st_dev]
    float_stays = cfg.keep_bf16 is not None or cfg.plan.granularity == "expert"
    if float_dir == out_fs:
        needs[out_fs] = float_bytes + 2 * out if float_stays else max(float_bytes + out, 2 * out)
    else:
        needs[out_fs] = 2 * out
        if float_dir is not None:
            needs[float_dir] = float_bytes
    if reused is not None:  # already on disk
        needs[float_dir] = max(0, needs[float_dir] - float_bytes)
    forward, largest, ram = cfg.plan.noise == "damage", _largest_weight_bytes(model), ram_available()
    source_type = next((m.dtype for m in model.matrices() if m.dtype in REQUANTISABLE_NAMES), None) \
        if model.source == "gguf" else None
    working = (choose_working_copy(cfg.working_copy, float_bytes, largest + PRIVATE_OVERHEAD_BYTES, ram, source_type)
               if forward else "float")
    if working == "q8_0":  # the copy sits beside the output while the float model is still there
        float_there = float_bytes if float_dir == out_fs and reused is None else 0
        needs[out_fs] = max(needs[out_fs], float_there + working_copy_bytes(float_bytes))
    per_block, read_per_block = block_weights(model)
    seconds = stage_seconds(cfg, model.source, model.n_blocks, per_block, read_per_block)
    if reused is not None:
        seconds.pop("float model", None)
    if working == "q8_0":  # written before the forward stages, after the float model
        copy = {"working copy": Q8_0_SECONDS_PER_WEIGHT * sum(m.params for m in model.matrices())}
        seconds = {k: v for k, v in seconds.items() if k == "float model"} | copy | {
            k: v for k, v in seconds.items() if k != "float model"}
    cached = cached_work(cfg, model, reused, working, user_imatrix) if forward else None
    seconds = _without_cached(seconds, cached)
    speed = machine_speed()
    seconds = {k: v / speed.factor(k) for k, v in seconds.items()}
    return Preflight(model.n_blocks, per_block, float_bytes, intermediate, out, needs,
                     {d: shutil.disk_usage(d).free for d in needs}, speed, seconds, reused, forward=forward,
                     largest_weight_bytes=largest, ram_available=ram, working_copy=working,
                     recurrent=model.model_arch in RECURRENT_ARCHS, source_type=source_type, cached=cached)


def _largest_weight_bytes(model) -> int:
    """The largest weight tensor in BF16 (an expert tensor holds all its experts' slices)."""
    per_tensor: dict[str, int] = {}
    for m in model.matrices():
        per_tensor[m.tensor] = per_tensor.get(m.tensor, 0) + m.params
    return 2 * max(per_tensor.values(), default=0)


def ram_available() -> int | None:
    """The kernel's estimate of memory available without swapping (/proc/meminfo MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def max_parts(cfg, n_tensors: int, out_bytes: int) -> int:
    """At most this many parts when the output is split (1 when it is not)."""
    if cfg.keep_split:  # the GGUF input's (an HF input is refused with --keep-split)
        from alphaq.gguf.io import shard_paths

        return len(shard_paths(cfg.model)) if Path(cfg.model).suffix.lower() == ".gguf" else 1
    if cfg.split_max_tensors:
        return max(1, -(-n_tensors // cfg.split_max_tensors))
    if cfg.split_max_size:
        return max(1, min(n_tensors, 2 * -(-out_bytes // cfg.split_max_size) + 1))
    return 1
