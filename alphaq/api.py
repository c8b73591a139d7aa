"""The Python front door: ``alphaq.convert``, ``alphaq.plan`` and ``alphaq.analyze``.

    import alphaq
    result = alphaq.convert("path/to/hf-checkpoint", "out.gguf", like="Q4_K_M")
    print(result.file_bytes, result.plan.totals.file_bpw)

Library calls show no progress bars unless ``progress=True``, and raise ``alphaq.AlphaQError``
(one line naming the value, by its keyword, and what is allowed) for every mistake in their input: its kinds
``alphaq.InputError`` (model, file or path), ``alphaq.BudgetError`` (a budget the candidate types
cannot meet, refused before any work) and ``alphaq.QuantizeError`` (llama.cpp's quantiser failed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

from alphaq.errors import AlphaQError, InputError


# The library shares its checks with the CLI, whose messages name command-line flags. A Python
# caller passed keywords, so `_python_errors` re-spells every flag a message names: a flag whose
# keyword has the same name loses its dashes (--target-size -> target_size); these differ.
_KEYWORD_OF_FLAG = {
    "force": "force=True", "dry-run": "dry_run=True", "allow-requantize": "allow_requantize=True",
    "no-resume": "resume=False", "no-cache": "use_cache=False", "no-stock-compare": "compare_stock=False",
    "fast": "mode='fast'", "paper": "mode='paper'", "threads": "nthread",
    "self-samples": "selftext=SelfTextConfig(n_seq=...)", "self-ctx": "selftext=SelfTextConfig(n_ctx=...)",
    "seed": "selftext=SelfTextConfig(seed=...)", "damage-windows": "damage=DamageConfig(n_windows=...)",
    "damage-anchors": "damage=DamageConfig(anchors=...)", "damage": "damage=DamageConfig(method=...)",
    "xmin-window": "spectral=SpectralConfig(xmin_window=...)", "override-kv": "override_kv",
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def python_spelling(message: str) -> str:
    """``message`` with each command-line flag it names spelled as the front door's keyword."""
    return _FLAG.sub(lambda m: _KEYWORD_OF_FLAG.get(m.group(1), m.group(1).replace("-", "_")), message)


def _python_errors(fn):
    """``fn`` raising its AlphaQErrors (same type and traceback) with keywords for flags."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlphaQError as exc:
            exc.args = tuple(python_spelling(a) if isinstance(a, str) else a for a in exc.args)
            raise

    return call


def _allowed_types(hint) -> tuple[type, ...] | None:
    """The Python types a config field's annotation admits, or None where it is not checked here
    (tuples of pairs, nested generics): their own checks apply."""
    import types
    import typing

    if hint is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_allowed_types(a) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    if typing.get_origin(hint) is tuple:
        return (tuple, list)
    simple = {int: (int,), float: (int, float), bool: (bool,), str: (str,), Path: (str, os.PathLike),
              type(None): (type(None),)}
    if hint in simple:
        return simple[hint]
    return (hint,) if dataclasses.is_dataclass(hint) else None


def _check_types(cls, values: dict) -> None:
    """Keyword options against ``cls``'s field types: a wrong type is an AlphaQError naming the
    keyword, not a TypeError from deep inside a stage (True is no number here, as in the CLI)."""
    import typing

    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        allowed = _allowed_types(hints.get(name))
        if allowed is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = sorted({"path" if t is os.PathLike else "None" if t is type(None) else t.__name__ for t in allowed})
            raise AlphaQError(f"{name}={value!r}: expected {' or '.join(names)}")


def _model_path(model) -> Path:
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"model={model!r}: expected a path (str or os.PathLike)")
    return Path(model)


def _spectral_sample(options: dict) -> tuple:
    """(alpha_experts, farms_max_blocks) taken out of ``options``: as --alpha-experts and
    --farms-max-blocks, a count, "all" or "auto" (the default)."""
    return options.pop("alpha_experts", "auto"), options.pop("farms_max_blocks", "auto")


def _plan_config(mode: str, budget, bpw, target_size, options: dict):
    from alphaq.allocate.plan import MODES, PlanConfig, parse_size

    if mode not in MODES:
        raise AlphaQError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
    given = [(n, v) for n, v in (("budget", budget), ("bpw", bpw), ("target_size", target_size)) if v is not None]
    if len(given) > 1:
        raise AlphaQError(f"{' and '.join(n for n, _ in given)} both set the budget; give one")
    name, value = given[0] if given else ("budget", 3.0)
    fields = {f.name for f in dataclasses.fields(PlanConfig)}
    plan_opts = {k: options.pop(k) for k in list(options) if k in fields}
    if "types" in plan_opts and isinstance(plan_opts["types"], str):
        plan_opts["types"] = tuple(t for t in plan_opts["types"].split(",") if t.strip())
    if isinstance(plan_opts.get("gamma"), str) and plan_opts["gamma"].strip().lower() == "paper":
        plan_opts["gamma"] = None  # as --gamma paper: the App. A.7 formula
    _check_types(PlanConfig, plan_opts)
    budget_mode = {"budget": "bits", "bpw": "bpw", "target_size": "size"}[name]
    if budget_mode == "size" and isinstance(value, str):
        value = parse_size(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlphaQError(f"{name}={value!r}: expected a number" + (" of bytes or a size such as '12GiB'"
                                                                   if budget_mode == "size" else " of bits"))
    return PlanConfig(**{**MODES[mode], "budget_mode": budget_mode, "budget": float(value), **plan_opts})


def _pins(options: dict, tensor_type, tensor_type_file) -> None:
    """llama-quantize's --tensor-type / --tensor-type-file as keyword arguments: their entries
    (in that order) go before any ``tensor_types`` pairs given directly."""
    from alphaq.allocate.overrides import tensor_type_entries

    entries = tensor_type_entries(tensor_type, tensor_type_file)
    if entries:
        options["tensor_types"] = entries + tuple(options.get("tensor_types", ()))


@_python_errors
def convert(model: str | os.PathLike, output: str | os.PathLike, *, budget: float | None = None,
            bpw: float | None = None, target_size: int | str | None = None, like: str | None = None,
            mode: str = "damage", plots: str | os.PathLike | None = None, progress: bool = False,
            force: bool = False, tensor_type=None, tensor_type_file=None, override_kv=None, **options):
    """Convert ``model`` (HF checkpoint directory or F32/F16/BF16 GGUF; a Q8_0 GGUF with
    ``allow_requantize=True``, llama-quantize's --allow-requantize) into ``output``.

    Budget: one of ``budget`` (nominal bits), ``bpw``, ``target_size`` (bytes or "12GiB") or
    ``like`` (a llama.cpp mix name); default 3 nominal bits. ``mode``: "damage" (default),
    "fast" or "paper" (alphaq.allocate.plan.MODES). llama-quantize's overrides, same syntax:
    ``output_tensor_type="q8_0"``, ``leave_output_tensor=True``, ``token_embedding_type="q6_k"``,
    ``tensor_type="attn_v=q8_0"`` (or a list), ``tensor_type_file=path`` (or a list),
    ``override_kv="general.name=str:x"`` (or a list), ``include_weights="ffn_down"`` or
    ``exclude_weights=[...]`` (a name or a list), ``keep_split=True``, ``max_buffer_size=MiB``.
    Other keyword options are PlanConfig fields (types, gamma, granularity, ...) or
    ConvertConfig fields (imatrix, nthread, use_cache, split_max_size (bytes, or "2G" as
    llama-gguf-split), split_max_tensors, keep_bf16, dry_run, resume (False: convert an HF checkpoint
    afresh rather than reuse the BF16 intermediate an interrupted run kept), alpha_experts and
    farms_max_blocks (as --alpha-experts and --farms-max-blocks: a count, "all" or "auto"), working_copy ("auto",
    "float" or "q8_0": what the forward stages run), max_quantise_ns (ns per weight, "auto" (default:
    alphaq.allocate.quantise_cap in the damage mode) or None for no cap), ...).
    ``plots="DIR"`` also writes the figures of ``alphaq convert --plots`` there (not with dry_run).
    Returns alphaq.pipeline.convert.ConvertResult."""
    from alphaq.pipeline.convert import ConvertConfig, run_convert
    from alphaq.allocate.overrides import kv_overrides, tensor_type_files
    from convert.vendor import warn_if_amx

    warn_if_amx()

    if like is not None and any(v is not None for v in (budget, bpw, target_size)):
        raise AlphaQError("like and another budget both set the budget; give one")
    _pins(options, tensor_type, tensor_type_file)
    options["pin_files"] = tensor_type_files(tensor_type_file) + tuple(options.get("pin_files", ()))
    options["kv_overrides"] = kv_overrides(override_kv) + kv_overrides(options.get("kv_overrides"))
    for key in ("include_weights", "exclude_weights"):  # one name or several, as the repeatable flags
        if isinstance(options.get(key), str):
            options[key] = (options[key],)
        elif isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    cap = options.pop("max_quantise_ns", "auto")  # as --max-quantise-ns: ns per weight, "auto" or "none"/None
    if cap != "auto":
        options["auto_quantise_cap"] = False
        if cap not in (None, "none"):
            options["max_quantise_ns"] = cap
    sample = _spectral_sample(options)
    plan = _plan_config(mode, budget, bpw, 1 if like is not None else target_size, options)
    if "spectral" in options and sample != ("auto", "auto"):
        raise AlphaQError("alpha_experts/farms_max_blocks and spectral both choose what is analysed; give one "
                          "(spectral=SpectralConfig(max_experts=N, max_blocks=M))")
    if "spectral" not in options:
        from alphaq.allocate.plan import spectral_config

        options["spectral"] = spectral_config(plan, *sample)
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise AlphaQError(f"unknown option(s) {', '.join(unknown)}; see alphaq.allocate.plan.PlanConfig and "
                          "alphaq.pipeline.convert.ConvertConfig")
    if isinstance(options.get("split_max_size"), str):  # llama-gguf-split's syntax, e.g. "2G"
        from alphaq.gguf.split import parse_split_size

        options["split_max_size"] = parse_split_size(options["split_max_size"])
    _check_types(ConvertConfig, {**options, "force": force, "progress": progress, "like": like, "plots": plots,
                                 "output": output})
    for key in ("imatrix", "keep_bf16"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    cfg = ConvertConfig(model=_model_path(model), output=Path(output), plan=plan, progress=progress, force=force,
                        like=like, plots=None if plots is None else Path(plots), **options)
    return run_convert(cfg)


@_python_errors
def plan(model: str | os.PathLike, *, budget: float | None = None, bpw: float | None = None,
         target_size: int | str | None = None, mode: str = "fast", progress: bool = False,
         tensor_type=None, tensor_type_file=None, **options):
    """The allocation for a model without writing anything (modes "fast" and "paper": no forward
    pass), as `alphaq plan`: a float GGUF (any part of a split one), or an HF checkpoint (sizes of
    the analysed matrices, header estimated); takes convert's pins (output_tensor_type,
    tensor_type, ...), alpha_experts and farms_max_blocks. Returns alphaq.allocate.plan.Plan."""
    if mode == "damage":
        raise AlphaQError("the damage mode runs the model; use alphaq.convert (plan takes mode 'fast' or 'paper')")
    cap = options.get("max_quantise_ns")
    if cap == "auto":
        raise AlphaQError("max_quantise_ns='auto' is the cap of alphaq.convert's damage mode; plan takes ns per "
                          "weight or None")
    if cap == "none":
        options["max_quantise_ns"] = None
    _pins(options, tensor_type, tensor_type_file)
    sample = _spectral_sample(options)
    cfg = _plan_config(mode, budget, bpw, target_size, options)
    if options:
        raise AlphaQError(f"unknown option(s) {', '.join(sorted(options))}; see alphaq.allocate.plan.PlanConfig")
    path = _model_path(model)
    if not path.exists():
        raise InputError(f"model {path} does not exist")
    from alphaq.allocate.plan import spectral_config
    from alphaq.commands.plan import plan_model

    return plan_model(path, cfg, spectral_config(cfg, *sample), progress=progress)


@_python_errors
def analyze(model: str | os.PathLike, *, progress: bool = False, **options):
    """PL_Alpha_Hill and the other spectral statistics of every weight matrix (alphaq.spectral.analyze)."""
    from alphaq.spectral.alpha import SpectralConfig
    from alphaq.spectral.analyze import analyze_model

    if "cfg" in options and not isinstance(options["cfg"], SpectralConfig):
        raise AlphaQError(f"cfg={options['cfg']!r}: expected an alphaq.spectral.alpha.SpectralConfig")
    return analyze_model(_model_path(model), progress=progress, **options)
