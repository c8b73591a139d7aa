"""`pip install .` outside the repository: a working `alphaq convert`, and the patch series that
the patched-runtime builder (convert.patched) needs, inside the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
MODEL = FIXTURES / "qwen2moe"  # the smallest fixture


def _checkout_copy(dest: Path) -> Path:
    """What a clean checkout holds (tracked files, and new ones git does not ignore), minus the
    test and benchmark data, which the package does not ship."""
    proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout: nothing to copy a clean source tree from")
    for rel in proc.stdout.splitlines():
        src = ROOT / rel
        if rel.startswith(("tests/", "bench/")) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


def _fresh_venv(dest: Path) -> Path:
    """A new virtualenv that sees this environment's packages (torch, llama-cpp-python, ...) as
    plain path entries after its own site-packages, so nothing is downloaded and this
    environment's own (editable) alphaq is never activated in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    py = dest / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "outer-environment.pth").write_text("\n".join(ours) + "\n")
    return py


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_converter_takes_paths_relative_to_the_callers_directory(tmp_path, monkeypatch):
    """The converter subprocess runs elsewhere (beside the `convert` package); relative model and
    output paths still mean the caller's directory."""
    from convert.hf_to_gguf import convert_hf

    monkeypatch.chdir(tmp_path)
    shutil.copytree(MODEL, tmp_path / "model")
    conv = convert_hf(Path("model"), Path("float.gguf"))
    assert (tmp_path / "float.gguf").stat().st_size > 1_000_000 and conv.path == Path("float.gguf")


@pytest.mark.slow
def test_pip_install_outside_the_repo_converts_and_carries_the_patch_series(tmp_path):
    import llama_cpp

    from convert.patched import build_key

    src = _checkout_copy(tmp_path / "src")
    py = _fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env()
    proc = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--ignore-installed", str(src)], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())

    # the installed modules are the ones that run, and they carry the patch series
    probe = ("import json, alphaq, convert, convert.patched as p; print(json.dumps({'alphaq': alphaq.__file__, "
             "'convert': convert.__file__, 'patches': [str(f) for f in p.patch_files()], 'key': p.build_key()}))")
    info = json.loads(subprocess.run([py, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                                     check=True).stdout)
    for name in ("alphaq", "convert"):
        assert Path(info[name]).is_relative_to(site), info
    patches = [Path(p) for p in info["patches"]]
    assert patches and all(p.parent == site / "convert" / "ggml-patches" for p in patches)
    assert [(p.name, p.read_bytes()) for p in patches] == [
        (p.name, p.read_bytes()) for p in sorted((ROOT / "ggml-patches").glob("*.patch"))]
    assert info["key"] == build_key(), "the installed series must reuse the checkout's cached wheel"
    assert (site / "alphaq" / "spectral" / "native.c").is_file()
    assert (site / "alphaq" / "gguf" / "quantise_speed.json").is_file()  # every plan's quantiser estimate

    # `alphaq convert` from a directory outside the repository, paths relative to it
    model = os.path.relpath(MODEL, work)
    proc = subprocess.run([py.parent / "alphaq", "convert", model, "--fast", "--budget", "3", "-o", "x.gguf",
                           "--no-progress", "--no-stock-compare"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["x.gguf", "x.plan.json", "x.tensor-types.txt"]
    llm = llama_cpp.Llama(model_path=str(work / "x.gguf"), n_ctx=64, verbose=False)
    out = llm("Hello", max_tokens=2)
    assert out["choices"][0]["text"] is not None and llm.n_vocab() > 0


def test_llama_cpp_is_built_without_its_amx_kernels(tmp_path):
    """llama.cpp's AMX kernels crash on CPUs with AMX (convert/vendor.py NO_AMX_FLAGS): the
    llama-cpp-python that make setup installs has none, and a library that has them is found, and
    warned about on such a CPU only."""
    from convert.vendor import AMX_SYMBOL, amx_warning, has_amx_kernels, installed_lib_dir

    lib = installed_lib_dir()
    assert lib is not None and any(lib.glob("libggml-cpu*.so*")) and not has_amx_kernels(lib)
    built = tmp_path / "lib"
    built.mkdir()
    (built / "libggml-cpu.so.0").write_bytes(b"\0ELF..." + AMX_SYMBOL.encode() + b"\0")
    assert has_amx_kernels(built)
    amx_cpu, other_cpu = tmp_path / "amx", tmp_path / "other"
    amx_cpu.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    other_cpu.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert "pip install --force-reinstall" in amx_warning(amx_cpu, built)
    assert amx_warning(other_cpu, built) is None and amx_warning(amx_cpu, lib) is None
