# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this project's machines; on other machines point pip at a CPU index, or use an
# existing torch: `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
BIN := $(VENV)/bin

.PHONY: run quadratic test lint test-cpu test-compile test-interpret ext test-ext test-ext-run test-gpu-dry test-gpu bench clean

# pip's own lines go to $(VENV)/install.log, shown only when a step fails.
$(BIN)/.installed: pyproject.toml setup.py
	@echo "set-up: $(VENV)/ with $(or $(TORCH_SPEC),the torch already installed) and rotkern[test] (a few minutes the first time; log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@{ $(BIN)/pip install -q --upgrade pip && \
	  if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi && \
	  ROTKERN_SKIP_CUDA_BUILD=1 $(BIN)/pip install -q -e ".[test]"; } > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "set-up failed: see $(VENV)/install.log"; exit 1; }
	@touch $@

# The main job: the paper's Figure 1 in miniature (gpt-tiny on the embedded stdlib text, every scope, 3 seeds; on a
# CPU the fused optimizer runs the compiled extension when `make ext` succeeds, else the eager reference), the
# paper's analyses of those runs, then fused-vs-eager validation. On a machine without CUDA the fused side runs its Triton kernels through the
# interpreter (slow, so fewer steps); with CUDA, on the GPU. Each run gets a new folder: nothing is overwritten.
# Expanded once (a recursive ?= would call date again in every recipe line and split the run across folders).
ifndef RUN_DIR
RUN_DIR := runs/main-$(shell date +%Y%m%d-%H%M%S)
endif
run: $(BIN)/.installed
	@# the compiled CPU step where a C++ compiler is present (up to date: nothing to do); eager without it
	-@$(BIN)/python -m rotkern.build_ext
	$(BIN)/python -m rotkern.trainers compare --preset=tiny --seeds=3 --optimizer=rotated-fused --out_dir=$(RUN_DIR)
	$(BIN)/python -m rotkern.trainers analyze $(RUN_DIR) --batches=10 --out_dir=$(RUN_DIR)/analysis
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(BIN)/python -m rotkern.trainers validate --preset=tiny --steps=20 --backend=triton --out_dir=$(RUN_DIR)/validate; \
	else \
	  TRITON_INTERPRET=1 $(BIN)/python -m rotkern.trainers validate --preset=tiny --steps=3 --backend=triton \
	    --block_size=64 --batch_size=4 --print_every=0 --out_dir=$(RUN_DIR)/validate; \
	fi

# Figure 4 in miniature: Adam, rotated Adam and SGD-M on an ill-conditioned quadratic, aligned and rotated.
quadratic: $(BIN)/.installed
	$(BIN)/python -m rotkern.trainers quadratic

lint: $(BIN)/.installed
	$(BIN)/ruff check rotkern tests benchmarks

test-cpu: $(BIN)/.installed
	$(BIN)/pytest -m "not gpu and not interpret and not ext and not compile"
	$(BIN)/pytest -q benchmarks/test_bench_step.py --benchmark-disable -m "not slow and not ext"
	$(BIN)/pytest -q benchmarks/test_bench_cpu_step.py

# Every kernel variant the launcher produces for GPT-2 124M, ViT-S/16 and ResNet-50 (all scopes, fp32/bf16, all
# precisions), compiled for sm_90 and sm_80 without a GPU; fails on a compile error, a register spill (bar the few
# the test tolerates, noted) or too much shared memory; registers, spills, shared memory and occupancy per
# variant go to runs/compile/*.md, a line per table to the console (~2 min on 2 cores).
test-compile: $(BIN)/.installed
	$(BIN)/pytest -q -s -m compile tests/kernels/test_kernel_compile.py

# Triton kernels on CPU tensors through the interpreter (tiny fp32 shapes).
test-interpret: $(BIN)/.installed
	TRITON_INTERPRET=1 $(BIN)/pytest -m "interpret and not gpu"

# The optional compiled extension rotkern._C (its CPU path), built in place next to the sources (~1 min; nothing
# to do when up to date). The same command builds it for a pip install: python -m rotkern.build_ext.
ext: $(BIN)/.installed
	$(BIN)/python -m rotkern.build_ext

# The extension against the eager reference; ROTKERN_REQUIRE_EXT=1 turns a broken build into failures, not skips.
# Without a C++ compiler: one line saying so, and the extension's tests are skipped.
test-ext: $(BIN)/.installed
	@if $(BIN)/python -c "import sys; from rotkern.build_ext import compiler; sys.exit(compiler() is not None)"; \
	then echo "test-ext: skipped: no C++ compiler (c++, g++ or clang++); install one (e.g. apt install g++) to build and test the compiled extension"; \
	else $(MAKE) --no-print-directory test-ext-run; fi

test-ext-run: ext
	ROTKERN_REQUIRE_EXT=1 $(BIN)/pytest -m "ext and not gpu"
	ROTKERN_REQUIRE_EXT=1 $(BIN)/pytest -q benchmarks/test_bench_cpu_step.py
	ROTKERN_REQUIRE_EXT=1 $(BIN)/pytest -q benchmarks/test_bench_step.py --benchmark-disable -m "ext and not slow"

# The GPU loan's script on the CPU: every phase (kernels under the interpreter on tiny shapes, a stand-in for
# compute-sanitizer), its summary.md, and its tests (a planted slow phase is cut, the next ones run) (~2 min).
test-gpu-dry: $(BIN)/.installed
	$(BIN)/pytest -q benchmarks/test_gpu_run.py
	GPU_RUN_DRY=1 OUT=runs/gpu-dry PYTHON=$(BIN)/python bash benchmarks/gpu_run.sh all | tail -n 30

test: lint test-cpu test-compile test-interpret test-ext test-gpu-dry

# On a GPU machine (its own torch/Triton, nothing installed): the GPU phases of gpu_run.sh (correctness at GPT-2
# shapes, compute-sanitizer, the tf32 probe, every GPU test).
test-gpu:
	bash benchmarks/gpu_run.sh tests

# On a GPU machine: the GPT-2 speed table, the svd / eigen steps and the end-to-end share (one command).
bench:
	bash benchmarks/gpu_run.sh bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache rotkern/_C*.so
