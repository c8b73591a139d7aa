"""Split GGUFs in and out, --keep-bf16, --dry-run and the disk pre-flight.

Split input is made by llama.cpp's own converter (--split-max-tensors); split output is checked
against stock llama.cpp (it must load the parts and give the unsplit file's logits) and, byte for
byte, against llama-gguf-split built from the vendored sources."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from alphaq.gguf import io as gguf_io
from alphaq.cli import main as cli_main
from alphaq.errors import AlphaQError
from alphaq.gguf.split import SplitSpec, assign_parts, parse_split_size, split_gguf
from conftest import FIXTURES

MODEL = "qwen2moe"  # the smallest fixture
HELDOUT = FIXTURES / "heldout" / "prose.txt"


@pytest.fixture(scope="module")
def split_bf16(tmp_path_factory) -> list[Path]:
    """The fixture as a BF16 GGUF in 3 parts, written by llama.cpp's converter."""
    from convert.hf_to_gguf import convert_hf

    out = tmp_path_factory.mktemp("split-in") / "model.gguf"
    first = convert_hf(FIXTURES / MODEL, out, extra=("--split-max-tensors", "16")).path
    parts = sorted(out.parent.glob("model-*-of-*.gguf"))
    assert first == parts[0] and [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return parts


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- split input ----------------------------------------------------------------------------------


def test_every_part_resolves_to_the_whole_model(split_bf16, float_ggufs):
    from alphaq.files import fingerprint
    from alphaq.allocate.plan import gguf_model_infos
    from alphaq.model.weights import open_model

    from alphaq.allocate.plan import gguf_output_header_bytes, gguf_tensor_infos

    whole = float_ggufs[MODEL]
    reader = gguf.GGUFReader(whole)  # the reader-based functions gguf_model_infos replaces
    assert gguf_model_infos(whole) == (gguf_tensor_infos(reader), gguf_output_header_bytes(reader))
    for part in split_bf16:
        assert gguf_io.shard_paths(part) == split_bf16
        assert gguf_io.read_tensors(part) == gguf_io.read_tensors(whole)
        # the header of the one file llama_model_quantize writes from it: the unsplit file's
        assert gguf_io.header_bytes(part) == gguf_io.header_bytes(whole)
        assert gguf_model_infos(part) == gguf_model_infos(whole)
        assert gguf_io.model_bytes(part) == sum(p.stat().st_size for p in split_bf16)
        assert fingerprint(part) == fingerprint(split_bf16[0]) != fingerprint(whole)
    with open_model(split_bf16[2]) as a, open_model(whole) as b:
        ma, mb = a.matrices(), b.matrices()
        assert [(m.tensor, m.expert) for m in ma] == [(m.tensor, m.expert) for m in mb]
        for x, y in zip(ma, mb):
            np.testing.assert_array_equal(x.load(), y.load(), err_msg=x.label)


def test_convert_from_any_part_equals_the_unsplit_input(split_bf16, float_ggufs, tmp_path, capsys):
    ref = tmp_path / "whole.gguf"
    assert _run(capsys, "convert", float_ggufs[MODEL], "--fast", "-o", ref, "--no-progress")[0] == 0
    for part in (split_bf16[0], split_bf16[1]):
        out = tmp_path / f"from-{part.name}"
        code, text, err = _run(capsys, "convert", part, "--fast", "-o", out, "--no-progress")
        assert code == 0, err
        assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_default_mode_from_a_split_input_equals_the_unsplit_input(split_bf16, float_ggufs, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outs = []
    for model in (float_ggufs[MODEL], split_bf16[1]):
        outs.append(tmp_path / f"{len(outs)}.gguf")
        code, _, err = _run(capsys, "convert", model, "-o", outs[-1], "--no-progress", "--self-samples", "4",
                            "--self-ctx", "64", "--damage-windows", "2", "--budget", "3")
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_analyze_plan_and_eval_read_a_split_model(split_bf16, float_ggufs, tmp_path, capsys):
    whole, part = float_ggufs[MODEL], split_bf16[2]
    for name, model in (("whole", whole), ("split", part)):
        assert _run(capsys, "analyze", model, "--csv", tmp_path / f"{name}.csv", "--no-progress")[0] == 0
        assert _run(capsys, "plan", model, "--budget", "3", "--json", tmp_path / f"{name}.json",
                    "--tensor-types-out", tmp_path / f"{name}.tt")[0] == 0
    assert (tmp_path / "whole.csv").read_text() == (tmp_path / "split.csv").read_text()
    assert (tmp_path / "whole.tt").read_text() == (tmp_path / "split.tt").read_text()
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "split"))
    assert a["items"] == b["items"] and a["totals"] == b["totals"]
    reports = []
    for ref in (whole, split_bf16[1]):
        js = tmp_path / f"eval-{ref.name}.json"
        code, _, err = _run(capsys, "eval", whole, "--ref", ref, "--text", HELDOUT, "--max-windows", "1",
                            "--n-ctx", "64", "--json", js, "--no-progress")
        assert code == 0, err
        reports.append(json.loads(js.read_text()))
    strip = [{k: v for k, v in r.items() if k not in ("ref", "model")} for r in reports]
    assert strip[0] == strip[1]
    assert json.dumps(strip[0]).count('"kl": 0.0') >= 1  # the model against itself


@pytest.fixture
def missing_part(split_bf16, tmp_path) -> tuple[Path, Path]:
    """A copy of the split model without its last part: (a part to give, the missing file)."""
    for p in split_bf16[:2]:
        shutil.copy(p, tmp_path / p.name)
    return tmp_path / split_bf16[1].name, tmp_path / split_bf16[2].name


@pytest.mark.parametrize("command", ["convert", "analyze", "plan", "eval"])
def test_a_missing_part_is_one_line_naming_it(command, missing_part, tmp_path, capsys):
    given, missing = missing_part
    out = tmp_path / "out"
    argv = {"convert": ["convert", given, "--fast", "-o", out.with_suffix(".gguf"), "--no-progress"],
            "analyze": ["analyze", given, "--csv", out.with_suffix(".csv"), "--no-progress"],
            "plan": ["plan", given, "--budget", "3", "--json", out.with_suffix(".json")],
            "eval": ["eval", given, "--text", HELDOUT, "--json", out.with_suffix(".json")]}[command]
    before = sorted(tmp_path.iterdir())
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "missing" in lines[0], err
    assert sorted(tmp_path.iterdir()) == before


def test_a_renamed_part_cannot_find_the_others(split_bf16, tmp_path):
    odd = tmp_path / "renamed.gguf"
    shutil.copy(split_bf16[1], odd)
    with pytest.raises(AlphaQError, match="-00002-of-00003.gguf"):
        gguf_io.shard_paths(odd)


# ---- split output ---------------------------------------------------------------------------------


def test_parse_split_size_is_gguf_splits_syntax():
    assert parse_split_size("500M") == 500_000_000
    assert parse_split_size("2G") == 2_000_000_000
    for bad in ("500", "500K", "1.5G", "0M", "-1G", "G", ""):
        with pytest.raises(AlphaQError):
            parse_split_size(bad)


def test_assign_parts_follows_gguf_split():
    assert assign_parts([10] * 5, SplitSpec(max_tensors=2)) == [[0, 1], [2, 3], [4]]
    # sizes count padded to 32 bytes; a part closes before the tensor that would overflow it
    assert assign_parts([40, 20, 100, 10], SplitSpec(max_bytes=96)) == [[0, 1], [2], [3]]
    with pytest.raises(AlphaQError, match="0 tensors"):
        assign_parts([200, 10], SplitSpec(max_bytes=96))


@pytest.fixture(scope="module")
def split_output(split_bf16, tmp_path_factory):
    """(unsplit output, parts, stdout) of one fast conversion, split by tensors count."""
    d = tmp_path_factory.mktemp("split-out")
    assert cli_main(["convert", str(split_bf16[0]), "--fast", "-o", str(d / "whole.gguf"), "--no-progress"]) == 0
    assert cli_main(["convert", str(split_bf16[0]), "--fast", "-o", str(d / "out.gguf"), "--no-progress",
                     "--split-max-tensors", "10"]) == 0
    return d / "whole.gguf", sorted(d.glob("out-*-of-*.gguf"))


def test_split_output_loads_in_stock_llama_cpp_with_the_same_logits(split_output):
    import llama_cpp

    whole, parts = split_output
    assert [p.name for p in parts] == [f"out-0000{i}-of-00004.gguf" for i in (1, 2, 3, 4)]
    tokens = [1, 5, 17, 200, 33, 7, 90, 3]
    logits = []
    for path in (whole, parts[0]):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False)
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)]))
        del llm
    np.testing.assert_array_equal(logits[0], logits[1])


def test_split_output_keys_sizes_and_side_files(split_output, capsys):
    whole, parts = split_output
    for i, p in enumerate(parts):
        r = gguf.GGUFReader(p)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == len(parts)
        assert r.fields["split.tensors.count"].contents() == len(gguf_io.read_tensors(whole))
        assert ("alphaq.plan" in r.fields) == (i == 0)  # every other key in the first part only
    assert [t.name for t in gguf_io.read_tensors(parts[2])] == [t.name for t in gguf_io.read_tensors(whole)]
    plan = json.loads(whole.with_name("out.plan.json").read_text())
    assert plan["output"]["files"] == [{"file": p.name, "bytes": p.stat().st_size} for p in parts]
    assert plan["output"]["file_bytes"] == sum(p.stat().st_size for p in parts)
    tt = whole.with_name("out.tensor-types.txt").read_text()
    assert tt == whole.with_name("whole.tensor-types.txt").read_text()
    assert not whole.with_name("out.gguf").exists()


def test_split_from_python_and_the_default_name(split_bf16, tmp_path, monkeypatch, capsys):
    import alphaq

    r = alphaq.convert(split_bf16[2], tmp_path / "py.gguf", mode="fast", split_max_size="1M")
    assert r.output == tmp_path / "py-00001-of-00002.gguf" and r.parts == (r.output, tmp_path / "py-00002-of-00002.gguf")
    assert r.file_bytes == sum(p.stat().st_size for p in r.parts)
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, "convert", split_bf16[1], "--fast", "--no-progress")[0] == 0
    assert (tmp_path / "model-alphaq-b3.gguf").is_file()  # named after the model, not after the part


def test_split_output_summary_and_force(split_bf16, tmp_path, capsys):
    from alphaq.plots import BYTES_PNG, TYPES_PNG

    out, plots = tmp_path / "o.gguf", tmp_path / "figs"
    code, text, err = _run(capsys, "convert", split_bf16[0], "--fast", "-o", out, "--no-progress",
                           "--split-max-size", "1M", "--plots", plots)
    assert code == 0, err
    parts = sorted(tmp_path.glob("o-*-of-*.gguf"))
    assert len(parts) == 2
    assert f"wrote {parts[0]}" in text and "in 2 parts" in text
    assert all(p.name in text for p in parts)
    # the figures are published with the other side files, also for a split output
    assert {TYPES_PNG, BYTES_PNG} <= {p.name for p in plots.iterdir()} and f"plots       {plots}/" in text
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]  # no staging left
    for p in parts:  # gguf-split's limit counts the part's tensor data only
        assert sum(-(-t.n_bytes // 32) * 32 for t in gguf_io.file_header(p).records) <= 1_000_000
    code, _, err = _run(capsys, "convert", split_bf16[0], "--fast", "-o", out, "--no-progress", "--split-max-size", "1M")
    assert code == 2 and "--force" in err and str(parts[0]) in err
    code, _, err = _run(capsys, "convert", split_bf16[0], "--fast", "-o", out, "--no-progress", "--force",
                        "--split-max-tensors", "40")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("o-*.gguf")) == ["o-00001-of-00001.gguf"]  # older parts replaced


@pytest.mark.slow
@pytest.mark.parametrize("how", [("--split-max-tensors", "7"), ("--split-max-size", "1M")])
def test_split_is_byte_identical_to_llama_gguf_split(how, split_output, tmp_path):
    from convert.tools import llama_gguf_split

    whole, _ = split_output
    res = subprocess.run([str(llama_gguf_split()), "--split", *how, str(whole), str(tmp_path / "tool")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    spec = SplitSpec(max_tensors=int(how[1])) if how[0] == "--split-max-tensors" else \
        SplitSpec(max_bytes=parse_split_size(how[1]))
    ours = split_gguf(whole, tmp_path / "ours", spec)
    theirs = sorted(tmp_path.glob("tool-*-of-*.gguf"))
    assert [p.name.removeprefix("ours") for p in ours] == [p.name.removeprefix("tool") for p in theirs]
    assert len(ours) > 1
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes(), a.name


# ---- --keep-bf16, --dry-run, disk pre-flight ------------------------------------------------------


def test_keep_bf16_keeps_the_float_model(float_ggufs, tmp_path, capsys):
    out, kept = tmp_path / "o.gguf", tmp_path / "kept" / "model-bf16.gguf"
    kept.parent.mkdir()
    code, text, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", out, "--keep-bf16", kept,
                           "--no-progress")
    assert code == 0, err
    assert kept.read_bytes() == float_ggufs[MODEL].read_bytes()  # llama.cpp's converter output, as is
    assert sorted(p.name for p in kept.parent.iterdir()) == ["model-bf16.gguf"]
    assert f"bf16        {kept}" in text
    code, _, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", tmp_path / "p.gguf", "--keep-bf16", kept,
                        "--no-progress")
    assert code == 2 and "--force" in err and not (tmp_path / "p.gguf").exists()
    code, _, err = _run(capsys, "convert", float_ggufs[MODEL], "--fast", "-o", tmp_path / "q.gguf", "--keep-bf16",
                        tmp_path / "x.gguf", "--no-progress")
    assert code == 2 and "already a GGUF" in err


def test_without_keep_bf16_the_intermediate_is_gone_before_the_output_is_rewritten(tmp_path, capsys, monkeypatch):
    from alphaq.pipeline import convert

    seen = []
    real = convert.copy_with_metadata

    def spy(src, dst, meta):
        seen.append(sorted(p.name for p in src.parent.iterdir()))
        return real(src, dst, meta)

    monkeypatch.setattr(convert, "copy_with_metadata", spy)
    code, _, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", tmp_path / "o.gguf", "--no-progress")
    assert code == 0, err
    assert seen == [["quantised.gguf"]]  # the BF16 intermediate was deleted once the quantiser had read it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "o.plan.json", "o.tensor-types.txt"]


def test_dry_run_prints_disk_and_plan_and_writes_nothing(tmp_path, capsys):
    code, text, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", tmp_path / "o.gguf", "--dry-run",
                           "--no-progress", "--split-max-tensors", "10")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []
    pre = text[: text.index("dry run:")]
    for needle in ("BF16 intermediate about", "output at most", f"peak need in {tmp_path}", "free", "time      about"):
        assert needle in pre, needle
    assert "dry run: nothing written" in text and "types       " in text and "not written (--dry-run)" in text
    # --dry-run writes no figures: --plots with it is refused in one line, before any work
    code, text, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", tmp_path / "o.gguf", "--dry-run",
                           "--no-progress", "--plots", tmp_path / "figs")
    assert code == 2 and err.strip().count("\n") == 0 and "--plots" in err and "--dry-run" in err
    assert list(tmp_path.iterdir()) == [] and "pre-flight" not in text


def test_dry_run_with_pins_and_split_input(split_bf16, tmp_path, capsys):
    """The pins are checked and planned in a dry run (their types count in the pre-flight's bound)."""
    code, text, err = _run(capsys, "convert", split_bf16[1], "--fast", "-o", tmp_path / "o.gguf", "--dry-run",
                           "--no-progress", "--no-stock-compare", "--tensor-type", "attn_v=q8_0")
    assert code == 0, err
    assert "pinned      2 tensor(s)" in text and "dry run: nothing written" in text
    assert list(tmp_path.iterdir()) == []
    code, _, err = _run(capsys, "convert", split_bf16[1], "--fast", "-o", tmp_path / "o.gguf", "--dry-run",
                        "--no-progress", "--tensor-type", "attn_v=q9_9")
    assert code == 2 and "q9_9" in err and list(tmp_path.iterdir()) == []


def test_preflight_bounds_hold(float_ggufs, tmp_path):
    from alphaq.pipeline.convert import ConvertConfig, run_convert
    from alphaq.allocate.plan import MODES, PlanConfig

    for name, plan in (("bits", dict(budget=4.0)), ("size", dict(budget_mode="size", budget=3e6))):
        cfg = ConvertConfig(model=FIXTURES / MODEL, output=tmp_path / f"{name}.gguf", progress=False,
                            compare_stock=False, plan=PlanConfig(**{**MODES["fast"], **plan}))
        r = run_convert(cfg)
        assert r.file_bytes <= r.preflight.output_bytes
        assert r.preflight.float_bytes >= gguf_io.model_bytes(float_ggufs[MODEL])  # an overestimate, here
        (d,) = r.preflight.needs
        assert r.preflight.needs[d] == max(r.preflight.float_bytes + r.preflight.output_bytes,
                                           2 * r.preflight.output_bytes)


def test_not_enough_disk_stops_before_converting(tmp_path, capsys, monkeypatch):
    import alphaq.pipeline.preflight as pf
    import convert.hf_to_gguf as h2g

    monkeypatch.setattr(pf.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))

    def no_convert(*a, **k):
        raise AssertionError("the converter must not start")

    monkeypatch.setattr(h2g, "start_convert_hf", no_convert)
    monkeypatch.setattr(h2g, "convert_hf", no_convert)
    code, text, err = _run(capsys, "convert", FIXTURES / MODEL, "--fast", "-o", tmp_path / "o.gguf", "--no-progress")
    assert code == 2
    assert err.strip().count("\n") == 0 and "not enough disk space" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []
    assert "peak need" in text  # the pre-flight was printed first


def test_time_estimate_scales_the_benchmark_table():
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.damage import DamageConfig
    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.pipeline.preflight import DAMAGE_PARTS as P
    from alphaq.pipeline.preflight import (
        QUANTISE_WALL_PER_ESTIMATE,
        REFERENCE_WEIGHTS_PER_BLOCK,
        STAGE_SECONDS_PER_BLOCK,
        stage_seconds,
    )

    cfg = ConvertConfig(model=Path("m"), output=Path("o.gguf"), plan=PlanConfig(**MODES["damage"]),
                        auto_quantise_cap=False)
    got = stage_seconds(cfg, "hf", 4, REFERENCE_WEIGHTS_PER_BLOCK)
    assert got["float model"] + got["self text"] + got["importance"] + got["quantise"] == pytest.approx(
        4 * sum(STAGE_SECONDS_PER_BLOCK[k] for k in ("float model", "self text", "importance", "quantise")))
    # the benchmark's own run: 30 measurements on 16 windows of every block (bench/scale-head-qwen3.json)
    assert got["damage"] == pytest.approx(168.0 + 410.1 + 13.9 + 40.3)
    # 12 blocks of half the weights: 8 anchor blocks per kind (the default; 58 measurements) on 2
    # windows, each a forward pass over all 12 blocks; 86 tensors' weighted errors
    half = stage_seconds(cfg, "gguf", 12, REFERENCE_WEIGHTS_PER_BLOCK // 2)
    expected = (58 * (P["fake_per_measurement"] + P["forward_per_measurement_block_token"] * 12 * 512)
                + P["reference_per_block_token"] * 12 * 512 + 86 * P["weighted_error_per_tensor"]) / 2
    assert "float model" not in half and half["damage"] == pytest.approx(expected)
    # with every block measured it is quadratic: 58 measurements on 16 windows at 8 blocks, which
    # the default's 8 anchors measure in full too
    every = stage_seconds(replace(cfg, damage=DamageConfig(anchors=None)), "gguf", 8, REFERENCE_WEIGHTS_PER_BLOCK // 2)
    expected = (58 * (P["fake_per_measurement"] + P["forward_per_measurement_block_token"] * 8 * 4096)
                + P["reference_per_block_token"] * 8 * 4096 + 58 * P["weighted_error_per_tensor"]) / 2
    assert every["damage"] == pytest.approx(expected)
    assert stage_seconds(cfg, "gguf", 8, REFERENCE_WEIGHTS_PER_BLOCK // 2)["damage"] == pytest.approx(expected)
    # a quantiser time cap bounds the quantise stage: the measured wall time per estimated ns-weight
    # (bench/quantise-cap.json) times the cap; a loose cap leaves the benchmark's rate
    capped = stage_seconds(replace(cfg, plan=replace(cfg.plan, max_quantise_ns=100.0)), "hf", 4,
                           REFERENCE_WEIGHTS_PER_BLOCK)
    assert capped["quantise"] == pytest.approx(QUANTISE_WALL_PER_ESTIMATE * 100e-9 * 4 * REFERENCE_WEIGHTS_PER_BLOCK)
    assert capped["quantise"] < got["quantise"] / 3
    loose = stage_seconds(replace(cfg, plan=replace(cfg.plan, max_quantise_ns=5000.0)), "hf", 4,
                          REFERENCE_WEIGHTS_PER_BLOCK)
    assert loose["quantise"] == got["quantise"]
    # the default's auto cap is at least FLOOR_NS: the estimate takes that floor (an underestimate
    # below ~2.5 bpw, where the cap follows llama.cpp's own IQ mixes)
    from alphaq.allocate.quantise_cap import FLOOR_NS

    auto = stage_seconds(replace(cfg, auto_quantise_cap=True), "hf", 4, REFERENCE_WEIGHTS_PER_BLOCK)
    assert auto["quantise"] == pytest.approx(QUANTISE_WALL_PER_ESTIMATE * FLOOR_NS * 1e-9 * 4 * REFERENCE_WEIGHTS_PER_BLOCK)
    assert auto["quantise"] < got["quantise"]


def test_preflight_states_the_forward_stages_memory(float_ggufs, tmp_path, monkeypatch):
    import alphaq.pipeline.preflight as pf
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.model.weights import open_model

    cfg = ConvertConfig(model=float_ggufs[MODEL], output=tmp_path / "o.gguf", plan=PlanConfig(**MODES["damage"]))
    with open_model(float_ggufs[MODEL]) as model:
        tensors = {}
        for m in model.matrices():
            tensors[m.tensor] = tensors.get(m.tensor, 0) + m.params
        monkeypatch.setattr(pf, "ram_available", lambda: 10**12)
        roomy = pf.preflight(cfg, model)
        monkeypatch.setattr(pf, "ram_available", lambda: roomy.float_bytes // 2)
        tight = pf.preflight(cfg, model)
        fast = pf.preflight(ConvertConfig(model=cfg.model, output=cfg.output, plan=PlanConfig(**MODES["fast"])), model)
    assert roomy.largest_weight_bytes == 2 * max(tensors.values())
    assert "memory-map the float model" in roomy.format(None) and "holds it" in roomy.format(None)
    assert "does not hold it" in tight.format(None) and "reads the missing part from disk" in tight.format(None)
    assert "memory" not in fast.format(None)  # no forward pass in the fast mode


def test_preflight_time_follows_this_machines_speed(float_ggufs, tmp_path, monkeypatch):
    """The benchmark's rates are divided by the probed speed: the converter by the one-thread ratio,
    every other stage by the all-thread ratio."""
    import alphaq.pipeline.preflight as pf
    import alphaq.pipeline.speed_probe as sp
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.model.weights import open_model

    cfg = ConvertConfig(model=float_ggufs[MODEL], output=tmp_path / "o.gguf", plan=PlanConfig(**MODES["damage"]))
    with open_model(float_ggufs[MODEL]) as model:
        monkeypatch.setattr(pf, "machine_speed", lambda: sp.MachineSpeed(2, 1.0, 1.0))
        bench = pf.preflight(cfg, model)
        monkeypatch.setattr(pf, "machine_speed", lambda: sp.MachineSpeed(16, 1.5, 6.0))
        fast = pf.preflight(cfg, model)
    assert set(fast.stage_seconds) == set(bench.stage_seconds) and "damage" in fast.stage_seconds
    for stage, seconds in bench.stage_seconds.items():
        assert fast.stage_seconds[stage] == pytest.approx(seconds / (1.5 if stage == "float model" else 6.0))
    assert "1.50x on one thread, 6.00x on 16 threads" in fast.format(None)


def test_probe_reference_is_ones_on_the_benchmark_figures(monkeypatch):
    """The probe's reference figures give a speed of 1 to a machine that measures them (so the
    benchmark's own estimate is unchanged), more to a faster one."""
    import alphaq.pipeline.speed_probe as sp

    sp.machine_speed.cache_clear()
    monkeypatch.setattr(sp, "probe", lambda threads: (sp.REFERENCE_ONE_THREAD_NS, sp.REFERENCE_ALL_THREADS_NS))
    assert sp.machine_speed().one_thread == 1.0 and sp.machine_speed().all_threads == 1.0
    sp.machine_speed.cache_clear()
    monkeypatch.setattr(sp, "probe", lambda threads: (sp.REFERENCE_ONE_THREAD_NS / 2, sp.REFERENCE_ALL_THREADS_NS / 8))
    assert (sp.machine_speed().one_thread, sp.machine_speed().all_threads) == (2.0, 8.0)
    sp.machine_speed.cache_clear()


def test_probe_measures_ggml_quantiser_throughput():
    """The probe runs the real quantiser: positive ns per weight, and the all-thread figure is a
    per-weight wall time over every thread's work (not above one thread's by more than noise)."""
    from alphaq.pipeline.speed_probe import probe

    one, every = probe(2)
    assert 0 < one < 1e5 and 0 < every < 3 * one


def test_preflight_damage_estimate_follows_the_weights_a_token_reads():
    """Mixtral-8x7B shapes at 2 blocks (bench/scale-head-others.json): the damage stage's forward
    passes read 2 of 8 experts a token; scaled by the block's weights the estimate was under half
    the measured stage, scaled by the weights a token reads it is within 15 % of it."""
    import json

    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.pipeline.preflight import stage_seconds

    bench = json.loads((Path(__file__).parents[1] / "bench" / "scale-head-others.json").read_text())
    [point] = [p for p in bench["points"] if p["arch"] == "mixtral-8x7b" and p["blocks"] == 2]
    measured = point["median"]["default"]["stages"]["damage"]
    cfg = ConvertConfig(model=Path("m"), output=Path("o.gguf"), plan=PlanConfig(**MODES["damage"]),
                        auto_quantise_cap=False)
    attention = 2 * 4096 * 4096 + 2 * 1024 * 4096
    weights, read = attention + 8 * 3 * 14336 * 4096, attention + 2 * 3 * 14336 * 4096
    assert stage_seconds(cfg, "hf", 2, weights)["damage"] < 0.6 * measured
    assert stage_seconds(cfg, "hf", 2, weights, read)["damage"] == pytest.approx(measured, rel=0.15)


def test_block_weights_read_the_experts_used_from_config_and_gguf(float_ggufs):
    from alphaq.model.weights import open_model
    from alphaq.pipeline.preflight import block_weights

    hf, gg = open_model(FIXTURES / "mixtral"), open_model(float_ggufs["mixtral"])
    used = json.loads((FIXTURES / "mixtral" / "config.json").read_text())["num_experts_per_tok"]
    assert hf.experts_used == gg.experts_used == used
    blocks = [m for m in gg.matrices() if m.block is not None]
    experts = sum(m.params for m in blocks if m.expert is not None)
    n_experts = len({m.expert for m in blocks if m.expert is not None})
    total = sum(m.params for m in blocks)
    expected = (total - experts + experts * used // n_experts) // gg.n_blocks
    assert block_weights(gg) == block_weights(hf) == (total // gg.n_blocks, expected)
    assert block_weights(replace(gg, experts_used=None)) == (total // gg.n_blocks, total // gg.n_blocks)


@pytest.mark.parametrize("budget", [dict(budget=3), dict(like="Q4_K_M")])
def test_dry_run_predicts_the_written_size(budget, float_ggufs, tmp_path):
    """The prediction holds alphaq's own keys (the plan is ~16 KB of them here): at most a few KB
    above the file (the allowance for the quantiser's keys), never below it."""
    import alphaq

    kw = dict(mode="fast", progress=False, **budget)
    dry = alphaq.convert(float_ggufs[MODEL], tmp_path / "o.gguf", dry_run=True, **kw)
    real = alphaq.convert(float_ggufs[MODEL], tmp_path / "o.gguf", **kw)
    assert real.file_bytes <= dry.file_bytes <= real.file_bytes + 8192, (dry.file_bytes, real.file_bytes)
