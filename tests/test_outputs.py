"""What every command writes, checked before any work: an output is never one of the command's
inputs (not even with --force), never a directory, never named twice, in an existing directory;
files get the mode the umask gives; and mistakes in the other subcommands' input (eval, run, plan,
analyze) are one line naming the flag, before the expensive part.

Found by sweeping the subcommands as a new user (the sessions' notes, note 24)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from alphaq.cli import main as cli_main
from conftest import FIXTURES

HELDOUT = Path(__file__).parent / "fixtures" / "heldout"


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and exactly one line on stderr; return it."""
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


@pytest.fixture
def model_copy(float_ggufs, tmp_path) -> Path:
    """A private copy of the mixtral fixture's BF16 GGUF (a test may try to overwrite it)."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(float_ggufs["mixtral"], path)
    return path


@pytest.fixture
def no_analysis(monkeypatch):
    """The spectral stage fails the test if it starts."""
    import alphaq.spectral.analyze

    def started(*a, **k):
        raise AssertionError("the spectral stage started before the input was refused")

    monkeypatch.setattr(alphaq.spectral.analyze, "analyze_weight", started)


@pytest.mark.parametrize("command", ["analyze", "plan"])
def test_force_never_overwrites_the_model(command, model_copy, no_analysis, capsys):
    before = model_copy.read_bytes()
    flag = {"analyze": "--csv", "plan": "--json"}[command]
    argv = [command, str(model_copy), flag, str(model_copy), "--force"] + (["--budget", "3"] if command == "plan" else [])
    line = one_line_error(argv, capsys)
    assert f"{flag} {model_copy} is an input of this command" in line, line
    assert model_copy.read_bytes() == before


def test_eval_never_overwrites_its_text(model_copy, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    shutil.copyfile(HELDOUT / "prose.txt", text)
    before = text.read_bytes()
    line = one_line_error(["eval", str(model_copy), "--text", str(text), "--json", str(text), "--force",
                           "--no-progress"], capsys)
    assert "is an input of this command" in line and text.read_bytes() == before


def test_plan_refuses_one_file_for_two_outputs_before_analysing(model_copy, tmp_path, no_analysis, capsys):
    out = tmp_path / "same.txt"
    line = one_line_error(["plan", str(model_copy), "--budget", "3", "--json", str(out), "--tensor-types-out",
                           str(out)], capsys)
    assert "--tensor-types-out and --json both name" in line and not out.exists()


@pytest.mark.parametrize("command, flag", [("analyze", "--csv"), ("plan", "--json"), ("eval", "--json")])
def test_an_output_that_is_a_directory_is_refused_up_front(command, flag, model_copy, tmp_path, no_analysis, capsys):
    argv = {"analyze": ["analyze", str(model_copy)], "plan": ["plan", str(model_copy), "--budget", "3"],
            "eval": ["eval", str(model_copy), "--text", str(HELDOUT / "prose.txt"), "--no-progress"]}[command]
    line = one_line_error(argv + [flag, str(tmp_path), "--force"], capsys)
    assert f"{flag} {tmp_path} is a directory" in line, line


def test_analyze_refuses_a_missing_csv_directory_before_the_spectral_stage(model_copy, tmp_path, no_analysis, capsys):
    line = one_line_error(["analyze", str(model_copy), "--csv", str(tmp_path / "nodir" / "a.csv")], capsys)
    assert "does not exist" in line and "nodir" in line


def test_plots_directory_that_cannot_be_created_is_refused_and_nothing_is_left(model_copy, tmp_path, no_analysis,
                                                                                capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    csv = tmp_path / "a.csv"
    line = one_line_error(["analyze", str(model_copy), "--csv", str(csv), "--plots", str(blocker / "figs")], capsys)
    assert "--plots" in line and not csv.exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user the permission bits do not stop (root)")
        line = one_line_error(["analyze", str(model_copy), "--csv", str(csv), "--plots", str(ro / "a" / "b")], capsys)
        assert "cannot create it" in line and not csv.exists()
    finally:
        ro.chmod(0o700)


def test_a_creatable_plots_directory_is_not_left_behind_by_the_check(tmp_path):
    from alphaq.files import check_plots_dir

    check_plots_dir(tmp_path / "a" / "b", force=False)
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    from alphaq.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}\n")
        os.umask(0o077)
        atomic_write_text(tmp_path / "y.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "y.json").stat().st_mode) == 0o600


def test_plan_refuses_alphas_that_are_not_a_file(model_copy, tmp_path, no_analysis, capsys):
    line = one_line_error(["plan", str(model_copy), "--budget", "3", "--json", str(tmp_path / "p.json"),
                           "--alphas", str(tmp_path)], capsys)
    assert f"--alphas {tmp_path} is not a file" in line


@pytest.mark.parametrize("argv, needle", [(["--bpw", "0"], "--bpw 0 must be a positive number"),
                                          (["--budget", "-1"], "--budget -1 must be a positive number"),
                                          (["--budget", "3", "--fixed-bytes", "-5"], "--fixed-bytes -5 must be >= 0")])
def test_plan_names_the_flag_of_a_bad_number(argv, needle, model_copy, tmp_path, no_analysis, capsys):
    line = one_line_error(["plan", str(model_copy), "--json", str(tmp_path / "p.json"), *argv], capsys)
    assert needle in line, line


def test_no_flag_abbreviations(model_copy, tmp_path, capsys):
    # `--tensor-type` was an ambiguous prefix when plan took no pins; a prefix is never a flag
    with pytest.raises(SystemExit) as exc:
        cli_main(["plan", str(model_copy), "--budget", "3", "--json", str(tmp_path / "p.json"),
                  "--tensor-types", "tt.txt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --tensor-types" in err and "ambiguous" not in err


def test_verbose_is_taken_after_the_command_too():
    from alphaq.cli import build_parser

    assert build_parser().parse_args(["eval", "m.gguf", "--text", "t", "-v"]).verbose
    assert build_parser().parse_args(["-v", "eval", "m.gguf", "--text", "t"]).verbose
    assert not build_parser().parse_args(["eval", "m.gguf", "--text", "t"]).verbose


def test_eval_takes_llama_perplexitys_spellings():
    from alphaq.cli import build_parser

    a = build_parser().parse_args(["eval", "m.gguf", "-f", "a.txt", "--file", "b.txt", "-c", "128", "--chunks", "3",
                                   "--kl-divergence-base", "ref.gguf"])
    assert (a.text, a.n_ctx, a.max_windows, a.ref) == ([Path("a.txt"), Path("b.txt")], 128, 3, Path("ref.gguf"))


def test_eval_checks_every_text_before_scoring_any(model_copy, tmp_path, capsys, monkeypatch):
    import alphaq.evaluate.perplexity as perplexity

    def scored(*a, **k):
        raise AssertionError("a text was scored before every text was checked")

    monkeypatch.setattr(perplexity, "evaluate_text", scored)
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    line = one_line_error(["eval", str(model_copy), "--text", str(HELDOUT / "prose.txt"), "--text", str(short),
                           "--no-progress"], capsys)
    assert f"--text {short} has" in line and "fewer than one window" in line
    line = one_line_error(["eval", str(model_copy), "--text", str(tmp_path), "--no-progress"], capsys)
    assert f"--text {tmp_path} is a directory" in line


def test_eval_refuses_a_reference_with_another_vocabulary(model_copy, tmp_path, capsys, monkeypatch):
    import alphaq.evaluate.perplexity as perplexity

    real_load = perplexity.load_llama

    class OtherVocabulary:
        """The reference as llama.cpp loads it, with one token more in its vocabulary."""

        def __init__(self, llm):
            self.llm = llm

        def n_vocab(self):
            return self.llm.n_vocab() + 1

        def __getattr__(self, name):
            return getattr(self.llm, name)

    ref = tmp_path / "ref.gguf"
    shutil.copyfile(model_copy, ref)
    monkeypatch.setattr(perplexity, "load_llama",
                        lambda path, *a, **k: (OtherVocabulary if Path(path) == ref else lambda x: x)(
                            real_load(path, *a, **k)))
    line = one_line_error(["eval", str(model_copy), "--text", str(HELDOUT / "prose.txt"), "--ref", str(ref),
                           "--max-windows", "1", "--no-progress"], capsys)
    assert f"--ref {ref} has another vocabulary" in line, line


def test_run_refuses_a_seed_out_of_range_and_a_length_beyond_the_context(capsys, monkeypatch):
    import alphaq.runtime.torch_run as torch_run

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(torch_run, "load", loaded)
    hf = FIXTURES / "qwen3moe"
    line = one_line_error(["run", "m.gguf", "--hf", str(hf), "-p", "x", "-s", str(2**64)], capsys)
    assert "seed" in line and "2^63" in line
    n_ctx = torch_run.hf_context_length(hf)
    assert n_ctx and n_ctx > 1
    line = one_line_error(["run", "m.gguf", "--hf", str(hf), "-p", "x", "--n-predict", str(n_ctx)], capsys)
    assert f"-n {n_ctx} is not below the model's context of {n_ctx}" in line


def test_run_names_a_directory_given_as_the_model(tmp_path, capsys):
    line = one_line_error(["run", str(tmp_path), "--hf", str(FIXTURES / "qwen3moe"), "-p", "x"], capsys)
    assert "is a directory" in line


@pytest.mark.parametrize("call, needle", [
    (lambda m, o: __import__("alphaq").plan(m, budget="three"), "budget='three': expected a number"),
    (lambda m, o: __import__("alphaq").plan(m, budget=[3]), "budget=[3]: expected a number"),
    (lambda m, o: __import__("alphaq").plan(m, budget=True), "budget=True: expected a number"),
    (lambda m, o: __import__("alphaq").plan(m, types=5), "types=5: expected"),
    (lambda m, o: __import__("alphaq").plan(m, max_quantise_ns="auto"), "max_quantise_ns='auto' is the cap"),
    (lambda m, o: __import__("alphaq").analyze(None), "model=None: expected a path"),
    (lambda m, o: __import__("alphaq").analyze(m, cfg={"block_size": 3}), "expected an alphaq.spectral.alpha.SpectralConfig"),
    (lambda m, o: __import__("alphaq").convert(m, o, like="Q4_K_M", nthread="2", dry_run=True), "nthread='2': expected int"),
    (lambda m, o: __import__("alphaq").convert(m, o, like="Q4_K_M", max_quantise_ns="100", dry_run=True),
     "max_quantise_ns='100': expected"),
    (lambda m, o: __import__("alphaq").convert(m, o, like="Q4_K_M", force="yes", dry_run=True), "force='yes': expected bool"),
])
def test_the_python_front_door_names_a_wrong_type(call, needle, model_copy, tmp_path, no_analysis):
    import alphaq

    with pytest.raises(alphaq.AlphaQError) as exc:
        call(model_copy, tmp_path / "o.gguf")
    assert needle in str(exc.value), exc.value


def test_the_python_front_door_takes_the_clis_words(model_copy, monkeypatch):
    """gamma="paper" and max_quantise_ns="none", as --gamma paper and --max-quantise-ns none."""
    import alphaq
    import alphaq.api
    import alphaq.commands.plan

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    seen = {}
    monkeypatch.setattr(alphaq.commands.plan, "_analyze", stop)
    real = alphaq.api._plan_config

    def spy(*a, **k):
        seen["cfg"] = real(*a, **k)
        return seen["cfg"]

    monkeypatch.setattr(alphaq.api, "_plan_config", spy)
    with pytest.raises(Stop):  # stopped where the analysis would start
        alphaq.plan(model_copy, budget=3, gamma="paper", max_quantise_ns="none")
    assert seen["cfg"].gamma is None and seen["cfg"].max_quantise_ns is None


def test_plan_takes_no_progress(model_copy, tmp_path, capsys):
    argv = ["plan", str(model_copy), "--budget", "3", "--json", str(tmp_path / "p.json"), "--no-cache"]
    assert cli_main(argv + ["--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err
    assert cli_main(argv + ["--force"]) == 0
    assert "%|" in capsys.readouterr().err  # (the bar, when it is wanted)


@pytest.mark.parametrize("size, fixed", [("2MiB", "5000000"), ("1TB", "0")])
def test_plan_checks_a_size_with_stated_fixed_bytes_before_analysing(size, fixed, model_copy, tmp_path, no_analysis,
                                                                     capsys):
    line = one_line_error(["plan", str(model_copy), "--target-size", size, "--fixed-bytes", fixed, "--json",
                           str(tmp_path / "p.json")], capsys)
    assert "achievable range" in line, line


def test_analyze_refuses_a_cache_dir_that_is_a_file(model_copy, tmp_path, no_analysis, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("x")
    line = one_line_error(["analyze", str(model_copy), "--csv", str(tmp_path / "a.csv"), "--cache-dir", str(blocker)],
                          capsys)
    assert f"--cache-dir {blocker} is a file" in line


def test_python_plan_is_the_clis_plan_also_for_a_checkpoint(tmp_path):
    """alphaq.plan reads what `alphaq plan` reads (it refused an HF checkpoint) and plans the same."""
    import json

    import alphaq

    hf = FIXTURES / "qwen3moe"
    out = tmp_path / "p.json"
    assert cli_main(["plan", str(hf), "--budget", "3", "--json", str(out), "--no-progress"]) == 0
    assert alphaq.plan(hf, budget=3).to_dict() == json.loads(out.read_text())


def test_eval_takes_threads_and_warns_beyond_the_trained_context(model_copy, tmp_path, capsys, caplog, monkeypatch):
    import logging

    import alphaq.evaluate.perplexity as perplexity

    seen = []
    real = perplexity.load_llama
    monkeypatch.setattr(perplexity, "load_llama", lambda *a, **k: seen.append(k.get("n_threads")) or real(*a, **k))
    monkeypatch.setattr(perplexity, "trained_context", lambda llm: 64)  # the fixture was trained on 2048
    caplog.set_level(logging.WARNING)
    assert cli_main(["eval", str(model_copy), "-f", str(HELDOUT / "prose.txt"), "-c", "128", "--chunks", "1",
                     "-t", "1", "--no-progress"]) == 0
    assert seen == [1]
    assert any("--n-ctx 128 is beyond the 64 tokens" in r.getMessage() for r in caplog.records)
    line = one_line_error(["eval", str(model_copy), "-f", str(HELDOUT / "prose.txt"), "-t", "0"], capsys)
    assert "--threads 0 must be at least 1" in line
