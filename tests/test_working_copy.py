"""The forward stages on a Q8_0 working copy (--working-copy): models larger than RAM.

* the copy's weights are found, read and fake-quantised in llama.cpp's buffer like a float
  model's: the swapped bytes are ggml's Q8_0 of the fake-quantised values, restored bit for bit;
* the stages run end to end on it, cached apart from the float model's, and the copy is deleted;
* `auto` chooses the copy exactly when the float model does not fit in available RAM;
* the conversion says what the stages ran on, and a bad value fails before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from alphaq.damage import DamageConfig, Reference, Swap, from_float32, quant_dequant, to_float32
from alphaq.damage.measure import measure
from alphaq.damage.run import self_calibrate
from alphaq.errors import AlphaQError, InputError
from alphaq.gguf.qtypes import llama_quantizes
from alphaq.gguf.quantize import quantize_stock
from alphaq.pipeline.preflight import choose_working_copy, working_copy_bytes
from alphaq.runtime.forward import GGML_TYPE_Q8_0, Session
from alphaq.selftext import SelfTextConfig, sample

Q4_K, Q8_0 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0
TEXT = SelfTextConfig(n_seq=4, n_ctx=64, seed=3)


@pytest.fixture(scope="module")
def q8_copy(float_ggufs, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "mixtral-q8_0.gguf"
    quantize_stock(float_ggufs["mixtral"], out, "Q8_0")
    return out


def test_swap_in_a_q8_0_buffer_writes_the_q8_0_of_the_fake_quantised_weight_and_restores_it(q8_copy):
    with Session(q8_copy, 64) as s:
        name = next(n for n in s.weights if "ffn_down_exps" in n)
        buf = s.weights[name]
        assert buf.ggml_type == GGML_TYPE_Q8_0
        before = buf.view().copy()
        assert before.shape == (*buf.shape[:-1], buf.shape[-1] // 32 * 34)  # raw Q8_0 rows
        tokens = [s.bos, 5, 9, 11, 3]
        logits = s.logits(tokens)
        with Swap(buf, Q4_K, None):
            for e in range(buf.shape[0]):
                w = to_float32(before[e], buf.ggml_type)
                expected = from_float32(quant_dequant(w, Q4_K, None), buf.ggml_type)
                assert np.array_equal(buf.view()[e], expected)
            assert not np.allclose(s.logits(tokens), logits)  # the model runs the swapped weight
        assert np.array_equal(buf.view(), before)
        assert np.array_equal(s.logits(tokens), logits)


def test_q8_0_round_trip_of_the_buffer_is_ggml_and_gguf_py():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    raw = from_float32(w, GGML_TYPE_Q8_0)
    assert raw.dtype == np.uint8 and raw.shape == (8, 2 * 34)
    back = to_float32(raw, GGML_TYPE_Q8_0)
    assert back.shape == w.shape and np.abs(back - w).max() <= np.abs(w).max() / 127 + 1e-6
    assert np.array_equal(from_float32(back, GGML_TYPE_Q8_0), raw)  # Q8_0 of Q8_0 values is exact


def test_damage_on_the_copy_follows_the_float_models_on_the_same_text(float_ggufs, q8_copy):
    """Same windows, every tensor llama.cpp quantises, at Q4_K: the copy's damage ranks the tensors
    like the float model's (measured: Spearman 0.78, median ratio 1.16; single tensors differ up to
    20x on these 2 windows, which is why plan quality is measured on the zoo, bench/SELFCAL.md)."""
    model = float_ggufs["mixtral"]
    tokens = sample(model, TEXT)
    damage = []
    for path in (model, q8_copy):
        with Session(path, 64) as s:
            names = [n for n, b in s.weights.items() if llama_quantizes(n, b.shape)]
            table = measure(s, Reference(s, tokens[:2]), names, [Q4_K], DamageConfig(n_windows=2))
            damage.append(np.array([table.costs[(n, None)]["Q4_K"] for n in names]))
    ranks = [np.argsort(np.argsort(d)) for d in damage]
    assert len(names) == 16 and np.corrcoef(*ranks)[0, 1] >= 0.6
    assert 0.7 <= np.median(damage[1] / damage[0]) <= 1.5


def test_stages_run_on_the_copy_cached_apart_and_the_copy_is_deleted(float_ggufs, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = float_ggufs["mixtral"]
    with Session(model, 64) as s:  # the tensors llama.cpp quantises (the router is not one)
        names = [n for n, b in s.weights.items() if llama_quantizes(n, b.shape) and (".ffn_" in n or "attn_q" in n)]
    cfg = DamageConfig(n_windows=2)
    work = tmp_path / "work"
    work.mkdir()
    q8 = self_calibrate(model, names, [Q4_K, GGMLQuantizationType.Q2_K], text_cfg=TEXT, cfg=cfg,
                        working_copy="q8_0", work_dir=work)
    assert list(work.iterdir()) == []  # the copy went with the stages
    assert q8.working_copy == "q8_0" and q8.seconds["working_copy"] > 0
    assert set(q8.damage.costs) == {(n, None) for n in names}
    assert all(c["Q2_K"] > c["Q4_K"] > 0 for c in q8.damage.costs.values())
    float_run = self_calibrate(model, names, [Q4_K, GGMLQuantizationType.Q2_K], text_cfg=TEXT, cfg=cfg)
    assert float_run.reused == ()  # the copy's text, importance and damage are not the float model's
    assert float_run.tokens.tobytes() != q8.tokens.tobytes()
    again = self_calibrate(model, names, [Q4_K, GGMLQuantizationType.Q2_K], text_cfg=TEXT, cfg=cfg,
                           working_copy="q8_0", work_dir=work)
    assert again.reused == ("self text", "importance", "damage") and "working_copy" not in again.seconds
    assert again.damage.costs == q8.damage.costs
    with pytest.raises(AlphaQError, match="working copy 'q4'"):
        self_calibrate(model, names, [Q4_K], text_cfg=TEXT, cfg=cfg, working_copy="q4")


@pytest.mark.parametrize("choice, ram, expected", [
    ("auto", None, "float"),  # the OS does not say: the float model
    ("auto", 10 << 30, "float"),
    ("auto", 5 << 30, "q8_0"),  # 4 GiB + 1.5 GiB private > 5 GiB
    ("float", 1 << 30, "float"),  # the user's word
    ("q8_0", 64 << 30, "q8_0"),
])
def test_auto_takes_the_copy_exactly_when_the_float_model_does_not_fit(choice, ram, expected):
    assert choose_working_copy(choice, 4 << 30, 3 << 29, ram) == expected
    assert working_copy_bytes(64 << 20) == 34 << 20


def test_convert_reports_the_working_copy_and_refuses_a_bad_value(float_ggufs, tmp_path, capsys):
    import alphaq
    from alphaq.cli import main

    out = tmp_path / "o.gguf"
    rc = main(["convert", str(float_ggufs["qwen3moe"]), "-o", str(out), "--like", "Q4_K_M", "--working-copy",
               "q8_0", "--no-progress", "--no-stock-compare", "--no-cache", "--damage-windows", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "Q8_0 working copy" in text  # pre-flight and summary
    assert not any(p.name.startswith(".alphaq-q8_0") for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match="working_copy 'fast': allowed auto, float, q8_0"):
        alphaq.convert(float_ggufs["qwen3moe"], tmp_path / "p.gguf", like="Q4_K_M", working_copy="fast")
    assert not (tmp_path / "p.gguf").exists()
