"""The main job: HF checkpoint or float GGUF -> mixed-type GGUF, with no external data.

Default (damage):
    input ──(llama.cpp converter, HF only)──> float GGUF ──sample──> the model's own text
          ──> importance matrix ──> damage per tensor and type ──knapsack──> types
          ──llama_model_quantize(overrides, importance)──> quantised GGUF ──+alphaq.* keys──> output
Paper / fast (no forward pass at all):
    float GGUF ──spectral──> alphas ──plan──> types ──llama_model_quantize(overrides)──> ...

Everything is written under temporary names in a hidden directory beside the output and renamed
at the very end, so a failed or interrupted run leaves no output behind, and nothing existing is
replaced without ``force``. The one thing a failed run keeps is a complete BF16 intermediate, which
re-running the same command reuses (alphaq.pipeline.resume); the later stages' results are cached.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from alphaq import __version__
from alphaq.spectral.analyze import Cancelled, Throttle, analyze_model
from alphaq.errors import InputError, InternalError
from alphaq.gguf.expert import PATCHED_RUNTIME, STOCK_RUNTIME, ExpertGroups, group_layouts, group_name, write_expert_gguf
from alphaq.gguf.io import (check_finite, check_gguf, copy_with_metadata, first_shard, header_bytes, model_bytes,
                            quantised_weights, read_tensors, shard_paths, warn_requantised)
from alphaq.gguf.split import SplitSpec, part_names, split_gguf, split_gguf_like
from alphaq import memory
from alphaq.pipeline.preflight import (SPLIT_PART_OVERHEAD, WORKING_COPY_CHOICES, Preflight, damage_names, max_parts,
                                       preflight)
from alphaq.damage import DamageConfig
from alphaq.allocate.feasibility import check_budget, matrix_tensors, quantised_tensors
from alphaq.files import check_plots_dir, input_files
from alphaq.allocate.overrides import KVOverride, Pins
from alphaq.allocate.plan import Plan, PlanConfig, TensorInfo, format_size, make_plan, plan_pins
from alphaq.allocate.quantise_cap import AutoCap, auto_capped_plan
from alphaq.gguf.qtypes import padded
from alphaq.pipeline.resume import Workspace, note_float, pause_for_test
from alphaq.gguf.quantize import ALL_MIXES, mix_ftype, quantize_gguf
from alphaq.gguf.stock import stock_size, stock_sizes
from alphaq.selftext import SelfTextConfig
from alphaq.spectral.alpha import SpectralConfig, farms_cap
from alphaq.model.weights import (REQUANTISABLE_TYPES, converter_mtp_args, mtp_blocks, mtp_layers_left_out,
                                  open_model)

log = logging.getLogger(__name__)

# What the plan allows on top of the float GGUF's header for the header llama_model_quantize
# writes into alphaq's file: general.quantization_version and general.file_type where absent (at
# most ~90 bytes; the float header is otherwise no smaller: ggml only drops dimensions). On alphaq's
# side of a size budget only: a stock mix's size (--like) is exact (quantised_header_bytes).
_QUANT_KV_MARGIN = 256


@dataclass(frozen=True)
class ConvertConfig:
    model: Path  # HF checkpoint directory or F32/F16/BF16 GGUF (Q8_0 with allow_requantize)
    output: Path  # the .gguf to write; plan JSON and tensor-type file go next to it
    plan: PlanConfig = field(default_factory=PlanConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    force: bool = False  # replace existing outputs
    nthread: int = 0  # quantiser threads; 0 = all cores
    cache_dir: Path | None = None  # spectral cache; None = default
    use_cache: bool = True
    compare_stock: bool = True  # size of llama.cpp's stock mixes for the summary (dry runs)
    progress: bool = True
    # the default path (plan.noise == "damage"): the model's own text, its importance matrix and
    # the damage measured on it
    selftext: SelfTextConfig = field(default_factory=SelfTextConfig)
    damage: DamageConfig = field(default_factory=DamageConfig)
    imatrix: Path | None = None  # a llama.cpp importance file to use instead of the self-made one
    like: str | None = None  # budget = the file size of this llama.cpp mix for this model
    plots: Path | None = None  # write the figures of where the bits went here (alphaq.plots)
    # llama-quantize's --override-kv: written into the output's metadata by llama.cpp's quantiser
    kv_overrides: tuple[KVOverride, ...] = ()
    # output in parts, as llama-gguf-split --split-max-size / --split-max-tensors (alphaq.gguf.split)
    split_max_size: int | None = None  # bytes per part's tensor data at most
    split_max_tensors: int | None = None  # tensors per part at most
    keep_bf16: Path | None = None  # keep the float GGUF made from an HF checkpoint here
    dry_run: bool = False  # pre-flight, stages and plan; write nothing (no figures either)
    resume: bool = True  # reuse a BF16 intermediate kept by an interrupted run (alphaq.pipeline.resume)
    # what the forward stages run (default mode): "float" the float model, memory-mapped; "q8_0" a
    # Q8_0 copy (half the bytes, as llama-imatrix users do); "auto" q8_0 only when the float model
    # does not fit in available RAM (alphaq.pipeline.preflight.choose_working_copy)
    working_copy: str = "auto"
    # the default (damage) mode caps llama.cpp's quantiser time unless plan.max_quantise_ns is set
    # (alphaq.allocate.quantise_cap); False: no cap unless plan.max_quantise_ns (--max-quantise-ns none)
    auto_quantise_cap: bool = True
    # llama-quantize's --allow-requantize: take a Q8_0 GGUF as the source (the only quantised type
    # alphaq reads: alphaq.model.weights.REQUANTISABLE_TYPES)
    allow_requantize: bool = False
    # the --tensor-type-file inputs the plan's pins were read from: never written over by an output
    pin_files: tuple[Path, ...] = ()
    # llama-quantize's --keep-split: the output in the parts of the split GGUF input, each tensor in
    # the part that holds it there (alphaq.gguf.split.split_gguf_like)
    keep_split: bool = False
    # llama-quantize's --max-buffer-size, in MiB: rows of one tensor its quantiser holds at once;
    # None: alphaq's slabs of 512 MiB (alphaq.gguf.quantize.QUANTISER_BUFFER_BYTES)
    max_buffer_size: int | None = None
    # llama-quantize's --include-weights / --exclude-weights: the tensors (by name substring) whose
    # importance vectors are used; the others are quantised, and their damage costed, without one
    # (alphaq.importance.imatrix_file.select_weights)
    include_weights: tuple[str, ...] = ()
    exclude_weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    plan_json: Path
    tensor_type_file: Path | None
    plan: Plan
    file_bytes: int
    tensor_counts: dict[str, int]  # written type -> number of quantised tensors
    tokenizer_fallback: str | None
    stock_sizes: dict[str, int] = field(default_factory=dict)  # mix -> its file's bytes (stock_size)
    runtime: str = STOCK_RUNTIME  # what runs the file: stock llama.cpp, or the patched one
    n_grouped: int = 0  # merged expert tensors stored as type groups (expert granularity)
    imatrix_file: Path | None = None  # the importance matrix used, saved in llama.cpp's format
    imatrix_source: str | None = None  # "self" (the model's own text) or the user's file
    # (weights whose importance vector was used, weights in the matrix) under --include-weights /
    # --exclude-weights; None: every vector was used
    imatrix_used: tuple[int, int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    like: tuple[str, int] | None = None  # (mix, its size) when the budget was given by name
    float_bytes: int = 0  # size of the float GGUF the stages read (all its parts)
    plots: tuple[Path, ...] = ()  # the figures written (convert --plots)
    warnings: tuple[str, ...] = ()  # every WARNING logged during the run, repeated in the summary
    parts: tuple[Path, ...] = ()  # the output's parts when split (output is the first)
    kept_float: Path | None = None  # --keep-bf16
    dry_run: bool = False  # nothing written: file_bytes and tensor_counts are the plan's
    preflight: Preflight | None = None
    reused: tuple[str, ...] = ()  # stages whose results an earlier run left (intermediate, caches)
    damage_note: str | None = None  # how the damage table was obtained (default mode)
    working_copy: str | None = None  # what the forward stages ran: "float" or "q8_0" (default mode)
    source_type: str | None = None  # a quantised GGUF source's weight type (Q8_0, --allow-requantize)
    quantise_cap: AutoCap | None = None  # the default mode's cap on the quantiser's time, when it applied
    peak_private: dict[str, int] = field(default_factory=dict)  # stage -> this process's peak private bytes


def side_paths(output: Path) -> tuple[Path, Path]:
    stem = output.name[:-5] if output.name.endswith(".gguf") else output.name
    return output.with_name(stem + ".plan.json"), output.with_name(stem + ".tensor-types.txt")


def imatrix_path(output: Path) -> Path:
    """Where the importance matrix goes: beside the output, in llama.cpp's GGUF imatrix format."""
    stem = output.name[:-5] if output.name.endswith(".gguf") else output.name
    return output.with_name(stem + ".imatrix.gguf")


_PART_NAME = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def existing_parts(output: Path) -> list[Path]:
    """Files named as parts of a split ``output`` (OUT-%05d-of-%05d.gguf, any count)."""
    stem = output.name.removesuffix(".gguf")
    return sorted(p for p in output.parent.glob(glob.escape(stem) + "-*-of-*.gguf")
                  if _PART_NAME.fullmatch(p.name[len(stem):]))


def check_output(output: Path, force: bool, granularity: str, with_imatrix: bool = False, split: bool = False) -> None:
    if output.suffix != ".gguf":
        raise InputError(f"output {output} must end in .gguf")
    if not output.parent.is_dir():
        raise InputError(f"output directory {output.parent} does not exist")
    plan_json, tt_file = side_paths(output)
    targets = (existing_parts(output) if split else [output]) + [plan_json]
    targets += [tt_file] if granularity == "tensor" else []
    targets += [imatrix_path(output)] if with_imatrix else []
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")


class StagedPlots:
    """--plots DIR: the figures rendered into a hidden directory inside DIR (created, with any
    missing parents), renamed into DIR beside the other outputs by _publish. If the run fails,
    nothing is left behind, not even a DIR that this run created."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.created = [p for p in (*reversed(out_dir.absolute().parents), out_dir.absolute()) if not p.exists()]
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=".alphaq-plots-", dir=out_dir))
        self.files: list[Path] = []

    def render(self, plan: Plan, stats) -> None:
        from alphaq.plots import write_convert_plots

        self.files = write_convert_plots(plan, stats, self.stage)

    def moves(self) -> list[tuple[Path, Path]]:
        return [(p, self.out_dir / p.name) for p in self.files]

    def close(self, published: bool) -> None:
        for p in self.stage.glob("*"):
            p.unlink()
        self.stage.rmdir()
        if not published:
            for d in reversed(self.created):
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()


def check_no_mtp(path: Path, tensors) -> None:
    """The damage mode measures every tensor through llama.cpp's main graph, which never reads a
    NextN (multi-token prediction) layer: a float GGUF that holds one (``tensors``, its records) is
    refused before any work."""
    blocks = mtp_blocks(t.name for t in tensors)
    if blocks:
        raise InputError(
            f"{path} holds NextN (multi-token prediction) layer(s) in block(s) {', '.join(map(str, blocks))}, which "
            "llama.cpp's main graph never reads, so the default (damage) mode cannot measure them; give alphaq the HF "
            "checkpoint (it converts without them, as llama.cpp's converter --no-mtp does), convert with --no-mtp, "
            "or use --fast / --paper")


def check_source_gguf(path: Path, tensors, allow_requantize: bool) -> None:
    """A GGUF source holds float weights, or Q8_0 ones with --allow-requantize: llama-quantize's
    rule, which refuses to requantise unless told to."""
    quantised = quantised_weights(tensors)
    for t in quantised:
        if t.type not in REQUANTISABLE_TYPES:
            raise InputError(f"{path} is already quantised ({t.name} is {t.type.name}); alphaq needs an HF "
                             "checkpoint, an F32/F16/BF16 GGUF, or a Q8_0 one with --allow-requantize")
        if not allow_requantize:
            raise InputError(f"{path} is already quantised ({t.name} is {t.type.name}); requantising is off unless "
                             "asked for, as in llama-quantize: add --allow-requantize (the output inherits "
                             "Q8_0's rounding), or give the HF checkpoint or an F32/F16/BF16 GGUF")
    if quantised:
        warn_requantised(path, quantised[0].type.name)  # once a run


def tensor_infos(path: Path) -> list[TensorInfo]:
    return [TensorInfo(t.name, t.shape, t.type.name) for t in read_tensors(path)]


def alphaq_metadata(plan: Plan, cfg: ConvertConfig, tokenizer_fallback: str | None) -> dict:
    p = cfg.plan
    meta = {
        "alphaq.version": (__version__, GGUFValueType.STRING),
        "alphaq.budget_mode": (p.budget_mode, GGUFValueType.STRING),
        "alphaq.budget": (float(p.budget), GGUFValueType.FLOAT64),
        "alphaq.gamma": (float(plan.settings["gamma"]), GGUFValueType.FLOAT64),
        "alphaq.types": (",".join(p.types), GGUFValueType.STRING),
        "alphaq.granularity": (p.granularity, GGUFValueType.STRING),
        "alphaq.scope": (p.scope, GGUFValueType.STRING),
        "alphaq.noise": (p.noise, GGUFValueType.STRING),
        "alphaq.plan": (plan.to_json(), GGUFValueType.STRING),
    }
    if tokenizer_fallback:
        meta["alphaq.tokenizer_fallback"] = (tokenizer_fallback, GGUFValueType.STRING)
    return meta


def metadata_bytes(meta: dict) -> int:
    """Serialised size of extra string/float key-values in GGUF v3."""
    n = 0
    for key, (value, vtype) in meta.items():
        n += 8 + len(key.encode()) + 4
        n += 8 + len(str(value).encode()) if vtype == GGUFValueType.STRING else 8
    return n


def _noise_table(float_gguf: Path, stats, tensors, cfg: ConvertConfig):
    """Measured noise model: ggml quantise/dequantise MSE per item and candidate (data-free)."""
    if cfg.plan.noise != "measured":
        return None
    from alphaq.allocate.costs import measure_noise
    from alphaq.allocate.plan import measurement_requests

    with open_model(float_gguf) as weights:
        return measure_noise(weights.matrices(), measurement_requests(stats, tensors, cfg.plan),
                             max_rows=cfg.plan.mse_rows, progress=cfg.progress)


def _plan_with_header(stats, tensors, cfg: ConvertConfig, base_header: int, tokenizer_fallback,
                      noise_table, damage=None) -> Plan:
    """Solve; for --target-size, re-solve once with the exact size of the alphaq keys."""
    base_header += _QUANT_KV_MARGIN + sum(o.gguf_bytes for o in cfg.kv_overrides)
    plan = make_plan(stats, tensors, cfg.plan, noise_table=noise_table, damage=damage,
                     fixed_bytes=padded(base_header, cfg.plan.alignment))
    if cfg.plan.budget_mode != "size":
        return plan
    extra = metadata_bytes(alphaq_metadata(plan, cfg, tokenizer_fallback))
    # a split output: every further part has its own header
    extra += SPLIT_PART_OVERHEAD * (max_parts(cfg, len(tensors), int(cfg.plan.budget)) - 1)
    return make_plan(stats, tensors, cfg.plan, noise_table=noise_table, damage=damage,
                     fixed_bytes=padded(base_header + extra + 4096, cfg.plan.alignment))


def auto_cap_applies(cfg: ConvertConfig) -> bool:
    """The default mode caps the quantiser's time by itself unless a cap is given or refused."""
    return cfg.auto_quantise_cap and cfg.plan.noise == "damage" and cfg.plan.max_quantise_ns is None


def needs_spectral(cfg: ConvertConfig) -> bool:
    """The damage cost uses alpha only when gamma is not 0 (an ablation); the others always."""
    return cfg.plan.noise != "damage" or cfg.plan.gamma is None or cfg.plan.gamma != 0


def like_budget(cfg: ConvertConfig, float_gguf: Path) -> tuple[ConvertConfig, tuple[str, int] | None]:
    """--like MIX: the budget becomes the size of the file llama.cpp writes for that mix (its dry
    run, exact). What alphaq's own file holds beyond llama.cpp's (its keys, --override-kv, the
    allowance for the quantiser's keys) is counted on the plan's side (_plan_with_header), so the
    output is no larger than llama.cpp's own file."""
    if cfg.like is None:
        return cfg, None
    size = stock_size(float_gguf, cfg.like.upper(), cfg.plan.alignment)
    return replace(cfg, plan=replace(cfg.plan, budget_mode="size", budget=float(size))), (cfg.like.upper(), size)


def _check_like_budget(float_gguf: Path, cfg: ConvertConfig, model=None) -> Pins:
    """check_budget of --like's size (``cfg``: like_budget's), its error naming --like."""
    return check_budget(float_gguf, cfg.plan, model, size_flag=f"--like {cfg.like.upper()}: its size")


def _self_calibration(float_gguf: Path, tensors, cfg: ConvertConfig, user, working_copy: str, work_dir: Path):
    """The default path's forward stages (alphaq.damage.run) for every tensor llama.cpp quantises;
    ``user``: the user's importance matrix (read before any work), or None; ``working_copy``: the
    pre-flight's choice ("float" or "q8_0", made in ``work_dir``)."""
    from alphaq.damage.run import self_calibrate

    return self_calibrate(float_gguf, damage_names(tensors, cfg.plan), cfg.plan.candidates, text_cfg=cfg.selftext, cfg=cfg.damage,
                          user_imatrix=user, imatrix_source=str(cfg.imatrix), progress=cfg.progress,
                          per_expert=cfg.plan.granularity == "expert", use_cache=cfg.use_cache,
                          n_threads=cfg.nthread or None, working_copy=working_copy, work_dir=work_dir,
                          weight_filter=(cfg.include_weights, cfg.exclude_weights))


def analysed(cfg: ConvertConfig, has_experts: bool):
    """Which matrices the plan reads α from: with ``--allocate experts`` (the default) on an
    MoE model only the routed-expert slices; every other tensor gets a fixed type, so analysing
    it would only cost time (3-13 % of the spectral stage on the benchmark models). Otherwise
    (``--allocate all``, or a dense model, which the plan allocates whole) every matrix."""
    if cfg.plan.allocate == "experts" and has_experts:
        return lambda m: m.expert is not None
    return lambda m: True


def _convert_and_analyze_hf(cfg: ConvertConfig, out: Path, wanted):
    """llama.cpp's converter and the spectral stage at the same time: (BF16 GGUF, tokenizer
    fallback, stats of the GGUF's ``wanted`` matrices).

    The converter is a subprocess that keeps about one core busy, so while it writes the BF16
    GGUF the checkpoint's BF16 matrices are analysed straight from the safetensors, one at a
    time and at the lowest CPU priority until the converter exits, then one per core.
    Afterwards every GGUF matrix whose values are those exact weights (same tensor, expert slice
    and shape, stored as BF16 or F32) takes that result; any other is analysed from the GGUF.
    So the stats are exactly those of analysing the GGUF, as before (HF and converted matrices
    are bit-identical: tests)."""
    from convert.hf_to_gguf import start_convert_hf

    log.info("converting %s to a BF16 GGUF with llama.cpp's converter", cfg.model)
    running = start_convert_hf(cfg.model, out, outtype="bf16", extra=_converter_args(cfg))
    try:
        pause_for_test("convert")
    except BaseException:
        running.kill()
        raise
    throttle = Throttle(limit=1, background=True)

    def watch() -> None:
        if running.exited() == 0:
            throttle.set_limit(None)
        else:
            throttle.cancel()  # its error is the one to report; stop analysing

    threading.Thread(target=watch, name="alphaq-converter-watch", daemon=True).start()
    try:
        try:
            early = analyze_model(cfg.model, cfg.spectral, cache_dir=cfg.cache_dir, use_cache=cfg.use_cache,
                                  progress=cfg.progress, select=lambda m: m.dtype == "BF16" and wanted(m),
                                  throttle=throttle, report=False)
        except Cancelled:
            early = []
        if not running.done():
            import llama_cpp  # noqa: F401  (the quantiser's bindings, loaded while the converter still runs)
        conv = running.wait()
    except BaseException:
        running.kill()
        raise
    by_key = {(s.tensor, s.expert): s for s in early}

    def known(m):
        s = by_key.get((m.tensor, m.expert))
        return s if s is not None and (s.rows, s.cols) == (m.rows, m.cols) and m.dtype in ("BF16", "F32") else None

    stats = analyze_model(conv.path, cfg.spectral, cache_dir=cfg.cache_dir, use_cache=cfg.use_cache,
                          progress=cfg.progress, select=wanted, known=known)
    return conv.path, conv.tokenizer_fallback, stats


class _WarningLog(logging.Handler):
    """The WARNING lines of a run (alphaq's and the converter glue's loggers), kept for the
    summary: nothing that went other than planned may stay in a log that scrolled away."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (line := record.getMessage()) not in self.lines:  # e.g. one per solve of the auto cap's search
            self.lines.append(line)


def run_convert(cfg: ConvertConfig, announce: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert ``cfg.model`` into ``cfg.output`` (module docstring). ``announce`` receives the
    pre-flight report (disk and time) before any heavy work; the CLI prints it. The result lists
    every warning of the run, including the spectral stage's fallback to numpy."""
    from alphaq.spectral import native

    handler = _WarningLog()
    loggers = [logging.getLogger("alphaq"), logging.getLogger("convert")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with memory.StageMemory() as monitor:
            result = _run_convert(cfg, announce)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    lines = [ln for ln in dict.fromkeys(handler.lines) if not ln.startswith("tokenizer fallback")]  # own line
    why = native.unavailable_reason() if needs_spectral(cfg) else None
    if why and why != "ALPHAQ_NATIVE=0" and not any("native kernels" in ln for ln in lines):
        lines.append(f"native kernels unavailable ({why}); the spectral stage used numpy (same results, slower)")
    return replace(result, warnings=tuple(lines), peak_private=dict(monitor.peaks))


def _run_convert(cfg: ConvertConfig, announce: Callable[[str], None] | None) -> ConvertResult:
    cfg, source, has_experts, user_imatrix, pins, pre = _prepare(cfg)
    if announce is not None:
        announce(pre.format(cfg.keep_bf16, _parts_note(cfg)))
    short = pre.shortfalls()
    if short and not cfg.dry_run:
        raise InputError(f"not enough disk space: {short[0]} (alphaq convert --dry-run shows the plan)")
    for line in pins.unused:
        log.warning(line)
    everything = analysed(cfg, has_experts) if cfg.plan.allocate != "every" else (lambda m: True)
    wanted = (lambda m: everything(m) and m.tensor not in pins.types) if pins.types else everything
    work = Workspace(cfg.output, cfg.keep_bf16)
    work.open(cfg.model if source == "hf" else None, cfg.resume)
    try:
        result = _stages(cfg, source, work, wanted, user_imatrix, pre)
    except BaseException as exc:
        note = work.close(keep_float=True)  # a complete intermediate stays for the re-run
        if note is not None:
            exc.add_note(note)
        raise
    work.close(keep_float=work.found is not None)  # (a dry run leaves one it reused as it was)
    return result


def _stages(cfg: ConvertConfig, source: str, work: Workspace, wanted, user_imatrix, pre: Preflight) -> ConvertResult:
    """Float model, forward stages, plan, then (unless a dry run) quantise and publish, in ``work``."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with memory.stage(float_stage := "float model + spectral" if needs_spectral(cfg) else "float model"):
        float_gguf, tokenizer_fallback, stats = _float_model(cfg, source, work, wanted)
    seconds[float_stage] = time.perf_counter() - t0
    tensors = tensor_infos(float_gguf)
    # so that a later run's pre-flight knows what the forward stages cached (only the default mode has them)
    if source == "hf" and cfg.use_cache and cfg.plan.noise == "damage":
        note_float(cfg.model, converter_mtp_args(cfg.model), float_gguf, tensors)
    base_header = header_bytes(float_gguf)
    float_bytes = model_bytes(float_gguf)
    cfg, like = like_budget(cfg, float_gguf)
    if like is not None and source == "hf":  # the mix's size is known now: checked before the forward stages
        _check_like_budget(float_gguf, cfg)
    calib = (_self_calibration(float_gguf, tensors, cfg, user_imatrix, pre.working_copy, work.dir)
             if cfg.plan.noise == "damage" else None)
    if calib is not None:
        seconds.update(calib.seconds)
    t0 = time.perf_counter()
    noise = _noise_table(float_gguf, stats, tensors, cfg)

    def solve(plan_cfg: PlanConfig) -> Plan:
        return _plan_with_header(stats, tensors, replace(cfg, plan=plan_cfg), base_header, tokenizer_fallback, noise,
                                 damage=calib.damage.costs if calib else None)

    with memory.stage("plan"):
        plan, cap = (auto_capped_plan(solve, cfg.plan, float_gguf, like=cfg.like) if auto_cap_applies(cfg)
                     else (solve(cfg.plan), None))
    if cap is not None:
        plan.settings["auto_quantise_cap"] = asdict(cap)
    if needs_spectral(cfg):
        plan.settings["farms_cap"] = farms_cap(stats, cfg.spectral)
    seconds["plan"] = time.perf_counter() - t0
    # (before quantising: an intermediate float model is deleted once the quantiser has read it)
    # every mix llama-quantize offers, so the summary's nearest one is right at 1.6 bpw and at 8 too
    stock = stock_sizes(float_gguf, cfg.plan.alignment, ALL_MIXES) if cfg.compare_stock else {}
    reused = (("bf16 intermediate",) if work.found else ()) + (calib.reused if calib else ())
    facts = dict(plan=plan, tokenizer_fallback=tokenizer_fallback, stock_sizes=stock, seconds=seconds, like=like,
                 float_bytes=float_bytes, preflight=pre, imatrix_source=calib.imatrix_source if calib else None,
                 imatrix_used=(len(calib.used.sums), len(calib.imatrix.sums)) if calib and calib.used else None,
                 reused=reused, damage_note=calib.damage.describe() if calib else None,
                 working_copy=calib.working_copy if calib else None, quantise_cap=cap, source_type=pre.source_type)
    if cfg.dry_run:
        return _planned_result(cfg, tensors, facts)
    pause_for_test("quantise")
    t0 = time.perf_counter()
    with memory.stage("quantise"):
        written = _write(cfg, plan, float_gguf, tensors, work.dir, tokenizer_fallback,
                         calib.quantiser_imatrix if calib else None,
                         done_with_float=lambda: _release_float(cfg, float_gguf, work))
        parts = _split_output(cfg, work.dir)
    seconds["quantise"] = time.perf_counter() - t0
    plots = _render_plots(cfg, plan, stats, seconds)
    published = []
    try:
        published = _publish(cfg, plan, work, calib, parts, plots.moves() if plots else [])
    finally:
        if plots is not None:
            plots.close(bool(published))
    return _written_result(cfg, written, published, facts, calib, plots)


def _render_plots(cfg: ConvertConfig, plan: Plan, stats, seconds: dict[str, float]) -> StagedPlots | None:
    """--plots: the figures, staged for _publish (None without --plots)."""
    if cfg.plots is None:
        return None
    t0 = time.perf_counter()
    plots = StagedPlots(cfg.plots)
    try:
        plots.render(plan, stats)
    except BaseException:
        plots.close(published=False)
        raise
    seconds["plots"] = time.perf_counter() - t0
    return plots


def _prepare(cfg: ConvertConfig):
    """Every check that needs no heavy work, and the pre-flight figures: (cfg with a GGUF input
    resolved to its first part, source, has experts, the user's imatrix, the pins, Preflight)."""
    damage_mode = cfg.plan.noise == "damage"
    split = splits_output(cfg)
    # a dry run writes nothing, so existing outputs do not matter, but the output's directory does
    check_output(cfg.output, cfg.force or cfg.dry_run, cfg.plan.granularity, with_imatrix=damage_mode, split=split)
    check_options(cfg)
    if cfg.like is not None:
        mix_ftype(cfg.like)  # an unknown mix name fails before any work
    user_imatrix = None
    if cfg.imatrix is not None:
        from alphaq.importance.imatrix_file import check_imatrix_fits, read_imatrix

        user_imatrix = read_imatrix(cfg.imatrix)  # a bad file fails before any work
    if Path(cfg.model).suffix.lower() == ".gguf":  # quantised weights: refused before the reader reads them
        check_source_gguf(cfg.model, check_gguf(Path(cfg.model)), cfg.allow_requantize)
    with open_model(cfg.model) as model:  # validates path, config, architecture, dtypes, shards
        if model.source == "gguf":  # any part of a split GGUF: llama.cpp loads it from the first
            cfg = replace(cfg, model=first_shard(cfg.model))
        check_keep_bf16(cfg, model.source)
        if cfg.keep_split and model.source != "gguf":
            raise InputError(f"--keep-split keeps the parts of a split GGUF input; {cfg.model} is an HF checkpoint "
                             "(--split-max-size or --split-max-tensors split the output)")
        check_not_input(cfg, model.source)
        has_experts = any(m.expert is not None for m in model.matrices())
        if user_imatrix is not None:
            check_imatrix_fits(user_imatrix, cfg.imatrix, weight_shapes(model))
        if model.source == "hf":
            from convert.hf_to_gguf import check_tokenizer_files

            check_tokenizer_files(cfg.model)  # the converter's own error would name another cause
        pins = early_budget_check(cfg, model)  # from shapes alone: before converting or analysing
        kept = Workspace(cfg.output, cfg.keep_bf16).peek(cfg.model) if model.source == "hf" and cfg.resume else None
        pre = preflight(cfg, model, reused=kept.path if kept else None, user_imatrix=user_imatrix)
        return cfg, model.source, has_experts, user_imatrix, pins, pre


def check_options(cfg: ConvertConfig) -> None:
    """The flags against each other and their values: the split, --dry-run, --plots, --imatrix,
    --max-buffer-size, --include/--exclude-weights (before the model is opened)."""
    if cfg.split_max_size is not None and cfg.split_max_tensors is not None:
        raise InputError("--split-max-size and --split-max-tensors both set the split; give one")
    if cfg.keep_split and (cfg.split_max_size is not None or cfg.split_max_tensors is not None):
        raise InputError("--keep-split keeps the input's parts and --split-max-size/--split-max-tensors make new "
                         "ones; give one")
    if cfg.split_max_size is not None or cfg.split_max_tensors is not None:
        SplitSpec(cfg.split_max_size, cfg.split_max_tensors)  # validates the values
    if splits_output(cfg) and cfg.plan.granularity == "expert":
        raise InputError("--split-max-size/--split-max-tensors/--keep-split need --granularity tensor "
                         "(split expert-granular files are not supported)")
    if cfg.max_buffer_size is not None and not (isinstance(cfg.max_buffer_size, int) and cfg.max_buffer_size > 0):
        raise InputError(f"--max-buffer-size {cfg.max_buffer_size}: give a positive whole number of MiB")
    check_weight_filters(cfg)
    if cfg.dry_run and cfg.plots is not None:
        raise InputError("--plots writes figures and --dry-run writes nothing; give one")
    if cfg.imatrix is not None and cfg.plan.noise != "damage":  # (it would be read and ignored)
        raise InputError("--imatrix is used by the default (damage) mode only; --fast and --paper read no data")
    if cfg.working_copy not in WORKING_COPY_CHOICES:
        raise InputError(f"--working-copy {cfg.working_copy!r}: allowed {', '.join(WORKING_COPY_CHOICES)}")
    check_plots_dir(cfg.plots, cfg.force)


def check_weight_filters(cfg: ConvertConfig) -> None:
    """--include-weights / --exclude-weights: one of them, non-empty names, and a mode that has an
    importance matrix to filter."""
    if cfg.include_weights and cfg.exclude_weights:
        raise InputError("--include-weights and --exclude-weights cannot be used together (as in llama-quantize)")
    flag = "--include-weights" if cfg.include_weights else "--exclude-weights"
    names = cfg.include_weights or cfg.exclude_weights
    if not names:
        return
    if any(not n for n in names):
        raise InputError(f"{flag} '': give part of a tensor name, e.g. ffn_down_exps")
    if cfg.plan.noise != "damage":
        raise InputError(f"{flag} chooses where the importance matrix is used, and only the default (damage) mode "
                         "uses one; --fast and --paper read no data")


def weight_shapes(model) -> dict[str, tuple[int, int]]:
    """Weight name -> (matrices, columns) of an opened model: an importance vector's size."""
    return {t.name: (t.shape[0] if len(t.shape) == 3 else 1, t.shape[-1])
            for t in matrix_tensors(model.matrices())}


def check_not_input(cfg: ConvertConfig, source: str) -> None:
    """No file this run writes is one it reads: the input model (or a part of it), the user's
    --imatrix or a --tensor-type-file. --force replaces outputs, never what they are made from."""
    inputs = {p: "the input model (or a part of it)" for p in (input_files(cfg.model) if source == "gguf" else ())}
    # (a checkpoint directory: no output, a .gguf file or a side file of one, is among its files)
    inputs |= {p: "the --imatrix input" for p in input_files(cfg.imatrix)}
    inputs |= {p: "a --tensor-type-file input" for p in input_files(*cfg.pin_files)}
    for out in (cfg.output, *side_paths(cfg.output), imatrix_path(cfg.output), cfg.keep_bf16):
        if out is not None and out.resolve() in inputs:
            raise InputError(f"{out} is {inputs[out.resolve()]}; write the output elsewhere "
                             "(--force replaces outputs, never an input)")


def check_keep_bf16(cfg: ConvertConfig, source: str) -> None:
    """--keep-bf16 against --dry-run, the input (``source``: "hf" or "gguf") and the outputs."""
    if cfg.keep_bf16 is None:
        return
    if cfg.dry_run:
        raise InputError("--keep-bf16 writes a file and --dry-run writes none; give one")
    if source != "hf":
        raise InputError(f"--keep-bf16 keeps the BF16 GGUF made from an HF checkpoint; {cfg.model} is already a GGUF")
    if cfg.keep_bf16.suffix != ".gguf":
        raise InputError(f"--keep-bf16 {cfg.keep_bf16} must end in .gguf")
    if not cfg.keep_bf16.parent.is_dir():
        raise InputError(f"--keep-bf16 directory {cfg.keep_bf16.parent} does not exist")
    if cfg.keep_bf16.exists() and not cfg.force:
        raise InputError(f"{cfg.keep_bf16} already exists; pass --force to overwrite")
    if cfg.keep_bf16.resolve() in {cfg.output.resolve(), *(p.resolve() for p in side_paths(cfg.output))}:
        raise InputError(f"--keep-bf16 {cfg.keep_bf16} is one of the outputs")


def splits_output(cfg: ConvertConfig) -> bool:
    """The output is written in parts (--split-max-size, --split-max-tensors or --keep-split)."""
    return bool(cfg.split_max_size or cfg.split_max_tensors or cfg.keep_split)


def _parts_note(cfg: ConvertConfig) -> str:
    if cfg.keep_split:
        return f", in the {len(shard_paths(cfg.model))} part(s) of the input (--keep-split)"
    if cfg.split_max_tensors:
        return f", in parts of at most {cfg.split_max_tensors} tensors"
    if cfg.split_max_size:
        return f", in parts of at most {format_size(cfg.split_max_size)} of tensor data"
    return ""


def _release_float(cfg: ConvertConfig, float_gguf: Path, work: Workspace) -> None:
    """The quantiser (and the expert-groups writer) have read the float model: an intermediate one
    (HF input, not kept) is deleted now, so the output's copies never coexist with it on disk."""
    if float_gguf == work.float_path and cfg.keep_bf16 is None:
        work.discard_float()


def _split_output(cfg: ConvertConfig, tmp_dir: Path) -> list[Path]:
    """tmp_dir/final.gguf in parts as llama-gguf-split writes them (alphaq.gguf.split), or as is."""
    final = tmp_dir / "final.gguf"
    if not splits_output(cfg):
        if cfg.plan.budget_mode == "size" and final.stat().st_size > cfg.plan.budget:
            raise InternalError(f"the output ({final.stat().st_size} B) exceeds its size budget "
                                f"({int(cfg.plan.budget)} B; the header bound is wrong)")
        return [final]
    log.info("writing the output in parts (%s)", _parts_note(cfg).lstrip(", "))
    if cfg.keep_split:
        parts = split_gguf_like(final, tmp_dir / "part", part_names(cfg.model))
    else:
        parts = split_gguf(final, tmp_dir / "part", SplitSpec(cfg.split_max_size, cfg.split_max_tensors))
    whole = [(t.name, t.type, t.n_bytes) for t in read_tensors(final)]
    if sorted(whole) != sorted((t.name, t.type, t.n_bytes) for t in read_tensors(parts[0])):
        raise InternalError("the output's parts do not hold exactly the tensors of the whole file")
    final.unlink()
    if cfg.plan.budget_mode == "size" and sum(p.stat().st_size for p in parts) > cfg.plan.budget:
        raise InternalError("the output's parts exceed --target-size (the split overhead bound is wrong)")
    return parts


def early_budget_check(cfg: ConvertConfig, model) -> Pins:
    """The pins and the budget against the model's shapes, before any expensive stage
    (alphaq.allocate.feasibility.check_budget: the same one-line errors as the plan's). With --like the
    budget of an HF checkpoint is known only from its float model (checked then, _stages): pins only."""
    if model.source == "gguf" and cfg.plan.noise == "damage":
        check_no_mtp(cfg.model, read_tensors(cfg.model))
    if cfg.like is None:
        return check_budget(cfg.model, cfg.plan, model)
    if model.source == "gguf":  # llama.cpp's dry run of the mix: milliseconds
        return _check_like_budget(cfg.model, like_budget(cfg, cfg.model)[0], model)
    return plan_pins(quantised_tensors(matrix_tensors(model.matrices())), cfg.plan)


def _float_model(cfg: ConvertConfig, source: str, work: Workspace, wanted):
    """(float GGUF, tokenizer fallback, spectral stats): the input itself when it is a float GGUF,
    else llama.cpp's converter's BF16 output (the intermediate in ``work``, or the one an
    interrupted run kept there); stats only where the plan uses alpha."""
    if source == "gguf":  # checked to be float by early_budget_check
        return cfg.model, None, _read_float(cfg, cfg.model, wanted)
    found = work.found
    if found is not None:
        return found.path, found.tokenizer_fallback, _read_float(cfg, found.path, wanted, checked=found.finite)
    if needs_spectral(cfg):
        path, fallback, stats = _convert_and_analyze_hf(cfg, work.float_path, wanted)
    else:
        path, fallback, stats = *_convert_hf(cfg, work.float_path), []
    # from here on an interrupted run keeps it for the next (_convert_hf checked its values)
    work.complete(fallback, cfg.model, finite=not needs_spectral(cfg))
    return path, fallback, stats


def _read_float(cfg: ConvertConfig, path: Path, wanted, checked: bool = False) -> list:
    """A float GGUF that this run did not convert: alpha where the plan uses it, else the NaN check
    the forward stages need (the spectral stage reports non-finite matrices itself), unless
    ``checked`` already."""
    if not needs_spectral(cfg):
        if not checked:
            check_finite(path)
        return []
    return analyze_model(path, cfg.spectral, cache_dir=cfg.cache_dir, use_cache=cfg.use_cache,
                         progress=cfg.progress, select=wanted)


def _converter_args(cfg: ConvertConfig) -> tuple[str, ...]:
    """llama.cpp converter options beyond the float type: --no-mtp where it would keep NextN layers
    (alphaq.model.weights.CONVERTER_KEEPS_MTP); layers left out are said in a warning, which the
    summary repeats."""
    if n := mtp_layers_left_out(cfg.model):
        log.warning("%s has %d NextN (multi-token prediction) layer(s), which llama.cpp's main graph never reads: "
                    "left out, as llama.cpp's converter --no-mtp does (its --mtp writes them as a separate draft GGUF)",
                    cfg.model, n)
    return converter_mtp_args(cfg.model)


def _convert_hf(cfg: ConvertConfig, out: Path) -> tuple[Path, str | None]:
    """llama.cpp's converter alone (no alpha needed): (BF16 GGUF, tokenizer fallback)."""
    from convert.hf_to_gguf import start_convert_hf

    log.info("converting %s to a BF16 GGUF with llama.cpp's converter", cfg.model)
    running = start_convert_hf(cfg.model, out, outtype="bf16", extra=_converter_args(cfg))
    try:
        pause_for_test("convert")
        conv = running.wait()
    except BaseException:
        running.kill()  # e.g. Ctrl-C: never leave the converter running
        raise
    check_finite(conv.path)
    return conv.path, conv.tokenizer_fallback


def _write(cfg: ConvertConfig, plan: Plan, float_gguf: Path, tensors, tmp_dir: Path, tokenizer_fallback, imatrix,
           done_with_float: Callable[[], None] = lambda: None):
    """Quantise with llama.cpp (and the expert-groups writer), add the alphaq keys, verify:
    tmp_dir/final.gguf. ``done_with_float`` is called as soon as the float model has been read
    for the last time. Returns (tensor types, expert layouts)."""
    types = plan.tensor_types(mixed="skip")
    layouts = group_layouts(plan.expert_types(), {t.name: t.shape for t in tensors})
    # grouped projections are quantised per expert by the expert-groups writer; here
    # llama.cpp only copies them in their source type (no work, no effect on file_type)
    to_llama = {**types, **{t.name: GGMLQuantizationType[t.dtype] for t in tensors if t.name in layouts}}
    means = imatrix.means() if imatrix is not None else None
    log.info("quantising %d tensors with llama.cpp's quantiser", len(types))
    quantised = tmp_dir / "quantised.gguf"
    quantize_gguf(float_gguf, quantised, to_llama, nthread=cfg.nthread, progress=cfg.progress,
                  file_type_from=types, imatrix=means, kv_overrides=cfg.kv_overrides,
                  max_buf_size=None if cfg.max_buffer_size is None else cfg.max_buffer_size << 20)
    final = tmp_dir / "final.gguf"
    meta = alphaq_metadata(plan, cfg, tokenizer_fallback)
    if layouts:
        write_expert_gguf(quantised, float_gguf, layouts, meta, final, progress=cfg.progress, imatrix=means)
        done_with_float()
    else:
        done_with_float()
        copy_with_metadata(quantised, final, meta)
    quantised.unlink()
    _verify(final, plan, types, layouts)
    return types, layouts


def _publish(cfg: ConvertConfig, plan: Plan, work: Workspace, calib, parts: list[Path],
             plot_moves: list[tuple[Path, Path]]) -> list[Path]:
    """Side files (and the figures) first, then the model's parts from the last to the first (the
    first's presence means the run completed; llama.cpp loads from it), then the kept BF16 model;
    nothing that appeared meanwhile is replaced without --force. Returns the published model file(s)."""
    split = parts[0].name != "final.gguf"
    targets = ([cfg.output.with_name(cfg.output.name.removesuffix(".gguf") + p.name.removeprefix("part"))
                for p in parts] if split else [cfg.output])
    plan_json, tt_file = side_paths(cfg.output)
    tmp_dir = work.dir
    staged = [(tmp_dir / "plan.json", plan_json)]
    staged[0][0].write_text(_plan_json(plan, targets, parts, cfg))
    if cfg.plan.granularity == "tensor":
        (tmp_dir / "tensor-types.txt").write_text("\n".join(plan.tensor_type_lines()) + "\n")
        staged.append((tmp_dir / "tensor-types.txt", tt_file))
    if calib is not None:
        from alphaq.importance.imatrix_file import write_imatrix

        write_imatrix(tmp_dir / "imatrix.gguf", calib.imatrix)
        staged.append((tmp_dir / "imatrix.gguf", imatrix_path(cfg.output)))
    check_output(cfg.output, cfg.force, cfg.plan.granularity, with_imatrix=calib is not None, split=split)
    existing = [str(dst) for _, dst in plot_moves if dst.exists()]
    existing += [str(cfg.keep_bf16)] if cfg.keep_bf16 is not None and cfg.keep_bf16.exists() else []
    if existing and not cfg.force:
        raise InputError(f"{', '.join(existing)} appeared meanwhile; pass --force to overwrite")
    stale = [p for p in existing_parts(cfg.output) if p not in targets] if split else []
    for src, dst in staged + plot_moves + list(reversed(list(zip(parts, targets)))):
        os.replace(src, dst)
    for p in stale:  # --force: parts of an earlier split of this output into another count
        p.unlink()
    if cfg.keep_bf16 is not None:
        work.publish_float(cfg.keep_bf16)
    return targets


def _plan_json(plan: Plan, targets: list[Path], parts: list[Path], cfg: ConvertConfig) -> str:
    """The plan JSON beside the output: the plan, the file(s) written (all parts when split) and the
    llama-quantize flags that shaped the file but not the plan's settings (here, not in the GGUF's
    own copy of the plan, so that a size budget's header stays as planned)."""
    data = json.loads(plan.to_json())
    sizes = [p.stat().st_size for p in parts]
    data["output"] = {"files": [{"file": t.name, "bytes": n} for t, n in zip(targets, sizes)], "file_bytes": sum(sizes)}
    data["llama_quantize"] = {"include_weights": list(cfg.include_weights), "exclude_weights": list(cfg.exclude_weights),
                              "keep_split": cfg.keep_split, "max_buffer_size_mib": cfg.max_buffer_size}
    return json.dumps(data, sort_keys=True, indent=1, allow_nan=False) + "\n"


def _planned_result(cfg: ConvertConfig, tensors, facts: dict) -> ConvertResult:
    """--dry-run: what the run would write, from the plan alone."""
    plan = facts["plan"]
    layouts = group_layouts(plan.expert_types(), {t.name: t.shape for t in tensors})
    counts = Counter(t.name for t in plan.tensor_types(mixed="skip").values())
    counts.update(t.name for lay in layouts.values() for t in lay.types)
    plan_json, tt_file = side_paths(cfg.output)
    predicted = plan.totals.predicted_file_bytes
    if cfg.plan.budget_mode != "size":  # the alphaq keys (the plan itself), which a size budget already holds
        predicted += metadata_bytes(alphaq_metadata(plan, cfg, facts["tokenizer_fallback"]))
    return ConvertResult(output=cfg.output, plan_json=plan_json,
                         tensor_type_file=tt_file if cfg.plan.granularity == "tensor" else None,
                         file_bytes=predicted, tensor_counts=dict(sorted(counts.items())),
                         imatrix_file=None, dry_run=True, n_grouped=len(layouts),
                         runtime=PATCHED_RUNTIME if layouts else STOCK_RUNTIME, **facts)


def _written_result(cfg: ConvertConfig, written, published: list[Path], facts: dict, calib,
                    plots: StagedPlots | None) -> ConvertResult:
    types, layouts = written
    counts = Counter(t.name for t in types.values())
    counts.update(t.name for lay in layouts.values() for t in lay.types)  # one tensor per group
    plan_json, tt_file = side_paths(cfg.output)
    return ConvertResult(
        output=published[0], plan_json=plan_json,
        tensor_type_file=tt_file if cfg.plan.granularity == "tensor" else None,
        file_bytes=sum(p.stat().st_size for p in published), tensor_counts=dict(sorted(counts.items())),
        runtime=PATCHED_RUNTIME if layouts else STOCK_RUNTIME, n_grouped=len(layouts),
        imatrix_file=imatrix_path(cfg.output) if calib else None,
        parts=tuple(published) if len(published) > 1 or published[0] != cfg.output else (),
        kept_float=cfg.keep_bf16, plots=tuple(dst for _, dst in plots.moves()) if plots else (), **facts)


def _verify(path: Path, plan: Plan, types: dict, layouts: dict[str, ExpertGroups]) -> None:
    """The written file has exactly the planned types and the planned tensor bytes (a mismatch is a
    bug in our model of llama.cpp, never a user error)."""
    written = {t.name: t for t in read_tensors(path)}
    expected = dict(types)
    for lay in layouts.values():
        expected.update({group_name(lay.tensor, g): t for g, t in enumerate(lay.types)})
    wrong = [f"{n}: planned {t.name}, written {written[n].type.name if n in written else 'nothing'}"
             for n, t in expected.items() if n not in written or written[n].type != t]
    if wrong:
        raise InternalError("llama.cpp wrote other types than planned: " + "; ".join(wrong[:5]))
    align = plan.settings.get("alignment", 32)
    data = sum(padded(t.n_bytes, align) for t in written.values())
    planned = plan.totals.allocated_bytes + plan.totals.fixed_tensor_bytes
    if data != planned:
        raise InternalError(f"tensor bytes {data} differ from the plan's prediction {planned}")


def load_plan_from_gguf(path: Path) -> dict:
    """The plan JSON embedded in an AlphaQ GGUF (its alphaq.plan key)."""
    field_ = GGUFReader(path).get_field("alphaq.plan")
    if field_ is None:
        raise InputError(f"{path} has no alphaq.plan key: not written by alphaq convert")
    return json.loads(field_.contents())
