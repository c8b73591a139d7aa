"""The default convert path (damage on the model's own text) end to end, through the CLI."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from alphaq.cli import main as cli_main
from alphaq.gguf.stock import stock_size
from alphaq.gguf.io import read_tensors
from alphaq.importance.imatrix_file import Imatrix, read_imatrix, write_imatrix
from alphaq.gguf.qtypes import llama_quantizes


def _convert(model, out, *args):
    return cli_main(["convert", str(model), "-o", str(out), "--no-progress", "--self-samples", "4",
                     "--self-ctx", "64", *args])


@pytest.mark.parametrize("mix", ["IQ1_S", "Q4_K_M", "Q6_K"])
def test_like_reaches_every_size_and_stays_within_it(mix, float_ggufs, tmp_path, capsys):
    model = float_ggufs["qwen2moe"]
    out = tmp_path / "o.gguf"
    assert _convert(model, out, "--like", mix) == 0
    text = capsys.readouterr().out
    assert f"{mix}'s size for this model" in text
    assert f"nearest is llama.cpp {mix}:" in text  # every mix compared, not just Q2_K..Q4_K_M
    assert "no calibration data" in text
    [private] = [ln for ln in text.splitlines() if ln.startswith("  private ")]
    for stage in ("float model", "self text", "importance", "damage", "plan", "quantise"):
        assert f" {stage} " in private  # each stage's peak private memory, in GiB
    limit = stock_size(model, mix, 32)
    assert 0.9 * limit < out.stat().st_size <= limit
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"def main():")) > 0
    assert llm.create_completion("def", max_tokens=4)["choices"][0]["text"] is not None


def test_every_quantised_tensor_is_allocated_with_the_full_ladder(float_ggufs, tmp_path):
    import json

    model = float_ggufs["mixtral"]
    out = tmp_path / "o.gguf"
    assert _convert(model, out, "--target-size", "2MiB") == 0
    plan = json.loads(out.with_name("o.plan.json").read_text())
    allocated = {it["tensor"] for it in plan["items"]}
    quantised = {t.name for t in read_tensors(model) if llama_quantizes(t.name, t.shape)}
    assert allocated == quantised  # token_embd and output included
    assert {"IQ1_S", "IQ3_XXS", "Q8_0"} <= set(plan["settings"]["types"])
    assert plan["settings"]["noise"] == "damage" and plan["settings"]["allocate"] == "every"
    assert all(f["quantised"] is False for f in plan["fixed"])


def test_budget_bpw_and_target_size_work_with_the_default(float_ggufs, tmp_path):
    model = float_ggufs["mixtral"]
    for i, args in enumerate((["--budget", "3"], ["--bpw", "4.5"], ["--target-size", "1.8MiB"])):
        assert _convert(model, tmp_path / f"o{i}.gguf", *args) == 0
    assert (tmp_path / "o2.gguf").stat().st_size <= int(1.8 * 2**20)


def test_outputs_and_self_text_are_byte_identical_across_runs(float_ggufs, tmp_path):
    model = float_ggufs["qwen3moe"]
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert _convert(model, a, "--like", "Q3_K_M", "--no-cache") == 0
    assert _convert(model, b, "--like", "Q3_K_M", "--no-cache") == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.with_name("a.imatrix.gguf").read_bytes() == b.with_name("b.imatrix.gguf").read_bytes()


def test_saved_importance_matrix_is_llama_cpps_statistic_and_reads_back(float_ggufs, tmp_path):
    model = float_ggufs["mixtral"]
    out = tmp_path / "o.gguf"
    assert _convert(model, out, "--budget", "3") == 0
    im = read_imatrix(out.with_name("o.imatrix.gguf"))
    shapes = {t.name: t.shape for t in read_tensors(model)}
    for name, sums in im.sums.items():
        n_mat = shapes[name][0] if len(shapes[name]) == 3 else 1
        assert sums.shape == (n_mat, shapes[name][-1])
    # routed experts: top-2 of 8, every token counted twice over a tensor's experts
    assert im.counts["blk.0.ffn_up_exps.weight"].sum() == 2 * 4 * 64
    assert im.datasets and "self text" in im.datasets[0]
    reader = gguf.GGUFReader(out.with_name("o.imatrix.gguf"))
    assert reader.get_field("general.type").contents() == "imatrix"


@pytest.mark.parametrize("legacy", [False, True])
def test_a_users_imatrix_file_is_used(legacy, float_ggufs, tmp_path, capsys):
    model = float_ggufs["mixtral"]
    shapes = {t.name: t.shape for t in read_tensors(model) if llama_quantizes(t.name, t.shape)
              and t.name != "token_embd.weight"}
    rng = np.random.default_rng(0)
    sums = {n: rng.uniform(0.5, 2, (s[0] if len(s) == 3 else 1, s[-1])).astype(np.float32) for n, s in shapes.items()}
    counts = {n: np.full(v.shape[0], 3.0) for n, v in sums.items()}
    path = tmp_path / ("user.dat" if legacy else "user.imatrix.gguf")
    write_imatrix(path, Imatrix(sums, counts, ["user text"], 3, 1), legacy=legacy)
    out = tmp_path / "o.gguf"
    assert _convert(model, out, "--like", "IQ2_XXS", "--imatrix", str(path)) == 0
    assert str(path) in capsys.readouterr().out
    saved = read_imatrix(out.with_name("o.imatrix.gguf")).means()
    want = read_imatrix(path).means()
    for n in want:
        np.testing.assert_allclose(saved[n], want[n], rtol=1e-6)


def test_fast_and_paper_modes_run_no_forward_pass(float_ggufs, tmp_path, monkeypatch):
    import alphaq.runtime.forward

    def refuse(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(alphaq.runtime.forward.Session, "__init__", refuse)
    for mode in ("--fast", "--paper"):
        out = tmp_path / f"o{mode}.gguf"
        assert _convert(float_ggufs["mixtral"], out, mode, "--budget", "3") == 0
        assert not out.with_name(out.name[:-5] + ".imatrix.gguf").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--like", "Q9_K"], "unknown llama.cpp mix 'Q9_K'"),
    (["--like", "Q4_K_M", "--budget", "3"], "--budget and --like"),
    (["--imatrix", "/nonexistent/x.dat"], "x.dat"),
    (["--fast", "--imatrix", "/nonexistent/x.dat"], "--imatrix is used by the default"),
    # --like's size is known before any work for a GGUF: pins or types that cannot meet it are refused then
    (["--like", "IQ1_S", "--tensor-type", "exps=q8_0"], "alone take"),
    (["--like", "Q3_K_M", "--types", "Q6_K,Q8_0"], "--like Q3_K_M: its size"),
    (["--fast", "--like", "Q8_0"], "--like Q8_0: its size"),
])
def test_bad_default_path_options_are_one_line(argv, needle, float_ggufs, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    assert _convert(float_ggufs["mixtral"], out, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == []


def test_like_is_checked_before_the_forward_stages_of_an_hf_checkpoint(tmp_path, capsys, monkeypatch):
    import alphaq.pipeline.convert as convert_mod
    from tests.conftest import FIXTURES

    monkeypatch.setattr(convert_mod, "_self_calibration", lambda *a, **k: pytest.fail("reached the forward stages"))
    out = tmp_path / "o.gguf"
    assert _convert(FIXTURES / "mixtral", out, "--like", "Q3_K_M", "--types", "Q6_K,Q8_0") == 2
    assert "--like Q3_K_M: its size" in capsys.readouterr().err
    assert not out.exists()


def test_an_imatrix_that_does_not_fit_the_model_is_refused_before_any_work(float_ggufs, tmp_path, capsys,
                                                                          monkeypatch):
    import alphaq.pipeline.convert as convert_mod

    monkeypatch.setattr(convert_mod, "_float_model", lambda *a, **k: pytest.fail("reached the float model stage"))
    other = float_ggufs["qwen2moe"]  # its expert tensors have other shapes than mixtral's
    shapes = {t.name: t.shape for t in read_tensors(other) if llama_quantizes(t.name, t.shape)}
    sums = {n: np.ones((s[0] if len(s) == 3 else 1, s[-1]), np.float32) for n, s in shapes.items()}
    theirs = tmp_path / "qwen.imatrix.gguf"
    write_imatrix(theirs, Imatrix(sums, {n: np.ones(v.shape[0]) for n, v in sums.items()}, ["x"], 1, 1))
    work = tmp_path / "work"
    work.mkdir()
    for imatrix, needle in ((theirs, "an importance matrix of another model?"),
                            (other, "not a llama.cpp imatrix file")):  # a model file given as the imatrix
        assert _convert(float_ggufs["mixtral"], work / "o.gguf", "--like", "Q3_K_M", "--imatrix", str(imatrix)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(imatrix) in err[0], err
    assert list(work.iterdir()) == []


def test_expert_granularity_allocates_each_expert_on_its_damage_share(float_ggufs, tmp_path):
    import json

    model = float_ggufs["qwen2moe"]
    out = tmp_path / "o.gguf"
    assert _convert(model, out, "--like", "Q3_K_M", "--granularity", "expert") == 0
    plan = json.loads(out.with_name("o.plan.json").read_text())
    experts = [it for it in plan["items"] if it["expert"] is not None]
    n_expert = {t.name: t.shape[0] for t in read_tensors(model) if "_exps" in t.name}
    assert len(experts) == sum(n_expert.values())
    assert out.stat().st_size <= stock_size(model, "Q3_K_M", 32)


def test_make_demo_script_runs_on_a_default_conversion(float_ggufs, tmp_path):
    """`make demo`'s second command, on a file the default path wrote."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "demo.gguf"
    assert _convert(float_ggufs["mixtral"], out, "--budget", "3") == 0
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts" / "demo_generate.py"), str(out), "--tokens", "8"],
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cost damage" in res.stdout and "greedy, 8 tokens" in res.stdout
