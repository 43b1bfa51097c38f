# Two set-up commands: `make demo` and `make test`. Both create .venv if missing and install the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-lowest lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

test: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q --durations=40 tests

# The core tests on the lowest torch and transformers that gl-ray supports (gl_ray/versions.py), in .venv-lowest.
# torch's CPU build comes from PyTorch's index; transformers 5.0.0 wants huggingface-hub<2 and tokenizers<=0.23.0.
CORE_TESTS := tests/test_versions.py tests/test_config.py tests/test_schedule.py tests/test_model.py \
	tests/test_architectures.py tests/test_loss.py tests/test_attention.py tests/test_parallel.py \
	tests/test_compiling.py tests/test_micro_batch.py tests/test_train_local.py
test-lowest:
	test -x .venv-lowest/bin/python || $(PY) -m venv .venv-lowest
	.venv-lowest/bin/pip install --quiet --upgrade pip
	.venv-lowest/bin/pip install --quiet torch==2.6.0 --index-url https://download.pytorch.org/whl/cpu
	.venv-lowest/bin/pip install --quiet -e '.[dev]' transformers==5.0.0 'huggingface-hub<2' 'tokenizers<=0.23.0'
	GL_RAY_LOWEST_BOUNDS=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 .venv-lowest/bin/python -m pytest -q $(CORE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check gl_ray pipelines tests benchmarks

clean:
	rm -rf $(VENV) .venv-lowest runs data/stdlib
