"""convert_alphaq.py end to end, against llama.cpp's own converter, quantiser and runtime."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from alphaq.cli import main as cli_main
from alphaq.pipeline.convert import ConvertConfig, load_plan_from_gguf, run_convert
from alphaq.evaluate.perplexity import perplexity
from alphaq.gguf.io import read_tensors
from alphaq.allocate.plan import PlanConfig
from alphaq.gguf.qtypes import effective_type, nominal_bits, resolve_type
from alphaq.gguf.quantize import quantize_stock
from conftest import FIXTURES, MODEL_FIXTURES

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = (FIXTURES / "heldout" / "prose.txt").read_text()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alpha-cache")


def _convert(model: Path, out: Path, cache_dir: Path, **plan) -> object:
    cfg = ConvertConfig(model=model, output=out, plan=PlanConfig(**plan), cache_dir=cache_dir,
                        compare_stock=False, progress=False, nthread=2)
    return run_convert(cfg)


@pytest.fixture(scope="session")
def bf16_perplexity(float_ggufs):
    """Perplexity of each fixture's BF16 GGUF on the held-out windows the tests score (computed
    once per fixture), checked against the perplexity its training log reports."""
    done: dict[str, float] = {}

    def get(name: str) -> float:
        if name not in done:
            ppl = perplexity(float_ggufs[name], HELDOUT, n_ctx=256, max_windows=4).ppl
            logged = json.loads((FIXTURES / name / "train_log.json").read_text())["heldout"]["prose"]["ppl_bf16"]
            # 512 scored tokens against the log's 51605: within 30 % (measured: 0.85-0.89 x)
            assert 0.7 * logged < ppl < 1.3 * logged, (name, ppl, logged)
            done[name] = ppl
        return done[name]

    return get


def _expert_tensors(path: Path):
    return [t for t in read_tensors(path) if t.name.endswith("_exps.weight")]


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5])
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_every_fixture_converts_runs_and_keeps_budget(name, budget, float_ggufs, cache_dir, tmp_path, bf16_perplexity):
    out = tmp_path / f"{name}.gguf"
    result = _convert(float_ggufs[name], out, cache_dir, budget=budget)
    plan = load_plan_from_gguf(out)

    # types: allocated tensors use a candidate or llama.cpp's shape fallback of one
    candidates = [resolve_type(t) for t in plan["settings"]["types"]]
    written = {t.name: t for t in read_tensors(out)}
    for t in _expert_tensors(out):
        allowed = {effective_type(c, t.shape[-1]) for c in candidates}
        assert t.type in allowed, (t.name, t.type.name)

    # budget, recomputed from the GGUF alone: parameter-weighted nominal bits of the candidate
    # each expert tensor was written as (for a fallback type, the *largest* candidate that falls
    # back to it, so the check is conservative)
    bits, params = 0.0, 0
    for t in _expert_tensors(out):
        nb = max(nominal_bits(c) for c in candidates if effective_type(c, t.shape[-1]) == t.type)
        bits += nb * t.n_elements
        params += t.n_elements
    assert bits / params <= budget + 1e-9, (bits / params, budget)

    # predicted bytes == the GGUF's tensor bytes, tensor by tensor
    predicted = {it["tensor"]: 0 for it in plan["items"]}
    for it in plan["items"]:
        predicted[it["tensor"]] += it["bytes"]
    for f in plan["fixed"]:
        predicted[f["tensor"]] = f["bytes"]
    assert predicted == {n: t.n_bytes for n, t in written.items()}
    assert result.file_bytes == out.stat().st_size

    # runs in llama.cpp with its BF16 source's quality: perplexity on the same held-out windows
    # within 10 % of the BF16 GGUF's (measured: +0.1 % to +1.7 % at 2.5-3.5 bits; a broken
    # tensor or a wrong type puts it far above)
    ppl = perplexity(out, HELDOUT, n_ctx=256, max_windows=4)
    bf16 = bf16_perplexity(name)
    assert math.isfinite(ppl.ppl) and 0.97 * bf16 <= ppl.ppl <= 1.10 * bf16, (ppl.ppl, bf16)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, seed=0, verbose=False)
    text = llm("def ", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert llm.tokenize(text.encode(), add_bos=False), "generated no tokens"


def test_all_q4k_plan_is_byte_identical_to_llama_quantize(float_ggufs, cache_dir, tmp_path):
    """Real quantiser: with every allocated tensor at Q4_K, expert tensors equal a stock
    llama.cpp Q4_K quantisation of the same BF16 GGUF byte for byte."""
    src = float_ggufs["mixtral"]
    ours = tmp_path / "ours.gguf"
    _convert(src, ours, cache_dir, budget=4.0, types=("Q4_K",))
    stock = tmp_path / "stock.gguf"
    quantize_stock(src, stock, "Q4_K_M")  # Q4_K_M puts these experts at Q4_K (checked below)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(stock).tensors}
    compared = 0
    for name in a:
        if name.endswith("_exps.weight") and b[name].tensor_type == gguf.GGMLQuantizationType.Q4_K:
            assert a[name].tensor_type == gguf.GGMLQuantizationType.Q4_K
            assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
            compared += 1
    assert compared >= 4


def test_header_reader_matches_gguf_py(float_ggufs, tmp_path):
    """read_tensors/header_bytes parse the header themselves (gguf-py's reader is ~50x slower):
    same records and data offset on every fixture's float GGUF, on quantised files, and on a
    file with a non-default alignment and every kind of key/value."""
    from alphaq.gguf import io as gguf_io

    files = list(float_ggufs.values())
    for mix in ("Q2_K", "Q4_K_M"):
        files.append(tmp_path / f"mixtral-{mix}.gguf")
        quantize_stock(float_ggufs["mixtral"], files[-1], mix)
    w = gguf.GGUFWriter(tmp_path / "odd.gguf", arch="llama")
    w.add_custom_alignment(64)
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_float64("test.f64", 1.5)
    w.add_bool("test.flag", True)
    w.add_tensor("t0", np.ones((3, 5), dtype=np.float32))
    w.add_tensor("t1", np.ones(7, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files.append(tmp_path / "odd.gguf")
    for path in files:
        assert gguf_io.file_header(path) == gguf_io._read_header_gguf_py(path), path.name
    assert gguf_io.header_bytes(files[-1]) % 64 == 0


def test_hf_and_bf16_gguf_inputs_give_the_same_allocation(float_ggufs, cache_dir, tmp_path):
    a = _convert(FIXTURES / "qwen2moe", tmp_path / "from-hf.gguf", cache_dir, budget=3.0)
    b = _convert(float_ggufs["qwen2moe"], tmp_path / "from-gguf.gguf", cache_dir, budget=3.0)
    assert a.tokenizer_fallback and "SentencePiece" in a.tokenizer_fallback
    pa, pb = load_plan_from_gguf(a.output), load_plan_from_gguf(b.output)
    assert [(i["tensor"], i["type"]) for i in pa["items"]] == [(i["tensor"], i["type"]) for i in pb["items"]]
    assert [i["alpha"] for i in pa["items"]] == [i["alpha"] for i in pb["items"]]


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_only_the_allocated_matrices_are_analysed(source, float_ggufs, cache_dir, tmp_path, monkeypatch):
    """With --allocate experts (default) on an MoE model only routed-expert slices are analysed
    (attention and shared experts get fixed types), and the plan is what analysing every matrix
    gave (only the fixed tensors' reason now says "not analysed"); with --allocate all
    everything is analysed."""
    import alphaq.spectral.analyze as analyze_mod
    import alphaq.pipeline.convert as convert_mod

    seen = []
    real = analyze_mod.analyze_weight
    monkeypatch.setattr(analyze_mod, "analyze_weight", lambda m, *a: seen.append(m.expert) or real(m, *a))
    model = FIXTURES / "qwen2moe" if source == "hf" else float_ggufs["qwen2moe"]
    lean = _convert(model, tmp_path / "lean.gguf", cache_dir, budget=3.0)
    assert seen and None not in seen
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "analysed", lambda cfg, has_experts: (lambda _: True))
        full = _convert(model, tmp_path / "full.gguf", cache_dir, budget=3.0)
    assert None in seen  # the old behaviour did analyse the other matrices
    pl, pf = load_plan_from_gguf(lean.output), load_plan_from_gguf(full.output)
    assert pl["items"] == pf["items"] and pl["totals"] == pf["totals"]
    assert [{**f, "reason": None} for f in pl["fixed"]] == [{**f, "reason": None} for f in pf["fixed"]]
    assert read_tensors(lean.output) == read_tensors(full.output)  # same types and sizes
    seen.clear()
    _convert(model, tmp_path / "all.gguf", cache_dir, budget=3.0, allocate="all")
    assert None in seen


def test_output_is_deterministic(float_ggufs, cache_dir, tmp_path):
    a = _convert(float_ggufs["qwen3moe"], tmp_path / "a.gguf", cache_dir, budget=2.5).output.read_bytes()
    b = _convert(float_ggufs["qwen3moe"], tmp_path / "b.gguf", cache_dir, budget=2.5).output.read_bytes()
    assert a == b


def test_side_files_and_metadata(float_ggufs, cache_dir, tmp_path):
    out = tmp_path / "m.gguf"
    r = _convert(float_ggufs["mixtral"], out, cache_dir, budget=3.0)
    assert r.plan_json == tmp_path / "m.plan.json" and r.plan_json.exists()
    assert r.tensor_type_file == tmp_path / "m.tensor-types.txt"
    lines = r.tensor_type_file.read_text().split()
    assert all(ln.startswith("^blk\\.") or ln.startswith("^token_embd") or ln.startswith("^output")
               for ln in lines)
    reader = gguf.GGUFReader(out)
    for key in ("alphaq.version", "alphaq.budget", "alphaq.budget_mode", "alphaq.gamma", "alphaq.types",
                "alphaq.granularity", "alphaq.plan", "general.file_type"):
        assert reader.get_field(key) is not None, key
    side = json.loads(r.plan_json.read_text())
    # the side file adds what was written (all parts of a split output) and the llama-quantize
    # flags that shaped the file to the embedded plan
    assert side.pop("output") == {"files": [{"file": "m.gguf", "bytes": out.stat().st_size}],
                                  "file_bytes": out.stat().st_size}
    assert side.pop("llama_quantize") == {"include_weights": [], "exclude_weights": [], "keep_split": False,
                                          "max_buffer_size_mib": None}
    assert side == load_plan_from_gguf(out)


# ----------------------------------------------------------------------------------------------
# HF input: the spectral stage runs beside llama.cpp's converter
# ----------------------------------------------------------------------------------------------


def _uncached(model: Path, out: Path, **plan):
    cfg = ConvertConfig(model=model, output=out, plan=PlanConfig(**plan), use_cache=False,
                        compare_stock=False, progress=False, nthread=2)
    return run_convert(cfg)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_hf_input_analysed_beside_the_converter_equals_gguf_input(name, float_ggufs, tmp_path):
    """HF input: alpha comes from the safetensors while the converter runs; every item of the plan
    (alpha, variance, type, bytes) and every tensor written equal a run on the converted GGUF."""
    a = _uncached(FIXTURES / name, tmp_path / "from-hf.gguf", budget=3.0)
    b = _uncached(float_ggufs[name], tmp_path / "from-gguf.gguf", budget=3.0)
    assert load_plan_from_gguf(a.output)["items"] == load_plan_from_gguf(b.output)["items"]
    ta = {t.name: t for t in gguf.GGUFReader(a.output).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b.output).tensors}
    assert ta.keys() == tb.keys()
    for n in ta:
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n


def test_hf_weights_that_the_converter_rounds_are_analysed_from_its_output(tmp_path):
    """An F32 checkpoint: the converter writes BF16, so alpha must come from the rounded GGUF
    values, not from the F32 safetensors."""
    from safetensors.torch import load_file, save_file

    from alphaq.spectral.analyze import analyze_model
    from convert.hf_to_gguf import convert_hf

    d = tmp_path / "f32"
    shutil.copytree(FIXTURES / "mixtral", d)
    t = load_file(d / "model.safetensors")
    save_file({k: v.float() * 1.001 for k, v in t.items()}, d / "model.safetensors", metadata={"format": "pt"})
    ref = convert_hf(d, tmp_path / "ref.gguf").path
    a = _uncached(d, tmp_path / "from-hf.gguf", budget=3.0)
    b = _uncached(ref, tmp_path / "from-gguf.gguf", budget=3.0)
    assert load_plan_from_gguf(a.output)["items"] == load_plan_from_gguf(b.output)["items"]
    got = [s.alpha for s in analyze_model(ref, use_cache=False, progress=False)]
    raw = [s.alpha for s in analyze_model(d, use_cache=False, progress=False)]
    assert got != raw  # the rounding does change alpha, so the check above means something


def test_converter_failure_stops_the_analysis_and_is_reported(tmp_path, capsys, monkeypatch):
    """The converter fails (an unreadable tokenizer.model) while the spectral stage runs beside it:
    its error is the one reported, the analysis stops at the matrix in progress, nothing is written
    and no process is left behind. No timing: the first matrix is held until the converter's
    failure has cancelled the analysis (an event), so this holds under any load."""
    import threading

    import alphaq.spectral.analyze as analyze_mod

    d = tmp_path / "bad-tokenizer"
    shutil.copytree(FIXTURES / "mixtral", d)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(b"not a SentencePiece model")  # present, so only the converter can tell
    cancelled = threading.Event()
    real_cancel = analyze_mod.Throttle.cancel

    def cancel(self):
        real_cancel(self)
        cancelled.set()

    calls = []
    real = analyze_mod.analyze_matrix

    def held(w, *, name, cfg):
        calls.append(name)
        assert cancelled.wait(timeout=600), "the converter's failure never cancelled the analysis"
        return real(w, name=name, cfg=cfg)

    monkeypatch.setattr(analyze_mod.Throttle, "cancel", cancel)
    monkeypatch.setattr(analyze_mod, "analyze_matrix", held)
    work = tmp_path / "work"
    work.mkdir()
    code = cli_main(["convert", str(d), "--fast", "--budget", "3", "-o", str(work / "o.gguf"), "--no-progress",
                     "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "llama.cpp's converter failed" in err[-1] and "Traceback" not in "\n".join(err)
    assert cancelled.is_set() and len(calls) <= 1  # the one matrix in progress under the converter's limit
    assert list(work.iterdir()) == []
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(d).encode() in _cmdline(p)]
    assert alive == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, nothing written
# ----------------------------------------------------------------------------------------------


def _corrupt_copy(tmp_path: Path) -> Path:
    d = tmp_path / "corrupt"
    shutil.copytree(FIXTURES / "mixtral", d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _nan_copy(tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(FIXTURES / "mixtral", d)
    t = load_file(d / "model.safetensors")
    t["model.layers.1.block_sparse_moe.experts.3.w2.weight"][0, 5] = float("nan")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _unsupported_copy(tmp_path: Path) -> Path:
    d = tmp_path / "gpt2ish"
    shutil.copytree(FIXTURES / "mixtral", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


BAD_CASES = {
    "missing path": (lambda tp, g: [str(tp / "nope"), "--budget", "3"], "does not exist"),
    "dir without config": (lambda tp, g: [str(tp), "--budget", "3"], "config.json"),
    "corrupt safetensors": (lambda tp, g: [str(_corrupt_copy(tp)), "--budget", "3"], "safetensors"),
    "unsupported arch": (lambda tp, g: [str(_unsupported_copy(tp)), "--budget", "3"], "GPT2LMHeadModel"),
    "infeasible budget": (lambda tp, g: [str(g["mixtral"]), "--budget", "0.5"], "0.5"),
    "unknown type": (lambda tp, g: [str(g["mixtral"]), "--budget", "3", "--types", "Q3_K,Q9_Z"], "Q9_Z"),
    "nan weights": (lambda tp, g: [str(_nan_copy(tp)), "--budget", "3"], "blk.1.ffn_down_exps"),
    "missing output dir": (lambda tp, g: [str(g["mixtral"]), "-o", str(tp / "no" / "x.gguf")], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, float_ggufs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args, needle = BAD_CASES[case]
    argv = args(tmp_path, float_ggufs)
    if "-o" not in argv:
        argv += ["-o", str(work / "out.gguf")]
    code = cli_main(["convert", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    assert needle in err[-1], err[-1]
    assert sorted(p.name for p in work.iterdir()) == [], "nothing may be written"


def test_quantised_gguf_input_is_refused(float_ggufs, tmp_path, capsys):
    q = tmp_path / "q.gguf"
    quantize_stock(float_ggufs["mixtral"], q, "Q4_K_M")
    out = tmp_path / "out.gguf"
    code = cli_main(["convert", str(q), "--budget", "3", "-o", str(out), "--no-progress"])
    assert code == 2 and "an F32/F16/BF16 GGUF, or a Q8_0 one with --allow-requantize" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_needs_force(float_ggufs, cache_dir, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    code = cli_main(["convert", str(float_ggufs["mixtral"]), "-o", str(out), "--no-progress"])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_convert_alphaq_script_runs_as_documented(tmp_path):
    out = tmp_path / "demo.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "convert_alphaq.py"), str(FIXTURES / "mixtral"),
                           "--budget", "3", "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
    for needle in ("true bpw", "types", "nearest is llama.cpp", "runtime", "own text only",
                   "  damage      16 tensor(s) measured (estimate) on 4,096 tokens of own text; weighted error",
                   "fake quantise", "forward", "reference", "(16 measurements)"):
        assert needle in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_quantisable_rule_matches_llama_cpp_dry_run(name, float_ggufs):
    """Which tensors llama.cpp re-types (our qtypes.llama_quantizes) equals its own decisions."""
    from alphaq.gguf.qtypes import llama_quantizes
    from alphaq.gguf.quantize import stock_mix_types

    src = float_ggufs[name]
    decided = stock_mix_types(src, "Q4_K_M")
    for t in read_tensors(src):
        assert llama_quantizes(t.name, t.shape) == (decided[t.name] != t.type.name), t.name


def test_measured_noise_and_target_size_convert(float_ggufs, cache_dir, tmp_path):
    """The data-free measured noise model runs end to end, and --target-size holds for the file."""
    src = float_ggufs["qwen2moe"]
    target = int(2.0 * 2**20)
    out = tmp_path / "m.gguf"
    _convert(src, out, cache_dir, budget_mode="size", budget=target, noise="measured", mse_rows=16)
    assert out.stat().st_size <= target
    assert load_plan_from_gguf(out)["settings"]["noise"] == "measured"


def test_warnings_of_the_run_are_repeated_in_the_summary(float_ggufs, tmp_path, capsys, monkeypatch):
    """No silent fallback: the spectral stage on numpy (the C kernel failed to build) is a WARNING
    in the log and a line of the summary, with the compiler's error."""
    from alphaq.spectral import native

    why = "compiling native.c with cc failed: -O3: native.c:1:1: error: test"
    monkeypatch.setattr(native, "_state", {"error": why})
    out = tmp_path / "o.gguf"
    code = cli_main(["convert", str(float_ggufs["mixtral"]), "--fast", "--budget", "3", "-o", str(out),
                     "--no-progress", "--no-cache", "--no-stock-compare"])
    assert code == 0
    summary = capsys.readouterr().out
    [line] = [ln for ln in summary.splitlines() if ln.startswith("  warnings")]
    assert f"native kernels unavailable ({why})" in line


@pytest.mark.parametrize("patched, damage, grouped, hint", [(True, True, 0, True), (False, True, 0, False),
                                                             (True, False, 0, False), (True, True, 3, False)])
def test_runtime_line_points_patched_runtime_users_at_expert_granularity(patched, damage, grouped, hint, monkeypatch):
    """Only a damage-default, tensor-granular file converted where the patched runtime is installed
    gets the pointer to --granularity expert; a grouped file names its groups instead."""
    from types import SimpleNamespace

    from alphaq.commands.convert import _runtime_line
    from alphaq.gguf.expert import PATCHED_RUNTIME, STOCK_RUNTIME
    from alphaq.runtime import isolated

    monkeypatch.setattr(isolated, "patched_loaded", lambda: patched)
    r = SimpleNamespace(runtime=PATCHED_RUNTIME if grouped else STOCK_RUNTIME, n_grouped=grouped,
                        damage_note="measured" if damage else None)
    line = _runtime_line(r)
    assert ("--granularity expert" in line) == hint
    assert ("stored as type groups" in line) == bool(grouped)


# convert.run_upstream with its chunked expert stacks counted (``CHUNKED n`` on stdout); "--as-upstream"
# switches them off
_RUN_CONVERTER = """
import atexit, sys
import convert.run_upstream as r
numpy, n = r._ChunkedStack.numpy, []
r._ChunkedStack.numpy = lambda self: n.append(1) or numpy(self)
atexit.register(lambda: print("CHUNKED", len(n)))
r.main(sys.argv[1:])
"""


def _run_converter(how: str, model: Path, out: Path) -> int:
    from convert.vendor import ensure_vendor

    flags = ["--as-upstream"] if how == "plain" else []
    cmd = [sys.executable, "-c", _RUN_CONVERTER, *flags, str(ensure_vendor().absolute()), str(model), "--outtype",
           "bf16", "--outfile", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split("CHUNKED")[-1])


def test_merged_experts_are_written_a_part_at_a_time_with_upstreams_bytes(tmp_path):
    """Mixtral: byte-identical to llama.cpp's converter run as is (the fixture's tokenizer needs no
    fallback), with every merged expert tensor written in chunks (3 per block)."""
    from convert.vendor import ensure_vendor

    ours, upstream = tmp_path / "ours.gguf", tmp_path / "upstream.gguf"
    chunked = _run_converter("chunked", FIXTURES / "mixtral", ours)
    subprocess.run([sys.executable, str(ensure_vendor() / "convert_hf_to_gguf.py"), str(FIXTURES / "mixtral"),
                    "--outtype", "bf16", "--outfile", str(upstream)], check=True, capture_output=True, timeout=600)
    blocks = json.loads((FIXTURES / "mixtral" / "config.json").read_text())["num_hidden_layers"]
    assert chunked == 3 * blocks
    assert ours.read_bytes() == upstream.read_bytes()


@pytest.mark.parametrize("name", ["qwen3moe", "deepseek2"])
def test_chunked_expert_stacks_change_no_byte(name, tmp_path):
    """Architectures whose fixture needs the tokenizer fallback (so upstream alone cannot convert
    it): the same bytes with and without the chunked stacks."""
    chunked = _run_converter("chunked", FIXTURES / name, tmp_path / "chunked.gguf")
    assert _run_converter("plain", FIXTURES / name, tmp_path / "plain.gguf") == 0
    assert chunked > 0
    assert (tmp_path / "chunked.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


def test_plan_of_a_checkpoint_predicts_about_the_file_convert_writes(tmp_path):
    """`alphaq plan` on an HF checkpoint estimates the metadata from its tokenizer files
    (feasibility.tokenizer_kv_bytes); the flat 4 MiB it used before made this file look 3x larger."""
    import json

    model = FIXTURES / "mixtral"
    assert cli_main(["plan", str(model), "--budget", "3", "--json", str(tmp_path / "p.json")]) == 0
    predicted = json.loads((tmp_path / "p.json").read_text())["totals"]["predicted_file_bytes"]
    out = tmp_path / "o.gguf"
    assert cli_main(["convert", str(model), "--fast", "--budget", "3", "-o", str(out), "--no-progress"]) == 0
    assert abs(predicted / out.stat().st_size - 1) < 0.05, (predicted, out.stat().st_size)
