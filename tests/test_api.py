"""The Python front door: alphaq.convert / plan / analyze."""

from __future__ import annotations

import pytest

import alphaq


def test_convert_from_python_is_quiet_and_returns_the_result(float_ggufs, tmp_path, capfd):
    out = tmp_path / "o.gguf"
    r = alphaq.convert(float_ggufs["mixtral"], out, like="Q3_K_M")
    assert r.output == out and out.exists() and r.file_bytes == out.stat().st_size
    assert r.imatrix_source == "self" and r.like[0] == "Q3_K_M"
    err = capfd.readouterr().err
    assert "it/s" not in err and "tensor/s" not in err and "%|" not in err  # no progress bars


def test_plan_and_analyze_from_python(float_ggufs):
    stats = alphaq.analyze(float_ggufs["qwen3moe"])
    assert stats and all(s.tensor for s in stats)
    p = alphaq.plan(float_ggufs["qwen3moe"], target_size="2MiB")
    assert p.totals.predicted_file_bytes <= 2 * 2**20
    from alphaq.pipeline.convert import run_convert  # the modules stay importable beside the callables

    assert callable(run_convert) and callable(alphaq.convert)


@pytest.mark.parametrize("call, needle", [
    (lambda m, o: alphaq.convert(m, o, budget=3, bpw=4), "budget and bpw"),
    (lambda m, o: alphaq.convert(m, o, colour="blue"), "unknown option(s) colour"),
    (lambda m, o: alphaq.convert(m, o, mode="best"), "mode 'best'"),
    (lambda m, o: alphaq.plan(m, mode="damage"), "use alphaq.convert"),
])
def test_mistakes_raise_alphaq_errors(call, needle, float_ggufs, tmp_path):
    with pytest.raises(alphaq.AlphaQError, match=None) as exc:
        call(float_ggufs["mixtral"], tmp_path / "o.gguf")
    assert needle in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, needle", [
    (lambda m, o: alphaq.plan(m, budget=0.5), "budget 0.5 is below the smallest achievable"),
    (lambda m, o: alphaq.plan(m, bpw=0.1), "bpw 0.1 is below"),
    (lambda m, o: alphaq.plan(m, budget=3, tensor_type="attn_v"), "tensor_type 'attn_v' has no '='"),
    (lambda m, o: alphaq.plan(m, budget=3, output_tensor_type="q9"), "output_tensor_type: unknown quant type 'q9'"),
    (lambda m, o: alphaq.convert(m, o, budget=3, split_max_size="3Q"), "split_max_size '3Q'"),
    (lambda m, o: alphaq.convert(m, o, budget=3, keep_bf16=o.with_name("b.gguf"), dry_run=True),
     "keep_bf16 writes a file and dry_run=True writes none"),
    (lambda m, o: alphaq.convert(m, m, budget=3, force=True), "(force=True replaces outputs, never an input)"),
])
def test_errors_name_the_keywords_not_the_command_line_flags(call, needle, float_ggufs, tmp_path):
    """The checks are the CLI's; from Python the message names the keyword the caller passed."""
    with pytest.raises(alphaq.AlphaQError) as exc:
        call(float_ggufs["mixtral"], tmp_path / "o.gguf")
    assert needle in str(exc.value) and "--" not in str(exc.value), exc.value
    assert list(tmp_path.iterdir()) == []


def test_python_spelling_of_flags():
    from alphaq.api import python_spelling

    assert python_spelling("--target-size 1KiB needs a GGUF; use --budget or --bpw") == \
        "target_size 1KiB needs a GGUF; use budget or bpw"
    assert python_spelling("exists; pass --force (and --no-resume)") == "exists; pass force=True (and resume=False)"
    assert python_spelling("--threads -1 must be >= 0; --damage-windows 3") == \
        "nthread -1 must be >= 0; damage=DamageConfig(n_windows=...) 3"
    assert python_spelling("a-b--c and x --") == "a-b--c and x --"  # no flag: unchanged
