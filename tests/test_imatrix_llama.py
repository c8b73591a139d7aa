"""Our importance-matrix files against llama.cpp's own llama-quantize (built from the vendored
sources by convert/tools.py, once): it must accept both formats and read from them exactly the
vectors we read, so its output equals llama.cpp's quantiser driven by our reader, byte for byte."""

from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest

from alphaq.runtime.forward import Session
from alphaq.importance.collect import collect_imatrix
from alphaq.importance.imatrix_file import read_imatrix, write_imatrix
from alphaq.gguf.quantize import quantize_stock
from alphaq.selftext import SelfTextConfig, sample


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True])
def test_llama_quantize_reads_our_imatrix_as_we_do(legacy, float_ggufs, tmp_path):
    from convert.tools import llama_quantize

    model = float_ggufs["mixtral"]
    with Session(model, 64) as s:
        im = collect_imatrix(s, sample(model, SelfTextConfig(n_seq=4, n_ctx=64)))
    path = tmp_path / ("self.dat" if legacy else "self.imatrix.gguf")
    write_imatrix(path, im, legacy=legacy)
    by_tool = tmp_path / "tool.gguf"
    res = subprocess.run([str(llama_quantize()), "--imatrix", str(path), str(model), str(by_tool), "IQ2_XXS"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"loaded {len(im.sums)} importance matrix entries" in res.stdout + res.stderr
    by_us = tmp_path / "lib.gguf"
    quantize_stock(model, by_us, "IQ2_XXS", imatrix=read_imatrix(path).means())
    ours = {t.name: t for t in gguf.GGUFReader(by_us).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(by_tool).tensors}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert t.tensor_type == ours[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ours[name].data), err_msg=name)
