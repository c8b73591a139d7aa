"""A Q8_0 GGUF as the source (llama-quantize's --allow-requantize): refused without the flag, read
dequantised with it, and every stage of the default path runs on it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from alphaq.cli import main as cli_main
from alphaq.gguf.io import check_finite, read_tensors
from alphaq.gguf.quantize import quantize_stock
from alphaq.gguf.stock import stock_size
from alphaq.model.weights import open_model

MODEL = "qwen2moe"


@pytest.fixture(scope="module")
def q8_gguf(float_ggufs, tmp_path_factory):
    path = tmp_path_factory.mktemp("q8") / "model-q8_0.gguf"
    quantize_stock(float_ggufs[MODEL], path, "Q8_0")
    assert any(t.type == gguf.GGMLQuantizationType.Q8_0 for t in read_tensors(path))
    return path


def _convert(model, out, *args):
    return cli_main(["convert", str(model), "-o", str(out), "--no-progress", "--self-samples", "4",
                     "--self-ctx", "64", *args])


def _q8_0_numpy(raw: np.ndarray) -> np.ndarray:
    """Q8_0 rows of bytes -> float32 by ggml's definition: blocks of an F16 scale d and 32 int8 q, w = d * q."""
    blocks = np.ascontiguousarray(raw).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(*raw.shape[:-1], -1)


def test_reader_dequantises_q8_0_as_ggml_defines_it(q8_gguf, float_ggufs):
    reader = gguf.GGUFReader(q8_gguf)
    raw = {t.name: t for t in reader.tensors}
    with open_model(q8_gguf) as q8, open_model(float_ggufs[MODEL]) as bf16:
        floats = {(m.tensor, m.expert): m for m in bf16.matrices()}
        matrices = q8.matrices()
        assert {m.dtype for m in matrices} == {"Q8_0"}
        for m in matrices:
            t = raw[m.tensor]
            data = np.asarray(t.data) if m.expert is None else np.asarray(t.data)[m.expert]
            w = m.load()
            np.testing.assert_array_equal(w, _q8_0_numpy(data).reshape(w.shape))
            ref = floats[(m.tensor, m.expert)].load()
            # within Q8_0's rounding of the float weights: half a step d = max|w| / 127 of the block,
            # plus the F16 rounding of d itself (at most 2^-11 d, times |q| <= 127)
            step = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(w - ref).reshape(-1, 32) <= (0.5 + 127 * 2.0**-11) * step * 1.001 + 1e-9).all(), m.tensor


def test_q8_0_source_needs_allow_requantize(q8_gguf, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    assert _convert(q8_gguf, out, "--budget", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-requantize" in err[0] and "Q8_0" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_lower_types_are_refused_even_with_the_flag(float_ggufs, tmp_path, capsys):
    q = tmp_path / "q.gguf"
    quantize_stock(float_ggufs[MODEL], q, "Q4_K_M")
    for flags in ((), ("--allow-requantize",)):
        out = tmp_path / "o.gguf"
        assert _convert(q, out, "--budget", "3", *flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already quantised" in err[0] and "a Q8_0 one with --allow-requantize" in err[0], err
        assert not out.exists()


def test_default_mode_runs_on_a_q8_0_source(q8_gguf, float_ggufs, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    # --working-copy q8_0 asked for: a Q8_0 source is its own copy, none is written
    assert _convert(q8_gguf, out, "--like", "Q4_K_M", "--allow-requantize", "--working-copy", "q8_0") == 0
    text = capsys.readouterr().out
    assert "forward stages memory-map the Q8_0 model" in text and "working copy" not in text
    assert "holds Q8_0 weights: they are read dequantised" in text  # the summary repeats the warning
    assert "nearest is llama.cpp Q4_K_M" in text
    assert stock_size(q8_gguf, "Q4_K_M", 32) == stock_size(float_ggufs[MODEL], "Q4_K_M", 32)
    assert out.stat().st_size <= stock_size(float_ggufs[MODEL], "Q4_K_M", 32)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert llm.create_completion("def", max_tokens=4)["choices"][0]["text"] is not None


def test_fast_mode_takes_a_q8_0_source(q8_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    assert cli_main(["convert", str(q8_gguf), "-o", str(out), "--no-progress", "--fast", "--budget", "3",
                     "--allow-requantize"]) == 0
    assert out.exists()


def test_a_nan_scale_in_a_q8_0_tensor_is_found(q8_gguf, tmp_path):
    from alphaq.errors import InputError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(q8_gguf.read_bytes())
    t = next(t for t in gguf.GGUFReader(bad).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    with open(bad, "r+b") as f:  # the first block's F16 scale -> NaN
        f.seek(int(t.data_offset))
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(InputError, match=f"tensor {t.name} has 1 NaN"):
        check_finite(bad)


def test_analyze_and_plan_say_they_read_q8_0(q8_gguf, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    assert cli_main(["analyze", str(q8_gguf), "--csv", str(tmp_path / "a.csv"), "--no-progress"]) == 0
    assert cli_main(["plan", str(q8_gguf), "--budget", "3", "--alphas", str(tmp_path / "a.csv"),
                     "--json", str(tmp_path / "p.json")]) == 0
    said = [r.getMessage() for r in caplog.records if "holds Q8_0 weights" in r.getMessage()]
    assert len(said) == 2, said


def test_analyze_refuses_a_lower_type_without_first_saying_it_reads_it(float_ggufs, tmp_path, caplog, capsys):
    import logging

    q = tmp_path / "q.gguf"
    quantize_stock(float_ggufs[MODEL], q, "Q6_K")
    caplog.set_level(logging.WARNING)
    assert cli_main(["analyze", str(q), "--csv", str(tmp_path / "a.csv"), "--no-progress"]) == 2
    assert not [r for r in caplog.records if "read dequantised" in r.getMessage()]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a lower type's rounding would be measured" in err[0], err
