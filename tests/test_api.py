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
