"""alphaq.importance.imatrix_file against llama.cpp's imatrix formats (imatrix.cpp save_imatrix /
save_imatrix_legacy, common/imatrix-loader.cpp, quantize.cpp load_imatrix)."""

from __future__ import annotations

import ctypes
import struct

import gguf
import numpy as np
import pytest

from alphaq.errors import AlphaQError
from alphaq.importance.imatrix_file import Imatrix, read_imatrix, write_imatrix

EXPS = "blk.0.ffn_up_exps.weight"
DENSE = "blk.0.attn_q.weight"


def _example() -> Imatrix:
    # names deliberately out of order: both writers sort them
    return Imatrix(
        sums={EXPS: np.array([[2, 4], [6, 8], [1, 3]], dtype=np.float32),
              DENSE: np.array([[3, 0.5]], dtype=np.float32)},
        counts={EXPS: np.array([2.0, 0.0, 4.0]), DENSE: np.array([5.0])},
        datasets=["first.txt", "calib.txt"], chunk_count=7, chunk_size=4)


def _i32(v: int) -> bytes:
    return struct.pack("<i", v)


def _f32(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *[float(v) for v in values])


# ---------------------------------------------------------------- means (quantize.cpp)


def test_means_are_sums_over_counts_and_ones_for_unseen_experts():
    means = _example().means()
    np.testing.assert_array_equal(means[EXPS], np.float32([1, 2, 1, 1, 0.25, 0.75]))
    np.testing.assert_array_equal(means[DENSE], np.float32([3 / 5, 0.5 / 5]))
    assert means[EXPS].dtype == np.float32 and means[EXPS].shape == (6,)


def test_means_round_counts_like_lround():
    # the loader stores lround(count): 2.5 -> 3 (not 2 as round-half-even), 0.4 -> 0 (unseen -> ones)
    im = Imatrix(sums={"w": np.float32([[3, 6], [9, 9]])}, counts={"w": np.array([2.5, 0.4])})
    np.testing.assert_array_equal(im.means()["w"], np.float32([1, 2, 1, 1]))


# ---------------------------------------------------------------- GGUF format


def test_gguf_file_has_llama_cpp_keys_and_tensors(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, _example())
    reader = gguf.GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["first.txt", "calib.txt"]
    for key, value in (("imatrix.chunk_count", 7), ("imatrix.chunk_size", 4)):
        assert reader.get_field(key).types == [gguf.GGUFValueType.UINT32]
        assert reader.get_field(key).contents() == value
    names = [t.name for t in reader.tensors]
    assert names == [f"{DENSE}.in_sum2", f"{DENSE}.counts", f"{EXPS}.in_sum2", f"{EXPS}.counts"]
    by_name = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # ggml ne order: in_sum2 (ne0, n_mat), counts (1, n_mat)
    assert list(by_name[f"{EXPS}.in_sum2"].shape) == [2, 3]
    assert list(by_name[f"{EXPS}.counts"].shape) == [1, 3]
    assert list(by_name[f"{DENSE}.in_sum2"].shape) == [2, 1]
    np.testing.assert_array_equal(by_name[f"{EXPS}.in_sum2"].data.reshape(-1), np.float32([2, 4, 6, 8, 1, 3]))
    np.testing.assert_array_equal(by_name[f"{EXPS}.counts"].data.reshape(-1), np.float32([2, 0, 4]))
    np.testing.assert_array_equal(by_name[f"{DENSE}.counts"].data.reshape(-1), np.float32([5]))


def test_gguf_round_trip(tmp_path):
    path = tmp_path / "imatrix.gguf"
    im = _example()
    write_imatrix(path, im)
    back = read_imatrix(path)
    assert sorted(back.sums) == sorted(im.sums) and sorted(back.counts) == sorted(im.counts)
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        assert back.sums[name].dtype == np.float32
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, 7, 4)
    for name, mean in im.means().items():
        np.testing.assert_array_equal(back.means()[name], mean)


def test_gguf_empty_dataset_list_is_still_written(tmp_path):
    # llama-quantize refuses a GGUF imatrix without imatrix.datasets, even an empty one
    path = tmp_path / "imatrix.gguf"
    im = _example()
    im.datasets = []
    write_imatrix(path, im)
    field = gguf.GGUFReader(path).get_field("imatrix.datasets")
    # parts: key length, key, value type, element type, element count (GGUFReader lists no
    # element type in .types for an empty array)
    assert field is not None and field.types[0] == gguf.GGUFValueType.ARRAY
    assert [int(p[0]) for p in field.parts[2:]] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, 0]
    assert read_imatrix(path).datasets == []


def _libggml():
    from alphaq.gguf.ggml import find_libggml

    try:
        lib = ctypes.CDLL(str(find_libggml()))
    except (AlphaQError, OSError) as e:
        pytest.skip(f"libggml-base not available: {e}")

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    for fn, res in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_find_key", ctypes.c_int64),
                    ("gguf_get_arr_n", ctypes.c_size_t), ("gguf_get_arr_type", ctypes.c_int),
                    ("gguf_get_val_u32", ctypes.c_uint32),
                    ("gguf_get_tensor_name", ctypes.c_char_p)):
        getattr(lib, fn).restype = res
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for fn in ("gguf_get_arr_n", "gguf_get_arr_type", "gguf_get_val_u32", "gguf_get_tensor_name"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    return lib, Params


@pytest.mark.parametrize("datasets", [["calib.txt"], []])
def test_ggml_own_gguf_parser_reads_the_file(tmp_path, datasets):
    lib, Params = _libggml()
    path = tmp_path / "imatrix.gguf"
    im = _example()
    im.datasets = datasets
    write_imatrix(path, im)
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, "gguf_init_from_file rejected the file"
    try:
        assert lib.gguf_get_n_tensors(ctx) == 4
        assert lib.gguf_get_tensor_name(ctx, 0) == f"{DENSE}.in_sum2".encode()
        key = lib.gguf_find_key(ctx, b"imatrix.datasets")
        assert lib.gguf_get_arr_n(ctx, key) == len(datasets)
        assert lib.gguf_get_arr_type(ctx, key) == gguf.GGUFValueType.STRING
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_size")) == 4
        assert lib.gguf_find_key(ctx, b"general.architecture") == -1
    finally:
        lib.gguf_free(ctx)


# ---------------------------------------------------------------- legacy format


def _legacy_expected(im: Imatrix) -> bytes:
    """save_imatrix_legacy by hand: chunk_size 4, so ncall = ceil(max count / 4)."""
    f32 = np.float32
    dense_ncall = 2  # ceil(5 / 4)
    dense = [f32(3) / f32(5) * f32(2), f32(0.5) / f32(5) * f32(2)]
    exps_ncall = 1  # ceil(4 / 4); the unseen expert stores 1 * ncall
    exps = [f32(2) / f32(2), f32(4) / f32(2), 1.0, 1.0, f32(1) / f32(4), f32(3) / f32(4)]
    out = _i32(2)
    out += _i32(len(DENSE)) + DENSE.encode() + _i32(dense_ncall) + _i32(2) + _f32(dense)
    out += _i32(len(EXPS)) + EXPS.encode() + _i32(exps_ncall) + _i32(6) + _f32(exps)
    out += _i32(7) + _i32(len("calib.txt")) + b"calib.txt"  # chunk count, last dataset
    return out


def test_legacy_bytes_match_save_imatrix_legacy(tmp_path):
    path = tmp_path / "imatrix.dat"
    im = _example()
    im.sums["blk.1.unused.weight"] = np.ones((2, 2), np.float32)  # no data at all: skipped
    im.counts["blk.1.unused.weight"] = np.zeros(2)
    write_imatrix(path, im, legacy=True)
    assert path.read_bytes() == _legacy_expected(im)


def test_legacy_read_gives_quantize_means(tmp_path):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_i32(2) + _i32(1) + b"a" + _i32(4) + _i32(2) + _f32([2, 6])
                     + _i32(1) + b"b" + _i32(0) + _i32(3) + _f32([5, 7, 9]))  # no trailer
    im = read_imatrix(path)
    means = im.means()
    np.testing.assert_array_equal(means["a"], np.float32([0.5, 1.5]))  # stored / ncall
    np.testing.assert_array_equal(means["b"], np.float32([5, 7, 9]))  # ncall 0: stored as is
    assert im.sums["a"].shape == (1, 2) and im.counts["a"].tolist() == [4]
    assert (im.datasets, im.chunk_count, im.chunk_size) == ([], 0, 0)


def test_legacy_round_trip(tmp_path):
    im = _example()
    first, second = tmp_path / "a.dat", tmp_path / "b.dat"
    write_imatrix(first, im, legacy=True)
    back = read_imatrix(first)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 7 and back.chunk_size == 0
    for name, mean in im.means().items():
        # ncall 1 keeps the means exact; otherwise (x / c * n) / n is off by float rounding only
        np.testing.assert_allclose(back.means()[name], mean, rtol=1e-6)
    np.testing.assert_array_equal(back.means()[EXPS], im.means()[EXPS])
    # a legacy file read back writes the same bytes again (these values survive x / n * n)
    write_imatrix(second, back, legacy=True)
    assert second.read_bytes() == first.read_bytes()


def test_legacy_to_gguf_keeps_means(tmp_path):
    write_imatrix(tmp_path / "a.dat", _example(), legacy=True)
    legacy = read_imatrix(tmp_path / "a.dat")
    write_imatrix(tmp_path / "a.gguf", legacy)
    again = read_imatrix(tmp_path / "a.gguf")
    for name, mean in legacy.means().items():
        np.testing.assert_array_equal(again.means()[name], mean)


# ---------------------------------------------------------------- errors


def _one_line_error(path, *, match: str) -> str:
    with pytest.raises(AlphaQError, match=match) as e:
        read_imatrix(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.gguf", match="cannot read")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_files_are_refused(tmp_path, legacy):
    full = tmp_path / "full"
    write_imatrix(full, _example(), legacy=legacy)
    raw = full.read_bytes()
    # every cut inside the required part (legacy: entries; GGUF: up to the last tensor's data)
    end = len(raw) - (4 + 4 + len("calib.txt") if legacy else 32 - 12)
    cut = tmp_path / "cut"
    for n in range(end):
        cut.write_bytes(raw[:n])
        with pytest.raises(AlphaQError) as e:
            read_imatrix(cut)
        assert str(cut) in str(e.value) and "\n" not in str(e.value), n


def test_truncated_legacy_trailer_is_refused(tmp_path):
    write_imatrix(tmp_path / "full", _example(), legacy=True)
    raw = (tmp_path / "full").read_bytes()
    for n in (len(raw) - 1, len(raw) - len("calib.txt") - 2):
        (tmp_path / "cut").write_bytes(raw[:n])
        _one_line_error(tmp_path / "cut", match="truncated")


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "junk.dat"
    path.write_bytes(b"\x00\x00\x00\x00 not an imatrix")
    _one_line_error(path, match="no data")
    path.write_bytes(_i32(1) + _i32(-5) + b"xyz")
    _one_line_error(path, match="name length -5")
    path.write_bytes(b"GGUF" + b"\xff" * 40)
    _one_line_error(path, match="GGUF")


def _gguf_with(path, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 1)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_sums_without_counts_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    _gguf_with(path, {"a.in_sum2": np.ones((1, 4), np.float32), "b.in_sum2": np.ones((1, 4), np.float32),
                      "b.counts": np.ones((1, 1), np.float32)})
    _one_line_error(path, match="mismatched sums and counts for a")


def test_gguf_non_f32_is_refused(tmp_path):
    path = tmp_path / "f16.gguf"
    _gguf_with(path, {"a.in_sum2": np.ones((1, 4), np.float16), "a.counts": np.ones((1, 1), np.float32)})
    _one_line_error(path, match="must be F32")


def test_gguf_sums_not_splitting_into_matrices_are_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    _gguf_with(path, {"a.in_sum2": np.ones((1, 5), np.float32), "a.counts": np.ones((2, 1), np.float32)})
    _one_line_error(path, match="5 sums do not split into 2")


def test_bad_imatrix_is_not_written(tmp_path):
    path = tmp_path / "out.gguf"
    im = _example()
    del im.counts[DENSE]
    with pytest.raises(AlphaQError, match=f"mismatched sums and counts for {DENSE}"):
        write_imatrix(path, im)
    im = _example()
    im.counts[EXPS] = np.ones(2)
    with pytest.raises(AlphaQError, match="counts shape"):
        write_imatrix(path, im)
    long = "blk.0." + "x" * 60
    with pytest.raises(AlphaQError, match="too long"):
        write_imatrix(path, Imatrix(sums={long: np.ones((1, 2), np.float32)}, counts={long: np.ones(1)}))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.dat"
    path.write_bytes(b"old")
    unseen = Imatrix(sums={"w": np.ones((1, 2), np.float32)}, counts={"w": np.zeros(1)}, chunk_size=1)
    with pytest.raises(AlphaQError, match="no imatrix entry has data"):
        write_imatrix(path, unseen, legacy=True)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
    write_imatrix(path, _example())
    assert path.read_bytes()[:4] == b"GGUF" and list(tmp_path.iterdir()) == [path]


def test_written_file_gets_the_umask_mode_not_0600(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        write_imatrix(tmp_path / "a.gguf", _example())
        write_imatrix(tmp_path / "a.dat", _example(), legacy=True)
    finally:
        os.umask(old)
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o640}
