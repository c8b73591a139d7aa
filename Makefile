# The two commands of the README. Both set up everything they need first (idempotent).
PY := .venv/bin/python
DEMO_OUT := out/mixtral-alphaq-b3.gguf

.PHONY: setup patched install-patched demo test test-fast bench bench-spectral bench-expert bench-scale clean

setup:
	@bash scripts/setup.sh

# Main job on the bundled demo model: convert at budget 3, then load it in llama-cpp-python,
# print the allocation summary and a few generated tokens.
demo: setup
	@mkdir -p out
	$(PY) convert_alphaq.py tests/fixtures/mixtral --budget 3 -o $(DEMO_OUT) --force
	$(PY) scripts/demo_generate.py $(DEMO_OUT)

# The patched llama.cpp runtime (ggml-patches/) for expert-granular files: builds a
# llama-cpp-python wheel once per patch series (~6-10 min, cached in ~/.cache/alphaq/patched).
# `make install-patched` puts it into .venv (it runs stock files exactly as before).
patched: setup
	$(PY) -m convert.patched

install-patched: setup
	$(PY) -m convert.patched --install

test: setup patched
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Rebuilds the evaluation: benchmark zoo (trained once, cached in .cache/zoo; slow on CPU),
# every variant and baseline, the sensitivity check, expert granularity (torch reference and
# patched llama.cpp), router-norm, bench/RESULTS.md and its figures, and the conversion benchmark.
bench: setup patched
	$(PY) scripts/train_tiny_moe.py --zoo bench --out .cache/zoo
	$(PY) scripts/bench_eval.py
	for m in mixtral-bench qwen2moe-bench qwen3moe-bench; do $(PY) scripts/bench_sensitivity.py --model $$m || exit 1; done
	$(PY) scripts/bench_eval.py --torch-expert --models mixtral-bench qwen2moe-bench
	$(PY) scripts/bench_expert.py
	$(PY) scripts/bench_routernorm.py
	$(PY) scripts/bench_eval.py --report-only
	$(PY) scripts/bench_convert.py

bench-spectral: setup
	$(PY) scripts/bench_spectral.py

# Real-shape conversion benchmark (Qwen3-30B-A3B, DeepSeek-V2-Lite, Mixtral-8x7B block shapes,
# random weights, two block counts each, <= ~25 GB of disk at once) and the full-model projection
# table; writes bench/scale.json. Add `--modes stock fast default` via SCALE_ARGS (the default is slow).
bench-scale: setup
	$(PY) scripts/bench_scale.py $(SCALE_ARGS)

bench-expert: setup patched
	$(PY) scripts/bench_expert.py

clean:
	rm -rf out .pytest_cache
