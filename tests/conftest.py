from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FIXTURES = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def float_ggufs(tmp_path_factory) -> dict[str, Path]:
    """Each fixture converted once per session to BF16 GGUF by llama.cpp's converter (our glue)."""
    from convert.hf_to_gguf import convert_hf

    out = tmp_path_factory.mktemp("bf16")
    return {name: convert_hf(FIXTURES / name, out / f"{name}-bf16.gguf").path for name in MODEL_FIXTURES}


@pytest.fixture(scope="session")
def patched_site() -> Path:
    """The patched llama_cpp: built (or reused) from ggml-patches/, or ALPHAQ_PATCHED_SITE when set
    (a directory holding a patched llama_cpp package, e.g. a development build)."""
    from convert.patched import patched_site as site

    return site()


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where the Triton kernels run: cpu under Triton's interpreter (TRITON_INTERPRET=1, which the
    kernel test modules set at import unless already set), cuda with TRITON_INTERPRET=0 on a GPU."""
    import os

    import torch

    triton = pytest.importorskip("triton", reason="Triton is not installed; it is the optional extra "
                                 "`pip install '.[gpu]'`, and the kernel tests need it even on CPU (interpreter)")
    interpret = os.environ.get("TRITON_INTERPRET", "0") != "0"
    if not interpret and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 runs the kernels on a GPU, and there is no CUDA device")
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.zeros, InterpretedFunction) != interpret:
        pytest.fail("triton was imported before TRITON_INTERPRET was set; run these tests in a fresh process")
    return "cpu" if interpret else "cuda"


@pytest.fixture
def torch_threads():
    """Run a test with a given torch thread count (call the fixture's value); restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
