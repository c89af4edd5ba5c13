# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this project's machines; on other machines point pip at a CPU index, or use an
# existing torch: `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
BIN := $(VENV)/bin

.PHONY: run test lint test-cpu test-interpret test-gpu bench clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	ROTKERN_SKIP_CUDA_BUILD=1 $(BIN)/pip install -q -e ".[test]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m rotkern.trainers quadratic

lint: $(BIN)/.installed
	$(BIN)/ruff check rotkern tests benchmarks

test-cpu: $(BIN)/.installed
	$(BIN)/pytest -m "not gpu and not interpret and not cuda_ext"

# Triton kernels on CPU tensors through the interpreter (tiny fp32 shapes).
test-interpret: $(BIN)/.installed
	TRITON_INTERPRET=1 $(BIN)/pytest -m "interpret and not gpu"

test: lint test-cpu test-interpret

# On the GPU machine (its own torch/Triton): everything, including bf16 and the GPU-only checks.
test-gpu:
	$(PYTHON) -m pytest -m "not interpret or gpu" -v
	$(PYTHON) -m pytest -m interpret

bench:
	$(PYTHON) benchmarks/bench_optimizer_step.py --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
