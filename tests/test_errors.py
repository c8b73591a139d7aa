"""Bad input fails fast and clearly: one line on stderr, exit code 2, no traceback, nothing written,
and before any expensive stage (llama.cpp's converter, the spectral analysis, the model's own
text). Internal errors: one line, exit code 1, the traceback under --debug.

Every case here works on an HF fixture linked file by file (no conversion), so the file is cheap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import alphaq
from alphaq.cli import main as cli_main
from conftest import FIXTURES

MODEL = "qwen3moe"


def checkpoint(tmp_path: Path, *, drop=(), replace: dict[str, str] | None = None) -> Path:
    """A copy of the fixture checkpoint made of symlinks, without ``drop`` and with ``replace``'s texts."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in (FIXTURES / MODEL).iterdir():
        if f.name in drop:
            continue
        if replace and f.name in replace:
            (d / f.name).write_text(replace[f.name])
        else:
            (d / f.name).symlink_to(f)
    return d


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty output directory (also the cwd); the expensive stages fail the test if started."""
    w = tmp_path / "work"
    w.mkdir()
    monkeypatch.chdir(w)
    import alphaq.spectral.analyze
    import alphaq.damage.run
    import convert.hf_to_gguf

    def started(*a, **k):
        raise AssertionError("an expensive stage started before the input was refused")

    monkeypatch.setattr(convert.hf_to_gguf, "start_convert_hf", started)
    monkeypatch.setattr(convert.hf_to_gguf, "convert_hf", started)
    monkeypatch.setattr(alphaq.spectral.analyze, "analyze_weight", started)
    monkeypatch.setattr(alphaq.damage.run, "self_calibrate", started)
    return w


def refused(argv: list[str], capsys, work: Path) -> str:
    """Run the CLI; assert the user-error contract; return the one line."""
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert list(work.iterdir()) == [], "nothing may be written"
    return err[0]


def command_args(command: str, model: Path, work: Path) -> list[str]:
    return {"convert": ["convert", str(model), "-o", str(work / "o.gguf")],
            "plan": ["plan", str(model), "--budget", "3", "--json", str(work / "p.json")],
            "analyze": ["analyze", str(model), "--csv", str(work / "a.csv")]}[command]


@pytest.mark.parametrize("command", ["convert", "plan", "analyze"])
def test_unparseable_config_json_names_the_file_and_the_position(command, tmp_path, work, capsys):
    good = (FIXTURES / MODEL / "config.json").read_text()
    bad = good.replace('"architectures"', '"architectures" [', 1)  # a missing colon on line 2 or 3
    d = checkpoint(tmp_path, replace={"config.json": bad})
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(bad)
    line = refused(command_args(command, d, work), capsys, work)
    assert f"{d / 'config.json'} is not valid JSON" in line
    assert f"line {want.value.lineno} column {want.value.colno}" in line


def test_missing_tokenizer_files_are_named_before_converting(tmp_path, work, capsys):
    d = checkpoint(tmp_path, drop=("tokenizer.json", "tokenizer.model"))
    line = refused(["convert", str(d), "-o", str(work / "o.gguf")], capsys, work)
    assert "no tokenizer llama.cpp's converter can read" in line
    assert "missing: tokenizer.model, tokenizer.json, vocab.json, merges.txt" in line
    assert "sentencepiece or tiktoken" not in line


def test_a_tokenizer_shipped_as_code_is_accepted(tmp_path, work, capsys, monkeypatch):
    """Kimi K2's, Kimi-Linear's and Hunyuan's layout: no tokenizer.json or tokenizer.model, a
    tiktoken vocabulary and the tokenizer's own .py, named by tokenizer_config.json's auto_map (which
    llama.cpp's converter loads with trust_remote_code): not refused up front; without its .py it is,
    naming what is missing. The tiktoken package that code imports is installed."""
    import importlib.util

    import alphaq.pipeline.convert as convert_mod
    from convert.hf_to_gguf import remote_tokenizer_module

    config = json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}})
    d = checkpoint(tmp_path, drop=("tokenizer.json", "tokenizer.model"), replace={"tokenizer_config.json": config})
    (d / "tiktoken.model").write_text("IQ== 0\n")
    assert remote_tokenizer_module(d) is None  # the code is not there
    line = refused(["convert", str(d), "-o", str(work / "o.gguf")], capsys, work)
    assert "tokenizer_config.json's auto_map and its .py file" in line
    (d / "tokenization_kimi.py").write_text("# the tokenizer's code\n")
    assert remote_tokenizer_module(d) == d / "tokenization_kimi.py"

    class Reached(BaseException):  # (not an Exception: the CLI would report that as a bug)
        pass

    def converter(*a, **k):
        raise Reached

    monkeypatch.setattr(convert_mod, "_float_model", converter)
    with pytest.raises(Reached):
        cli_main(["convert", str(d), "-o", str(work / "o.gguf"), "--no-progress"])
    assert importlib.util.find_spec("tiktoken") is not None


@pytest.mark.parametrize("args, needle", [
    (["--budget", "0.2"], "--budget 0.2 is below the smallest achievable with these types (14 from IQ1_S to Q8_0) "
                          "for ckpt; achievable range "),
    (["--fast", "--bpw", "5"], "--bpw 5 is above the largest achievable with these types (IQ1_S,Q2_K,Q3_K,Q4_K) "
                               "for ckpt; achievable range "),
    (["--fast", "--budget", "2", "--types", "Q4_K,Q6_K"], "--budget 2 is below the smallest achievable with these "
                                                          "types (Q4_K,Q6_K) for ckpt; achievable range "),
    (["--target-size", "100KiB"], "--target-size 100.000 KiB (102400 B) is below the smallest file"),
    (["--target-size", "1GB"], "--target-size 953.674 MiB (1000000000 B) is above the largest file"),
])
def test_impossible_budget_is_refused_before_converting(args, needle, tmp_path, work, capsys):
    """From the safetensors headers and the candidate types alone: the converter (which would
    take minutes on a real model) and the analysis never start."""
    line = refused(["convert", str(checkpoint(tmp_path)), *args, "-o", str(work / "o.gguf")], capsys, work)
    assert needle in line
    assert "achievable range" in line


def test_impossible_budget_is_refused_before_the_plan_analyses(tmp_path, work, capsys):
    line = refused(["plan", str(checkpoint(tmp_path)), "--budget", "0.2", "--json", str(work / "p.json")],
                   capsys, work)
    assert "--budget 0.2 is below the smallest achievable" in line and "achievable range " in line


@pytest.mark.parametrize("mode", ["bits", "bpw"])
def test_the_early_range_is_the_solvers_exact_range(mode, float_ggufs):
    """bits and bpw from shapes alone (HF headers, or the GGUF's) are the range the solver itself
    reports after all the work (below it: its own error), and its plan at the low end averages
    exactly that."""
    import re

    from gguf import GGMLQuantizationType

    from alphaq.pipeline.convert import tensor_infos
    from alphaq.allocate.feasibility import matrix_tensors
    from alphaq.allocate.plan import MODES, PlanConfig, budget_range, make_plan
    from alphaq.model.weights import open_model

    gguf_file = float_ggufs[MODEL]
    tensors = tensor_infos(gguf_file)
    cfg = PlanConfig(**{**MODES["damage"], "budget_mode": mode, "budget": 3.0})
    with open_model(FIXTURES / MODEL) as w:
        mats = w.matrices()
    experts = {m.tensor for m in mats if m.expert is not None}
    early = budget_range(tensors, cfg, experts)
    assert budget_range(matrix_tensors(mats), cfg, experts) == early  # the HF headers tell the same
    flat = {(t.name, None): {q.name: 1.0 for q in GGMLQuantizationType} for t in tensors}  # any costs do
    with pytest.raises(alphaq.BudgetError) as exc:
        make_plan([], tensors, PlanConfig(**{**cfg.__dict__, "budget": early.low * 0.999}), damage=flat)
    lo, hi = map(float, re.search(r"achievable range for these types: (\S+) \.\. (\S+)", str(exc.value)).groups())
    assert (lo, hi) == (round(early.low, 4), round(early.high, 4))
    at_low = make_plan([], tensors, PlanConfig(**{**cfg.__dict__, "budget": early.low}), damage=flat).totals
    assert (at_low.nominal_bits if mode == "bits" else at_low.true_bpw) == pytest.approx(early.low, rel=1e-12)


def test_the_size_range_contains_what_the_solver_finds(float_ggufs):
    """The file-size range checked before any work is a safe outer bound of the exact one: the
    smallest and largest plans the solver makes for the BF16 GGUF lie inside the range of both
    the GGUF and the HF checkpoint, and 10 % below the smallest is refused."""
    from alphaq.pipeline.convert import tensor_infos
    from alphaq.allocate.feasibility import check_budget
    from alphaq.allocate.plan import MODES, PlanConfig, budget_range

    hf, gguf_file = FIXTURES / MODEL, float_ggufs[MODEL]
    fast = {**MODES["fast"], "budget": 3.0}
    experts = {t.name for t in tensor_infos(gguf_file) if "_exps" in t.name}
    bits = budget_range(tensor_infos(gguf_file), PlanConfig(**fast), experts)
    low = alphaq.plan(gguf_file, budget=bits.low).totals.predicted_file_bytes  # every expert at its smallest
    high = alphaq.plan(gguf_file, budget=bits.high).totals.predicted_file_bytes  # ... and at its largest
    for model in (hf, gguf_file):
        for size in (low, high):
            check_budget(model, PlanConfig(**{**fast, "budget_mode": "size", "budget": size}))  # accepted
    with pytest.raises(alphaq.BudgetError, match="below the smallest"):
        check_budget(gguf_file, PlanConfig(**{**fast, "budget_mode": "size", "budget": low * 0.9}))


def test_the_budget_is_checked_once_before_any_work(tmp_path, work, monkeypatch):
    """convert checks the budget once (alphaq.allocate.feasibility.check_budget into alphaq.allocate.plan's check):
    the shapes are derived once, the plan's checks and the range run once each."""
    import alphaq.allocate.feasibility
    import alphaq.allocate.plan

    calls = {"matrix_tensors": 0, "_setup": 0, "check_budget_range": 0}

    def counted(module, name):
        real = getattr(module, name)

        def spy(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, spy)

    counted(alphaq.allocate.feasibility, "matrix_tensors")
    counted(alphaq.allocate.plan, "_setup")
    counted(alphaq.allocate.plan, "check_budget_range")
    import alphaq.pipeline.convert as convert_mod

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(convert_mod, "_float_model", reached)
    with pytest.raises(Reached):
        alphaq.convert(checkpoint(tmp_path), work / "o.gguf", budget=3, mode="fast")
    assert calls == {"matrix_tensors": 1, "_setup": 1, "check_budget_range": 1}


def test_pins_move_the_reachable_range(tmp_path):
    """The range from shapes holds without pins only: a tensor pinned above the candidates lifts
    the largest bpw, so the range is not checked then (make_plan's own checks are)."""
    from alphaq.allocate.feasibility import check_budget
    from alphaq.allocate.plan import MODES, PlanConfig

    cfg = {**MODES["fast"], "budget_mode": "bpw", "budget": 5.0}
    with pytest.raises(alphaq.BudgetError, match="--bpw 5 is above the largest achievable"):
        check_budget(FIXTURES / MODEL, PlanConfig(**cfg))
    pins = check_budget(FIXTURES / MODEL, PlanConfig(**cfg, tensor_types=(("ffn_down_exps", "Q8_0"),)))
    assert pins.types and all("ffn_down_exps" in n for n in pins.types)
    with pytest.raises(alphaq.BudgetError, match="with the pinned tensors"):
        check_budget(FIXTURES / MODEL, PlanConfig(**{**cfg, "budget": 3.0}, tensor_types=(("ffn_down_exps", "Q8_0"),)))


def test_quantiser_failure_is_a_quantize_error_with_llama_cpps_reason(tmp_path):
    from alphaq.gguf.quantize import quantize_stock

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(alphaq.QuantizeError, match=r"failed on .*junk\.gguf \(Q4_K_M\): .*failed to load model"):
        quantize_stock(junk, tmp_path / "out.gguf", "Q4_K_M")


def test_python_front_door_raises_the_kinds(tmp_path, work):
    d = checkpoint(tmp_path, drop=("tokenizer.json", "tokenizer.model"))
    with pytest.raises(alphaq.InputError, match="tokenizer"):
        alphaq.convert(d, work / "o.gguf")
    with pytest.raises(alphaq.BudgetError, match="achievable range"):
        alphaq.convert(FIXTURES / MODEL, work / "o.gguf", budget=0.2)
    with pytest.raises(alphaq.InputError, match="does not exist"):
        alphaq.plan(tmp_path / "missing.gguf", budget=3)
    assert issubclass(alphaq.BudgetError, alphaq.AlphaQError) and issubclass(alphaq.InputError, alphaq.AlphaQError)
    assert list(work.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# internal errors (bugs): one line and exit code 1; --debug shows the traceback
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def crashing(monkeypatch):
    import alphaq.pipeline.convert as convert_mod

    def crash(cfg, announce=None):
        raise ValueError("something\nbroke")

    monkeypatch.setattr(convert_mod, "run_convert", crash)


def test_an_internal_error_is_one_line_that_points_to_debug(crashing, capsys, tmp_path):
    code = cli_main(["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "internal error" in err[0] and "ValueError: something broke" in err[0] and "--debug" in err[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, crashing, capsys, tmp_path):
    argv = ["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf")]
    code = cli_main(["--debug", *argv] if where == "before" else [*argv, "--debug"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and 'raise ValueError("something\\nbroke")' in err
    assert "internal error" in err.strip().splitlines()[-1]


def test_debug_given_before_the_command_is_not_reset_by_it():
    from alphaq.cli import build_parser

    args = build_parser().parse_args(["--debug", "eval", "m.gguf", "--text", "t.txt"])
    assert args.debug is True
    assert build_parser().parse_args(["eval", "m.gguf", "--text", "t.txt"]).__dict__.get("debug", False) is False


def test_the_real_cli_prints_exactly_one_line(tmp_path):
    """Outside pytest the CLI logs at INFO to stderr: a refused input still prints one line only."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "alphaq.cli", "convert", str(FIXTURES / MODEL), "--budget", "0.2",
                           "-o", str(tmp_path / "o.gguf")], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "achievable range" in proc.stderr, proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [(["--max-windows", "0"], "--max-windows 0 must be at least 1"),
                                          (["--n-ctx", "4"], "--n-ctx 4 must be at least 8")])
def test_eval_refuses_bad_window_settings_in_one_line(args, needle, float_ggufs, capsys):
    text = Path(__file__).parent / "fixtures" / "heldout" / "prose.txt"
    code = cli_main(["eval", str(float_ggufs["mixtral"]), "--text", str(text), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
