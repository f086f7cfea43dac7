# Two entry points on a fresh machine: `make demo` (the main job on the
# embedded digits data) and `make test` (the test suite). Both create .venv.
# `make test-fast`: the tests not marked slow (no trainer, distributed or
# Triton AOT tests), for the edit-test loop; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := torch torchvision numpy scikit-learn tqdm matplotlib pytest pytest-benchmark ninja mlxtend
# the benchmarks' peers (pyproject's `bench` extra): FAISS for the kNN comparison
BENCH_DEPS := faiss-cpu
# `make lint` (run first by `make test`): ruff (pyproject's [tool.ruff]) and clang-format (.clang-format)
LINT_DEPS := ruff clang-format
STAMP  := $(VENV)/.deps-installed

.PHONY: venv build test test-fast lint demo bench clean cmake-test

$(STAMP): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(DEPS) $(BENCH_DEPS) $(LINT_DEPS)
	touch $(STAMP)

venv: $(STAMP)

# The extension builds against the venv's torch: no build isolation (it would
# download another multi-GB torch).
build: $(STAMP)
	$(BIN)/pip install -e . --no-build-isolation --no-deps

test: build
	$(MAKE) lint
	$(BIN)/python -m pytest python_tests/ -q
	$(BIN)/python -m pytest benchmarks/ -q --benchmark-disable --bench-size=smoke
	$(MAKE) cmake-test

test-fast: build
	$(BIN)/python -m pytest python_tests/ -q -m "not slow"

CXX_SOURCES = $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null || find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)

# CMake build of libinstdisc_ops (CPU-only) and its ctest smoke test, own build dir.
CMAKE_TEST_DIR := build/cmake-test
cmake-test: $(STAMP)
	cmake -S . -B $(CMAKE_TEST_DIR) -DINSTDISC_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CMAKE_TEST_DIR) -j2
	ctest --test-dir $(CMAKE_TEST_DIR) --output-on-failure

demo: build
	$(BIN)/instdisc-train

bench: build
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf build *.egg-info instdisc_kernels/_C*.so
