"""--farms-max-blocks: the spectral stage pools the eigenvalues of at most N evenly spaced FARMS
blocks of a matrix (the reference code's FARMS_MAX_BLOCKS, drawn at random there); 256 in --fast."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import alphaq
from alphaq.errors import AlphaQError
from alphaq.records import MatrixStats
from alphaq.spectral.alpha import SpectralConfig, analyze_matrix, farms_blocks, farms_cap, farms_eigenvalues


def test_blocks_are_all_or_evenly_spaced_without_repeats():
    assert farms_blocks((4, 5), None).tolist() == list(range(20))
    assert farms_blocks((4, 5), 20).tolist() == list(range(20))  # not more than it has: all
    assert farms_blocks((4, 5), 4).tolist() == [0, 5, 10, 15]  # one a row here
    assert farms_blocks((56, 16), 256).tolist()[:6] == [0, 3, 7, 10, 14, 17]  # a Mixtral-8x7B expert, 896 blocks
    for n in range(2, 60):
        for k in range(1, n):
            got = farms_blocks((n, 1), k)
            assert len(got) == k and got[0] == 0 and np.all(np.diff(got) > 0) and got[-1] < n


def _oracle(w: np.ndarray, b: int, picks: list[int]) -> np.ndarray:
    """Pooled squared singular values of blocks ``picks`` (row-major), from numpy's SVD."""
    nc = w.shape[1] // b
    eig = [np.linalg.svd(w[r * b:(r + 1) * b, c * b:(c + 1) * b].astype(np.float64), compute_uv=False) ** 2
           for r, c in (divmod(i, nc) for i in picks)]
    return np.sort(np.concatenate(eig))


@pytest.mark.parametrize("threads", [1, 2])
def test_capped_eigenvalues_are_those_of_the_chosen_blocks(threads, torch_threads):
    """A 10 x 6 grid of 16 x 16 blocks (the last 8 rows and columns dropped, as ever), 7 of the 60
    pooled: the eigenvalues are exactly the chosen blocks', on one thread or a pool."""
    torch_threads(threads)
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(168, 104)).astype(np.float32)
    cfg = SpectralConfig(block_size=16, max_blocks=7, device="cpu")
    got = farms_eigenvalues(w, cfg)
    want = _oracle(w, 16, [0, 8, 17, 25, 34, 42, 51])
    assert got.shape == want.shape == (7 * 16,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * want.max())
    every = farms_eigenvalues(w, dataclasses.replace(cfg, max_blocks=None))
    np.testing.assert_allclose(every, _oracle(w, 16, list(range(60))), rtol=0, atol=1e-10 * want.max())


def test_a_cap_above_the_block_count_changes_nothing():
    w = np.random.default_rng(5).standard_normal((96, 64)).astype(np.float32)
    cfg = SpectralConfig(block_size=16, device="cpu")
    assert analyze_matrix(w, cfg=dataclasses.replace(cfg, max_blocks=24)) == analyze_matrix(w, cfg=cfg)
    assert analyze_matrix(w, cfg=dataclasses.replace(cfg, max_blocks=23)) != analyze_matrix(w, cfg=cfg)


def test_the_cap_is_part_of_the_cache_key_only_where_it_binds(tmp_path):
    from alphaq.spectral.analyze import SpectralCache

    plain = SpectralConfig().cache_fields()
    assert "max_blocks" not in plain  # caches of every-block results stay valid
    assert SpectralConfig(max_blocks=256).cache_fields() == {**plain, "max_blocks": 256}
    every, capped = SpectralCache(tmp_path, SpectralConfig()), SpectralCache(tmp_path, SpectralConfig(max_blocks=2))
    small, large = np.ones((512, 256), np.float32), np.ones((768, 256), np.float32)  # 2 and 3 blocks of 256
    assert capped.key(small) == every.key(small)  # the cap leaves it whole: the same result, the same entry
    assert capped.key(large) != every.key(large)
    with pytest.raises(AlphaQError, match="max_blocks 0 must be >= 1"):
        SpectralConfig(max_blocks=0)


# (how --farms-max-blocks resolves in each mode: tests/test_alpha_sample.py, beside --alpha-experts)


def _stats(rows: int, cols: int) -> MatrixStats:
    return MatrixStats("blk.0.ffn_up_exps.weight", 0, 0, "ffn_up_exps", rows, cols, rows * cols, 3.0, 1.0, 10, 100)


def test_the_record_counts_the_capped_matrices():
    stats = [_stats(14336, 4096), _stats(4096, 14336), _stats(4096, 4096), _stats(100, 4096)]
    assert farms_cap(stats, SpectralConfig(max_blocks=256)) == {
        "max_blocks": 256, "matrices_capped": 2, "matrices": 4, "blocks": [896]}
    assert farms_cap(stats, SpectralConfig()) is None
    assert farms_cap(stats, SpectralConfig(max_blocks=896)) is None  # nothing had more


def test_the_summary_says_what_was_capped():
    from alphaq.commands.convert import _farms_note

    note = _farms_note({"max_blocks": 256, "matrices_capped": 2, "matrices": 4, "blocks": [896]})
    assert note == "; alpha from 256 of 896 FARMS blocks in 2 of 4 matrices (--farms-max-blocks all: every block)"
    assert _farms_note(None) == ""


def test_the_front_doors_record_the_cap(float_ggufs):
    p = alphaq.plan(float_ggufs["qwen3moe"], budget=3, farms_max_blocks=1)
    # the fixture's embedding and output matrices (1024 x 256) have 4 blocks of 256 x 256, the rest fewer than one
    assert p.settings["farms_cap"] == {"max_blocks": 1, "matrices_capped": 2, "matrices": 106, "blocks": [4]}
    assert alphaq.plan(float_ggufs["qwen3moe"], budget=3).settings["farms_cap"] is None  # 256 in --fast: all
    with pytest.raises(AlphaQError, match="alpha_experts/farms_max_blocks and spectral both"):
        alphaq.convert(float_ggufs["qwen3moe"], "o.gguf", mode="fast", farms_max_blocks=64, spectral=SpectralConfig())


# (convert's refusals of a cap it cannot use: tests/test_alpha_sample.py, with --alpha-experts')


def test_analyze_pools_the_capped_blocks(fixtures_dir, tmp_path):
    """`alphaq analyze --farms-max-blocks 1`: the fixture's 1024 x 256 embedding and output (4 x 1 blocks)
    pool one block's 256 eigenvalues; every other matrix is narrower than a block and unchanged."""
    from alphaq.cli import main
    from alphaq.spectral.analyze import read_csv

    argv = ["analyze", str(fixtures_dir / "qwen3moe"), "--no-cache", "--no-progress"]
    assert main([*argv, "--csv", str(tmp_path / "all.csv")]) == 0
    assert main([*argv, "--csv", str(tmp_path / "one.csv"), "--farms-max-blocks", "1"]) == 0
    every, one = read_csv(tmp_path / "all.csv"), read_csv(tmp_path / "one.csv")
    changed = {a.tensor: (a.n_eigs, b.n_eigs) for a, b in zip(every, one) if a != b}
    assert changed == {"token_embd.weight": (1024, 256), "output.weight": (1024, 256)}


def test_plan_command_records_and_says_what_was_capped(float_ggufs, tmp_path, capsys):
    import json

    from alphaq.cli import main

    out = tmp_path / "p.json"
    assert main(["plan", str(float_ggufs["qwen3moe"]), "--budget", "3", "--json", str(out), "--no-cache",
                 "--farms-max-blocks", "1"]) == 0
    assert "alpha from 1 of 4 FARMS blocks in 2 of 106 matrices" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["farms_cap"]["matrices_capped"] == 2
