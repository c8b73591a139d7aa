"""The main job: HF checkpoint or float GGUF -> mixed-type GGUF, with no external data.

Default (damage):
    input ──(llama.cpp converter, HF only)──> float GGUF ──sample──> the model's own text
          ──> importance matrix ──> damage per tensor and type ──knapsack──> types
          ──llama_model_quantize(overrides, importance)──> quantised GGUF ──+alphaq.* keys──> output
Paper / fast (no forward pass at all):
    float GGUF ──spectral──> alphas ──plan──> types ──llama_model_quantize(overrides)──> ...

Everything is written under temporary names in the output's directory and renamed at the very
end, so a failed or interrupted run leaves nothing behind, and nothing existing is replaced
without ``force``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from alphaq import __version__
from alphaq.analyze import Cancelled, Throttle, analyze_model
from alphaq.errors import InputError, InternalError
from alphaq.expert_gguf import PATCHED_RUNTIME, STOCK_RUNTIME, ExpertGroups, group_layouts, group_name, write_expert_gguf
from alphaq.gguf_io import FLOAT_TYPES, check_finite, copy_with_metadata, header_bytes, read_tensors
from alphaq.damage import DamageConfig
from alphaq.overrides import KVOverride, Pins
from alphaq.plan import Plan, PlanConfig, TensorInfo, check_budget, make_plan, plan_pins
from alphaq.qtypes import llama_quantizes, padded, tensor_bytes
from alphaq.records import MatrixStats
from alphaq.quantize import STOCK_MIXES, mix_ftype, quantize_gguf, stock_mix_types
from alphaq.selftext import SelfTextConfig
from alphaq.spectral import SpectralConfig
from alphaq.weights import open_model

log = logging.getLogger(__name__)

# Bytes llama_model_quantize adds to a float GGUF's header (general.quantization_version and the
# rewritten general.file_type) — a small safety margin for --target-size before the exact re-check.
_QUANT_KV_MARGIN = 256


@dataclass(frozen=True)
class ConvertConfig:
    model: Path  # HF checkpoint directory or F32/F16/BF16 GGUF
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


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    plan_json: Path
    tensor_type_file: Path | None
    plan: Plan
    file_bytes: int
    tensor_counts: dict[str, int]  # written type -> number of quantised tensors
    tokenizer_fallback: str | None
    stock_sizes: dict[str, int] = field(default_factory=dict)  # mix -> predicted file bytes
    runtime: str = STOCK_RUNTIME  # what runs the file: stock llama.cpp, or the patched one
    n_grouped: int = 0  # merged expert tensors stored as type groups (expert granularity)
    imatrix_file: Path | None = None  # the importance matrix used, saved in llama.cpp's format
    imatrix_source: str | None = None  # "self" (the model's own text) or the user's file
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    like: tuple[str, int] | None = None  # (mix, its size) when the budget was given by name
    float_bytes: int = 0  # size of the float GGUF the stages read
    plots: tuple[Path, ...] = ()  # the figures written (convert --plots)
    warnings: tuple[str, ...] = ()  # every WARNING logged during the run, repeated in the summary


def side_paths(output: Path) -> tuple[Path, Path]:
    stem = output.name[:-5] if output.name.endswith(".gguf") else output.name
    return output.with_name(stem + ".plan.json"), output.with_name(stem + ".tensor-types.txt")


def imatrix_path(output: Path) -> Path:
    """Where the importance matrix goes: beside the output, in llama.cpp's GGUF imatrix format."""
    stem = output.name[:-5] if output.name.endswith(".gguf") else output.name
    return output.with_name(stem + ".imatrix.gguf")


def check_output(output: Path, force: bool, granularity: str, with_imatrix: bool = False) -> None:
    if output.suffix != ".gguf":
        raise InputError(f"output {output} must end in .gguf")
    if not output.parent.is_dir():
        raise InputError(f"output directory {output.parent} does not exist")
    plan_json, tt_file = side_paths(output)
    targets = [output, plan_json] + ([tt_file] if granularity == "tensor" else [])
    targets += [imatrix_path(output)] if with_imatrix else []
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")


def check_plots_dir(plots: Path | None, force: bool) -> None:
    """--plots DIR: a directory (or creatable as one) holding none of the figures' names, unless
    ``force``. The alpha heatmaps' names depend on the model, so any ``heatmap_*.png`` counts."""
    if plots is None:
        return
    from alphaq.plots import CONVERT_PLOT_NAMES

    existing_ancestor = next(p for p in (plots, *plots.absolute().parents) if p.exists())
    if not existing_ancestor.is_dir():
        raise InputError(f"--plots {plots}: {existing_ancestor} is not a directory")
    if plots.is_dir() and not force:
        existing = sorted(str(p) for pattern in CONVERT_PLOT_NAMES for p in plots.glob(pattern))
        if existing:
            raise InputError(f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} already exist(s); "
                              "pass --force to overwrite")


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


def check_float_gguf(path: Path) -> None:
    for t in read_tensors(path):
        if len(t.shape) >= 2 and t.type not in FLOAT_TYPES:
            raise InputError(
                f"{path} is already quantised ({t.name} is {t.type.name}); "
                "alphaq needs an F32/F16/BF16 GGUF or an HF checkpoint")


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


def stock_size(float_gguf: Path, mix: str, header: int, alignment: int) -> int:
    """Predicted file size of a llama.cpp mix, from llama.cpp's own dry-run decisions."""
    shapes = {t.name: t.shape for t in read_tensors(float_gguf)}
    types = stock_mix_types(float_gguf, mix)
    return header + sum(padded(tensor_bytes(GGMLQuantizationType[t], shapes[n]), alignment) for n, t in types.items())


def stock_sizes(float_gguf: Path, header: int, alignment: int, mixes=STOCK_MIXES) -> dict[str, int]:
    """Predicted file size of each llama.cpp stock mix."""
    return {mix: stock_size(float_gguf, mix, header, alignment) for mix in mixes}


def _noise_table(float_gguf: Path, stats, tensors, cfg: ConvertConfig):
    """Measured noise model: ggml quantise/dequantise MSE per item and candidate (data-free)."""
    if cfg.plan.noise != "measured":
        return None
    from alphaq.costs import measure_noise
    from alphaq.plan import measurement_requests

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
    return make_plan(stats, tensors, cfg.plan, noise_table=noise_table, damage=damage,
                     fixed_bytes=padded(base_header + extra + 4096, cfg.plan.alignment))


def needs_spectral(cfg: ConvertConfig) -> bool:
    """The damage cost uses alpha only when gamma is not 0 (an ablation); the others always."""
    return cfg.plan.noise != "damage" or cfg.plan.gamma is None or cfg.plan.gamma != 0


def like_budget(cfg: ConvertConfig, float_gguf: Path, base_header: int) -> tuple[ConvertConfig, tuple[str, int] | None]:
    """--like MIX: the budget becomes that llama.cpp mix's file size for this model (its dry run)."""
    if cfg.like is None:
        return cfg, None
    from dataclasses import replace

    size = stock_size(float_gguf, cfg.like.upper(), base_header + _QUANT_KV_MARGIN, cfg.plan.alignment)
    return replace(cfg, plan=replace(cfg.plan, budget_mode="size", budget=float(size))), (cfg.like.upper(), size)


def _self_calibration(float_gguf: Path, tensors, cfg: ConvertConfig, user):
    """The default path's forward stages (alphaq.damage.run) for every tensor llama.cpp quantises;
    ``user``: the user's importance matrix (read before any work), or None."""
    from alphaq.damage.run import self_calibrate

    pinned = plan_pins(tensors, cfg.plan).types  # fixed types: no damage to measure
    names = [t.name for t in tensors if llama_quantizes(t.name, t.shape) and t.name not in pinned]
    return self_calibrate(float_gguf, names, cfg.plan.candidates, text_cfg=cfg.selftext, cfg=cfg.damage,
                          user_imatrix=user, imatrix_source=str(cfg.imatrix), progress=cfg.progress,
                          per_expert=cfg.plan.granularity == "expert", use_cache=cfg.use_cache,
                          n_threads=cfg.nthread or None)


def analysed(cfg: ConvertConfig, has_experts: bool):
    """Which matrices the plan reads α from: with ``--allocate experts`` (the default) on an
    MoE model only the routed-expert slices; every other tensor gets a fixed type, so analysing
    it would only cost time (3-13 % of the spectral stage on the benchmark models). Otherwise
    (``--allocate all``, or a dense model, which the plan allocates whole) every matrix."""
    if cfg.plan.allocate == "experts" and has_experts:
        return lambda m: m.expert is not None
    return lambda m: True


def _convert_and_analyze_hf(cfg: ConvertConfig, tmp_dir: Path, wanted):
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
    running = start_convert_hf(cfg.model, tmp_dir / "float.gguf", outtype="bf16")
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
        self.lines.append(record.getMessage())


def run_convert(cfg: ConvertConfig) -> ConvertResult:
    """Convert ``cfg.model`` into ``cfg.output`` (module docstring); the result lists every
    warning of the run, including the spectral stage's fallback to numpy."""
    from dataclasses import replace

    from alphaq import native

    handler = _WarningLog()
    loggers = [logging.getLogger("alphaq"), logging.getLogger("convert")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        result = _run_convert(cfg)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    lines = [ln for ln in dict.fromkeys(handler.lines) if not ln.startswith("tokenizer fallback")]  # own line
    why = native.unavailable_reason() if needs_spectral(cfg) else None
    if why and why != "ALPHAQ_NATIVE=0" and not any("native kernels" in ln for ln in lines):
        lines.append(f"native kernels unavailable ({why}); the spectral stage used numpy (same results, slower)")
    return replace(result, warnings=tuple(lines))


def _run_convert(cfg: ConvertConfig) -> ConvertResult:
    damage_mode = cfg.plan.noise == "damage"
    check_output(cfg.output, cfg.force, cfg.plan.granularity, with_imatrix=damage_mode)
    check_plots_dir(cfg.plots, cfg.force)
    if cfg.like is not None:
        mix_ftype(cfg.like)  # an unknown mix name fails before any work
    user_imatrix = None
    if cfg.imatrix is not None:
        from alphaq.importance.imatrix_file import read_imatrix

        user_imatrix = read_imatrix(cfg.imatrix)  # a bad file fails before any work
    with open_model(cfg.model) as model:  # validates path, config, architecture, dtypes, shards
        source = model.source
        has_experts = any(m.expert is not None for m in model.matrices())
        if source == "hf":
            from convert.hf_to_gguf import check_tokenizer_files

            check_tokenizer_files(cfg.model)  # the converter's own error would name another cause
        pinning = cfg.plan.output_tensor_type or cfg.plan.token_embedding_type or cfg.plan.tensor_types
        if cfg.like is None and not pinning:  # (with pins, early_budget_check's range is the one that holds)
            from alphaq.feasibility import check_budget as check_reachable

            check_reachable(cfg.model, cfg.plan, model)  # from shapes alone: before converting or analysing
        pins = early_budget_check(cfg, model)
    for line in pins.unused:
        log.warning(line)
    everything = analysed(cfg, has_experts) if cfg.plan.allocate != "every" else (lambda m: True)
    wanted = (lambda m: everything(m) and m.tensor not in pins.types) if pins.types else everything
    seconds: dict[str, float] = {}
    tmp_dir = Path(tempfile.mkdtemp(prefix=".alphaq-", dir=cfg.output.parent))
    plots, published = None, False
    try:
        t0 = time.perf_counter()
        float_gguf, tokenizer_fallback, stats = _float_model(cfg, source, tmp_dir, wanted)
        seconds["float model + spectral" if needs_spectral(cfg) else "float model"] = time.perf_counter() - t0
        tensors = tensor_infos(float_gguf)
        base_header = header_bytes(float_gguf)
        float_bytes = float_gguf.stat().st_size
        cfg, like = like_budget(cfg, float_gguf, base_header)
        calib = _self_calibration(float_gguf, tensors, cfg, user_imatrix) if damage_mode else None
        if calib is not None:
            seconds.update(calib.seconds)
        t0 = time.perf_counter()
        noise = _noise_table(float_gguf, stats, tensors, cfg)
        plan = _plan_with_header(stats, tensors, cfg, base_header, tokenizer_fallback, noise,
                                 damage=calib.damage.costs if calib else None)
        seconds["plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        written = _write(cfg, plan, float_gguf, tensors, tmp_dir, tokenizer_fallback,
                         calib.imatrix if calib else None)
        seconds["quantise"] = time.perf_counter() - t0
        stock = stock_sizes(float_gguf, base_header, cfg.plan.alignment) if cfg.compare_stock else {}
        if cfg.plots is not None:
            t0 = time.perf_counter()
            plots = StagedPlots(cfg.plots)
            plots.render(plan, stats)
            seconds["plots"] = time.perf_counter() - t0
        _publish(cfg, plan, tmp_dir, calib, plots.moves() if plots else [])
        published = True
    finally:
        for p in sorted(tmp_dir.glob("*")):
            p.unlink()
        tmp_dir.rmdir()
        if plots is not None:
            plots.close(published)
    types, layouts = written
    counts = Counter(t.name for t in types.values())
    counts.update(t.name for lay in layouts.values() for t in lay.types)  # one tensor per group
    plan_json, tt_file = side_paths(cfg.output)
    return ConvertResult(
        output=cfg.output, plan_json=plan_json,
        tensor_type_file=tt_file if cfg.plan.granularity == "tensor" else None, plan=plan,
        file_bytes=cfg.output.stat().st_size, tensor_counts=dict(sorted(counts.items())),
        tokenizer_fallback=tokenizer_fallback, stock_sizes=stock,
        runtime=PATCHED_RUNTIME if layouts else STOCK_RUNTIME, n_grouped=len(layouts),
        imatrix_file=imatrix_path(cfg.output) if calib else None,
        imatrix_source=calib.imatrix_source if calib else None, seconds=seconds, like=like, float_bytes=float_bytes,
        plots=tuple(dst for _, dst in plots.moves()) if plots else ())


def early_budget_check(cfg: ConvertConfig, model) -> Pins:
    """The pins and the budget against the model's shapes, before any expensive stage (the
    same one-line errors as the plan's). An HF checkpoint's GGUF tensors are known only by the
    matrices it will become: the check then uses the quantised tensors and no header, a lower
    bound of the file. With --like the budget is known only from the float model: pins only."""
    if model.source == "gguf":
        check_float_gguf(cfg.model)
        tensors, header = tensor_infos(cfg.model), header_bytes(cfg.model)
    else:
        tensors, header = _quantised_tensors(model.matrices()), 0
    if cfg.like is not None:
        return plan_pins(tensors, cfg.plan)
    known = {t.name for t in tensors}
    stats = [MatrixStats(m.tensor, m.block, m.expert, m.kind, m.rows, m.cols, m.params, float("nan"), float("nan"),
                         0, 0, signal=False) for m in model.matrices() if m.tensor in known]
    return check_budget(stats, tensors, cfg.plan, fixed_bytes=header)


def _quantised_tensors(matrices) -> list[TensorInfo]:
    """The GGUF tensors (name, numpy shape) that llama.cpp will quantise, from the matrices."""
    dims: dict[str, tuple[int, int]] = {}
    n_expert: dict[str, int] = {}
    for m in matrices:
        dims[m.tensor] = (m.rows, m.cols)
        if m.expert is not None:
            n_expert[m.tensor] = max(n_expert.get(m.tensor, 0), m.expert + 1)
    shapes = {n: ((n_expert[n],) if n in n_expert else ()) + d for n, d in dims.items()}
    return [TensorInfo(n, shape, "BF16") for n, shape in shapes.items() if llama_quantizes(n, shape)]


def _float_model(cfg: ConvertConfig, source: str, tmp_dir: Path, wanted):
    """(float GGUF, tokenizer fallback, spectral stats): the input itself when it is a float GGUF,
    else llama.cpp's converter's BF16 output; stats only where the plan uses alpha."""
    if source == "hf":
        if needs_spectral(cfg):
            return _convert_and_analyze_hf(cfg, tmp_dir, wanted)
        from convert.hf_to_gguf import convert_hf

        conv = convert_hf(cfg.model, tmp_dir / "float.gguf", outtype="bf16")
        check_finite(conv.path)
        return conv.path, conv.tokenizer_fallback, []
    # a GGUF input was checked to be float by early_budget_check
    if not needs_spectral(cfg):
        check_finite(cfg.model)
        return cfg.model, None, []
    stats = analyze_model(cfg.model, cfg.spectral, cache_dir=cfg.cache_dir, use_cache=cfg.use_cache,
                          progress=cfg.progress, select=wanted)
    return cfg.model, None, stats


def _write(cfg: ConvertConfig, plan: Plan, float_gguf: Path, tensors, tmp_dir: Path, tokenizer_fallback, imatrix):
    """Quantise with llama.cpp (and the expert-groups writer), add the alphaq keys, verify:
    tmp_dir/final.gguf. Returns (tensor types, expert layouts)."""
    types = plan.tensor_types(mixed="skip")
    layouts = group_layouts(plan.expert_types(), {t.name: t.shape for t in tensors})
    # grouped projections are quantised per expert by the expert-groups writer; here
    # llama.cpp only copies them in their source type (no work, no effect on file_type)
    to_llama = {**types, **{t.name: GGMLQuantizationType[t.dtype] for t in tensors if t.name in layouts}}
    means = imatrix.means() if imatrix is not None else None
    log.info("quantising %d tensors with llama.cpp's quantiser", len(types))
    quantised = tmp_dir / "quantised.gguf"
    quantize_gguf(float_gguf, quantised, to_llama, nthread=cfg.nthread, progress=cfg.progress,
                  file_type_from=types, imatrix=means, kv_overrides=cfg.kv_overrides)
    final = tmp_dir / "final.gguf"
    meta = alphaq_metadata(plan, cfg, tokenizer_fallback)
    if layouts:
        write_expert_gguf(quantised, float_gguf, layouts, meta, final, progress=cfg.progress, imatrix=means)
    else:
        copy_with_metadata(quantised, final, meta)
    quantised.unlink()
    _verify(final, plan, types, layouts)
    return types, layouts


def _publish(cfg: ConvertConfig, plan: Plan, tmp_dir: Path, calib, plot_moves: list[tuple[Path, Path]]) -> None:
    """Side files (and the figures) first, the model last (its presence means the run completed);
    nothing that appeared meanwhile is replaced without --force."""
    plan_json, tt_file = side_paths(cfg.output)
    staged = [(tmp_dir / "plan.json", plan_json)]
    staged[0][0].write_text(plan.to_json())
    if cfg.plan.granularity == "tensor":
        (tmp_dir / "tensor-types.txt").write_text("\n".join(plan.tensor_type_lines()) + "\n")
        staged.append((tmp_dir / "tensor-types.txt", tt_file))
    if calib is not None:
        from alphaq.importance.imatrix_file import write_imatrix

        write_imatrix(tmp_dir / "imatrix.gguf", calib.imatrix)
        staged.append((tmp_dir / "imatrix.gguf", imatrix_path(cfg.output)))
    check_output(cfg.output, cfg.force, cfg.plan.granularity, with_imatrix=calib is not None)
    existing = [str(dst) for _, dst in plot_moves if dst.exists()]
    if existing and not cfg.force:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    for src, dst in staged + plot_moves:
        os.replace(src, dst)
    os.replace(tmp_dir / "final.gguf", cfg.output)


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
    """The plan JSON embedded in an AlphaQ GGUF (alphaq.plan)."""
    field_ = GGUFReader(path).get_field("alphaq.plan")
    if field_ is None:
        raise InputError(f"{path} has no alphaq.plan key: not written by alphaq convert")
    return json.loads(field_.contents())
