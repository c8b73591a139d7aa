"""Everything is in pyproject.toml; this file only ships ggml-patches/ inside the package.

The patch series lives at the top of the repository (ggml-patches/, its own README, `git am`
friendly), but an installed `convert.patched` must find it without the checkout, so a wheel
carries a copy as package data: convert/ggml-patches/. A checkout (and an editable install) reads
the top-level directory itself (convert.patched.patch_dir).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PATCHES = Path(__file__).resolve().parent / "ggml-patches"


class BuildPyWithPatches(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # the checkout's own ggml-patches/ is read in place
            return
        patches = sorted(PATCHES.glob("*.patch"))
        if not patches:
            raise SystemExit(f"no patches in {PATCHES}: the package needs ggml-patches/")
        dest = Path(self.build_lib) / "convert" / "ggml-patches"
        dest.mkdir(parents=True, exist_ok=True)
        for p in patches + [PATCHES / "README.md"]:
            shutil.copy2(p, dest / p.name)


setup(cmdclass={"build_py": BuildPyWithPatches})
